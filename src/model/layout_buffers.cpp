#include "model/layout_buffers.h"

namespace diffmoe {

LayoutBuffers::LayoutBuffers(const ParamLayout& layout, const std::vector<DType>& group_dtype, DType buffer_dtype)
    : layout_(&layout) {
  const auto& groups = layout.groups();
  DIFFMOE_CHECK(group_dtype.size() == groups.size(), "[layout] {} dtypes for {} groups", group_dtype.size(),
                groups.size());
  groups_.resize(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const size_t es = dtype_size(group_dtype[g]);
    Arena& a = groups_[g];
    for (size_t i : groups[g].entries) {
      const ParamLayout::Entry& e = layout.entries()[i];
      a.pad_to(static_cast<size_t>(e.offset) * es);
      a.add(e.spec.name, e.shape, group_dtype[g]);
      where_.emplace(e.spec.name, g);
    }
    a.pad_to(static_cast<size_t>(groups[g].length) * es);
  }
  if (buffer_dtype != DType::kU8) {
    for (const ParamLayout::Entry& e : layout.buffers()) {
      buffers_.add(e.spec.name, e.shape, buffer_dtype);
      where_.emplace(e.spec.name, groups_.size());
    }
  }
}

void LayoutBuffers::allocate(Allocator& alloc, const std::vector<bool>& skip_group) {
  for (size_t g = 0; g < groups_.size(); ++g)
    if (g >= skip_group.size() || !skip_group[g]) groups_[g].allocate(alloc);
  buffers_.allocate(alloc);
}

bool LayoutBuffers::allocated() const {
  for (const Arena& a : groups_)
    if (!a.allocated()) return false;
  return buffers_.allocated();
}

Tensor LayoutBuffers::get(std::string_view name) const {
  auto it = where_.find(std::string(name));
  DIFFMOE_CHECK(it != where_.end(), "[model] no parameter named '{}'", name);
  DIFFMOE_CHECK(it->second == groups_.size() || groups_[it->second].allocated(),
                "[layout] '{}' has no buffer: its group {} is not allocated (ZeRO-2 gradients live in bucket slots)",
                name, it->second);
  return it->second == groups_.size() ? buffers_.get(name) : groups_[it->second].get(name);
}

Tensor LayoutBuffers::group(size_t g) const { return range(g, 0, layout_->groups()[g].length); }

Tensor LayoutBuffers::bucket(size_t g, size_t b) const {
  const ParamLayout::Bucket& bk = layout_->groups()[g].buckets[b];
  return range(g, bk.offset, bk.length);
}

Tensor LayoutBuffers::chunk(size_t g, size_t b, int64_t r, int64_t dp) const {
  const ParamLayout::Bucket& bk = layout_->groups()[g].buckets[b];
  const int64_t c = bk.chunk(dp);
  return range(g, bk.offset + r * c, c);
}

Tensor LayoutBuffers::range(size_t g, int64_t offset, int64_t count) const {
  const Arena& a = groups_[g];
  DIFFMOE_CHECK(a.allocated(), "[layout] range of group {}, which is not allocated (before allocate(), or ZeRO-2 "
                "gradients of a data-parallel group, which live in bucket slots)", g);
  DIFFMOE_CHECK(offset >= 0 && count >= 0 && offset + count <= layout_->groups()[g].length,
                "[layout] range [{}, {}) of group {} ({} elements)", offset, offset + count, g,
                layout_->groups()[g].length);
  const DType dt = a.entries().front().dtype;
  Tensor t;
  t.data = static_cast<char*>(a.base()) + static_cast<size_t>(offset) * dtype_size(dt);
  t.dtype = dt;
  t.device = a.device();
  t.shape = Shape{count};
  return t;
}

size_t LayoutBuffers::bytes() const {
  size_t n = buffers_.bytes();
  for (const Arena& a : groups_) n += a.bytes();
  return n;
}

}  // namespace diffmoe
