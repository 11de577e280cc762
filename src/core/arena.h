// Flat arenas with named views (docs/style.md habit 3, llm.c ParameterTensors): plan every view first,
// then make ONE allocation. Parameters, gradients, optimizer state and activations each live in
// an arena, so the hot path never allocates.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"

namespace diffmoe {

// Where an arena's bytes come from. The CPU allocator is here; the CUDA one lives in backend/cuda.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p) = 0;
  virtual Device device() const = 0;
};

Allocator& cpu_allocator();  // 256-byte aligned host memory

class Arena {
 public:
  struct Entry {
    std::string name;
    Shape shape;
    DType dtype;
    size_t offset;  // bytes from the arena base, 256-aligned
  };
  static constexpr size_t kAlign = 256;
  // Bytes a view of `shape` and `dtype` takes in an arena: its data rounded up to kAlign.
  static size_t view_bytes(const Shape& shape, DType dtype);

  Arena() = default;
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&& o) noexcept;
  Arena& operator=(Arena&& o) noexcept;

  // Plans a view; names must be unique. Only before allocate().
  void add(std::string name, Shape shape, DType dtype);
  // Leaves the bytes up to `offset` (a multiple of kAlign, not below bytes()) unused, so the next view
  // starts there: views at offsets computed elsewhere (ParamLayout), padding zero-filled as always.
  void pad_to(size_t offset);
  // Plans `name` over the bytes of the planned view `of`, from byte `offset` (a multiple of kAlign) on:
  // it must fit inside `of` (view_bytes). Two tensors that are never live at once share memory this
  // way (e.g. the fp8 mode's quantisation scratch and the head's logits gradient, docs/model.md §7).
  // An alias takes no bytes of its own and is not one of entries() (flat() covers the views it lies in).
  void alias(std::string name, Shape shape, DType dtype, std::string_view of, size_t offset);
  // One allocation for every planned view; the memory is zero-filled on the CPU.
  void allocate(Allocator& alloc);

  bool allocated() const { return base_ != nullptr || bytes_ == 0; }
  bool has(std::string_view name) const;
  Tensor get(std::string_view name) const;  // throws naming the missing view
  Tensor view(const Entry& e) const;
  // One 1-D view over the whole allocation, padding included, in the entries' common dtype (throws
  // if they differ): an op over every view at once (zeroing the gradients, their global norm) in
  // one launch. The padding between views is zero-filled at allocate() and no view writes it.
  Tensor flat() const { return flat(0, entries_.size()); }
  // The same over the entries [first, end) in planning order, their padding included (first < end).
  Tensor flat(size_t first, size_t end) const;
  const std::vector<Entry>& entries() const { return entries_; }
  const std::vector<Entry>& aliases() const { return aliases_; }  // offset: bytes from the arena base
  // The bytes the plan takes (padding included), allocated or not: planning without allocating
  // (add() and pad_to() only) gives the exact size of the allocation.
  size_t bytes() const { return bytes_; }
  void* base() const { return base_; }
  Device device() const;

 private:
  std::vector<Entry> entries_, aliases_;
  // name -> index into entries_, or kAliasBit | index into aliases_.
  static constexpr size_t kAliasBit = size_t{1} << 63;
  std::unordered_map<std::string, size_t> index_;
  size_t bytes_ = 0;
  void* base_ = nullptr;
  Allocator* alloc_ = nullptr;
};

}  // namespace diffmoe
