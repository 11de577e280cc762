// One flat allocation per ParamLayout group, with a named view per parameter at the layout's
// offsets (and, optionally, one more for the non-trainable buffers): the model's compute weights
// and its gradients are both this, so a gradient bucket and the weights it updates are the same
// element range of their group.
#pragma once
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/arena.h"
#include "model/param_layout.h"

namespace diffmoe {

class LayoutBuffers {
 public:
  // Group g's views get dtype group_dtype[g] (one per group). buffer_dtype: the dtype of the
  // non-trainable buffers' views, or kU8 (no buffers). Plans every view without allocating:
  // bytes(), group_arena() and buffer_arena() give the exact sizes (memory planning), views need
  // allocate() first.
  LayoutBuffers(const ParamLayout& layout, const std::vector<DType>& group_dtype, DType buffer_dtype);
  // The same, allocated.
  LayoutBuffers(const ParamLayout& layout, const std::vector<DType>& group_dtype, DType buffer_dtype, Allocator& alloc)
      : LayoutBuffers(layout, group_dtype, buffer_dtype) {
    allocate(alloc);
  }
  LayoutBuffers(LayoutBuffers&&) noexcept = default;
  LayoutBuffers& operator=(LayoutBuffers&&) noexcept = default;

  // One allocation per group (and one for the buffers), zero-filled on the CPU. Once only.
  // skip_group[g] (when given): group g stays unallocated (ZeRO-2 gradients of a slotted group);
  // its views cannot be read.
  void allocate(Allocator& alloc, const std::vector<bool>& skip_group = {});
  bool allocated() const;  // every group and the buffers
  bool group_allocated(size_t g) const { return groups_[g].allocated(); }

  bool has(std::string_view name) const { return where_.contains(std::string(name)); }
  Tensor get(std::string_view name) const;  // throws naming the missing tensor
  size_t n_groups() const { return groups_.size(); }
  // The whole group's buffer as one 1-D view (padding included; padding stays zero).
  Tensor group(size_t g) const;
  // Bucket b of group g, or the part of it one of dp ranks owns (chunk r of dp equal chunks).
  Tensor bucket(size_t g, size_t b) const;
  Tensor chunk(size_t g, size_t b, int64_t r, int64_t dp) const;
  // Elements [offset, offset + count) of group g as a 1-D view.
  Tensor range(size_t g, int64_t offset, int64_t count) const;
  const Arena& group_arena(size_t g) const { return groups_[g]; }
  const Arena& buffer_arena() const { return buffers_; }
  size_t bytes() const;  // every group and the buffers, padding included; allocated or only planned
  const ParamLayout& layout() const { return *layout_; }

 private:
  const ParamLayout* layout_ = nullptr;
  std::vector<Arena> groups_;
  Arena buffers_;
  std::unordered_map<std::string, size_t> where_;  // name -> group index, or groups_.size() = buffers
};

}  // namespace diffmoe
