// The serving engine's latent cache (docs/model.md §2: r_kv + d_rope values per token and layer): one pool per
// layer of n_blocks fixed-size blocks of block_size rows [ĉ_s ; k^R_s], a free list of block ids, and
// per sequence a block table (the blocks of its positions, in order; a block id names the same
// block in every layer's pool). Sequences grow a block at a time as positions are appended and
// give every block back at once when released (finished or cancelled requests), so blocks are
// reused by later sequences without copying. Host-side bookkeeping only: one thread (the engine's)
// uses a PagedCache; the counters may be read by others through the scheduler's statistics.
#pragma once
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "core/arena.h"
#include "model/config.h"

namespace diffmoe::serve {

class PagedCache {
 public:
  // Pools of `n_blocks` blocks of `block_size` rows for every layer of `cfg`, in `dtype`, allocated
  // with `alloc` (the backend's). `reserved` more blocks, ids n_blocks … n_blocks + reserved − 1, are in the
  // pools but never handed out nor counted (the engine's padding rows write there, docs/serving.md "CUDA graphs").
  PagedCache(const ModelConfig& cfg, DType dtype, int64_t block_size, int64_t n_blocks, Allocator& alloc,
             int64_t reserved = 0);

  int64_t block_size() const { return block_size_; }
  int64_t total_blocks() const { return n_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t row_width() const { return row_width_; }
  size_t bytes() const { return arena_.bytes(); }
  // Blocks that hold `positions` positions.
  int64_t blocks_for(int64_t positions) const { return (positions + block_size_ - 1) / block_size_; }

  // A new, empty sequence; its id is never reused.
  int64_t add();
  bool contains(int64_t seq) const { return seqs_.contains(seq); }
  // Blocks the sequence must still take to hold `length` positions (0 if it has them).
  int64_t blocks_needed(int64_t seq, int64_t length) const;
  // Takes blocks from the free list until the sequence holds `length` positions and sets its length.
  // Throws (changing nothing) when the free list is short or length is below the current length.
  void extend(int64_t seq, int64_t length);
  // Gives every block of the sequence back to the free list and forgets it.
  void release(int64_t seq);

  int64_t length(int64_t seq) const;
  std::span<const int32_t> blocks(int64_t seq) const;
  // The pool row of position `pos` of the sequence: block · block_size + pos % block_size.
  int32_t slot(int64_t seq, int64_t pos) const;
  // Layer l's pool [n_blocks + reserved, block_size, r_kv + d_rope].
  Tensor layer(int64_t l) const { return layers_[static_cast<size_t>(l)]; }

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    int64_t length = 0;
  };
  const Sequence& get(int64_t seq) const;

  int64_t block_size_, n_blocks_, row_width_;
  Arena arena_;
  std::vector<Tensor> layers_;
  std::vector<int32_t> free_;  // a stack: the block released last is taken first
  std::unordered_map<int64_t, Sequence> seqs_;
  int64_t next_id_ = 0;
};

}  // namespace diffmoe::serve
