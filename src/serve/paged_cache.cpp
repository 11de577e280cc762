#include "serve/paged_cache.h"

#include <fmt/format.h>

namespace diffmoe::serve {

PagedCache::PagedCache(const ModelConfig& cfg, DType dtype, int64_t block_size, int64_t n_blocks, Allocator& alloc,
                       int64_t reserved)
    : block_size_(block_size), n_blocks_(n_blocks), row_width_(cfg.kv_lora_rank + cfg.qk_rope_head_dim) {
  DIFFMOE_CHECK(block_size >= 1 && n_blocks >= 1 && reserved >= 0,
                "[paged_cache] block_size {} and n_blocks {} must be >= 1, reserved blocks {} >= 0", block_size,
                n_blocks, reserved);
  DIFFMOE_CHECK(n_blocks + reserved <= INT32_MAX / block_size,
                "[paged_cache] {} blocks of {} rows: slots must fit in i32", n_blocks + reserved, block_size);
  for (int64_t l = 0; l < cfg.n_layers; ++l)
    arena_.add(fmt::format("pool.{}", l), Shape{n_blocks + reserved, block_size, row_width_}, dtype);
  arena_.allocate(alloc);
  for (int64_t l = 0; l < cfg.n_layers; ++l) layers_.push_back(arena_.get(fmt::format("pool.{}", l)));
  free_.reserve(static_cast<size_t>(n_blocks));
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));  // block 0 is taken first
}

int64_t PagedCache::add() {
  const int64_t id = next_id_++;
  seqs_.emplace(id, Sequence{});
  return id;
}

const PagedCache::Sequence& PagedCache::get(int64_t seq) const {
  const auto it = seqs_.find(seq);
  DIFFMOE_CHECK(it != seqs_.end(), "[paged_cache] no sequence {}", seq);
  return it->second;
}

int64_t PagedCache::blocks_needed(int64_t seq, int64_t length) const {
  const Sequence& s = get(seq);
  return std::max<int64_t>(0, blocks_for(length) - static_cast<int64_t>(s.blocks.size()));
}

void PagedCache::extend(int64_t seq, int64_t length) {
  const int64_t need = blocks_needed(seq, length);
  Sequence& s = seqs_.at(seq);
  DIFFMOE_CHECK(length >= s.length, "[paged_cache] sequence {} cannot shrink from {} to {} positions", seq, s.length,
                length);
  DIFFMOE_CHECK(need <= free_blocks(),
                "[paged_cache] sequence {} needs {} more blocks for {} positions, {} of {} are free", seq, need, length,
                free_blocks(), n_blocks_);
  for (int64_t i = 0; i < need; ++i) {
    s.blocks.push_back(free_.back());
    free_.pop_back();
  }
  s.length = length;
}

void PagedCache::release(int64_t seq) {
  const auto it = seqs_.find(seq);
  DIFFMOE_CHECK(it != seqs_.end(), "[paged_cache] release: no sequence {}", seq);
  for (auto b = it->second.blocks.rbegin(); b != it->second.blocks.rend(); ++b) free_.push_back(*b);
  seqs_.erase(it);
}

int64_t PagedCache::length(int64_t seq) const { return get(seq).length; }
std::span<const int32_t> PagedCache::blocks(int64_t seq) const { return get(seq).blocks; }

int32_t PagedCache::slot(int64_t seq, int64_t pos) const {
  const Sequence& s = get(seq);
  DIFFMOE_CHECK(pos >= 0 && pos < static_cast<int64_t>(s.blocks.size()) * block_size_,
                "[paged_cache] position {} of sequence {} has no block", pos, seq);
  return static_cast<int32_t>(s.blocks[static_cast<size_t>(pos / block_size_)] * block_size_ + pos % block_size_);
}

}  // namespace diffmoe::serve
