#include "model/grad_buffer.h"

namespace diffmoe {

namespace {

// A GEMM-written gradient this small between two added-into runs is zeroed with them (its next
// GEMM overwrites it anyway): one fill instead of two (the router gate between the norms).
constexpr int64_t kMergeGapElems = int64_t{1} << 18;

}  // namespace

LayoutBuffers GradBuffer::plan(const ParamLayout& layout, DType dtype) {
  // One dtype for every group, no buffers (the balancing biases have no gradient).
  return LayoutBuffers(layout, std::vector<DType>(layout.groups().size(), dtype), DType::kU8);
}

GradBuffer::GradBuffer(const ParamLayout& layout, DType dtype, Allocator& alloc) : buf_(plan(layout, dtype)) {
  buf_.allocate(alloc);
  for (size_t g = 0; g < layout.groups().size(); ++g) {
    const ParamLayout::Group& grp = layout.groups()[g];
    // Each added-into entry covers [offset, next entry's offset): its padding is zero anyway.
    for (size_t k = 0; k < grp.entries.size(); ++k) {
      const ParamLayout::Entry& e = layout.entries()[grp.entries[k]];
      if (!e.grad_added) continue;
      const int64_t end = k + 1 < grp.entries.size() ? layout.entries()[grp.entries[k + 1]].offset : grp.length;
      if (!zero_runs_.empty() && zero_runs_.back().group == g &&
          e.offset - (zero_runs_.back().offset + zero_runs_.back().count) <= kMergeGapElems)
        zero_runs_.back().count = end - zero_runs_.back().offset;
      else zero_runs_.push_back(Run{.group = g, .offset = e.offset, .count = end - e.offset});
    }
  }
}

void GradBuffer::zero(Backend& be, Context ctx) {
  for (const Run& r : zero_runs_) be.fill(ctx, {.out = buf_.range(r.group, r.offset, r.count), .value = 0.0});
  size_t zeroed = 0;
  for (const Run& r : zero_runs_) zeroed += static_cast<size_t>(r.count);
  size_t total = 0;
  for (const ParamLayout::Group& g : layout().groups()) total += static_cast<size_t>(g.length);
  stale_ = zeroed < total;
}

void GradBuffer::materialize(Backend& be, Context ctx) {
  if (!stale_) return;
  for (size_t g = 0; g < buf_.n_groups(); ++g) be.fill(ctx, {.out = buf_.group(g), .value = 0.0});
  stale_ = false;
}

size_t GradBuffer::zero_bytes() const {
  size_t n = 0;
  for (const Run& r : zero_runs_) n += static_cast<size_t>(r.count) * dtype_size(buf_.group(r.group).dtype);
  return n;
}

void GradBuffer::stage_done(int stage, Context ctx) const {
  if (!on_ready_) return;
  const auto& groups = layout().groups();
  for (size_t g = 0; g < groups.size(); ++g)
    for (size_t b = 0; b < groups[g].buckets.size(); ++b)
      if (groups[g].buckets[b].stage == stage) on_ready_(g, b, ctx);
}

}  // namespace diffmoe
