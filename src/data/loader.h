// The resumable token loader: micro-batches of [B, T] inputs and targets from token shards.
//
// The shards of a split are one concatenated token stream of N tokens. Window w covers tokens
// [w*T, w*T + T + 1) (consecutive windows share one token: the last target of w is the first
// input of w+1), so there are W = (N - 1) / T windows; the tail that does not fill a window is
// never read. Row b of a batch is one window: inputs[b] = window[0, T), targets[b] = window[1, T+1).
//
// Training (shuffle = true): epoch e visits every window exactly once, in the order of a
// pseudorandom permutation of [0, W) that is a pure function of (seed, e) (WindowPermutation:
// a Feistel network over Philox, O(1) memory for any W). Batches run straight across epoch
// boundaries, so no window is dropped; the loader never ends. Its whole state is
// {seed, epoch, position}: restoring a saved state and continuing gives exactly the batches an
// uninterrupted run would have given.
//
// Validation (shuffle = false): windows 0, 1, 2, ... in order, batches of B, the last partial
// batch dropped, at most max_batches per pass; next() returns false at the end of a pass and
// reset() starts the same pass again.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "data/token_shard.h"

namespace diffmoe::data {

// The shard files of a split ("train" or "val") in a prepare output directory: the list in
// meta.json when there is one, else the sorted <split>_*.bin files. Throws if there are none.
std::vector<std::filesystem::path> find_shards(const std::filesystem::path& dir, std::string_view split);

// A bijection of [0, n) keyed by (seed, epoch): a balanced Feistel network (6 rounds, Philox
// round function) on the smallest even bit width covering n, with cycle walking back into range
// (fewer than 4 steps expected).
class WindowPermutation {
 public:
  WindowPermutation(uint64_t n, uint64_t seed, uint64_t epoch);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }

 private:
  uint64_t encrypt(uint64_t x) const;
  uint64_t n_;
  uint64_t seed_, epoch_;
  int half_bits_;
  uint64_t mask_;
};

// Where the loader is. Saved in checkpoints as JSON; n_windows and seq identify the data it
// belongs to, so restoring onto different shards or another sequence length fails loudly.
struct LoaderState {
  uint64_t seed = 0;
  uint64_t epoch = 0;
  uint64_t position = 0;        // windows of this epoch (validation: of this pass) already delivered
  uint64_t n_windows = 0;       // 0 = not checked
  int64_t seq = 0;              // 0 = not checked
  std::string to_json() const;  // {"seed":..,"epoch":..,"position":..,"n_windows":..,"seq":..}
  static LoaderState from_json(std::string_view text);  // throws naming the bad field
  bool operator==(const LoaderState&) const = default;
};

struct TokenLoaderOptions {
  int64_t batch = 1;   // B
  int64_t seq = 1024;  // T
  uint64_t seed = 0;
  bool shuffle = true;           // false: the validation loader described above
  int64_t max_batches = 0;       // validation: batches per pass; 0 = all full batches
  bool prefetch = false;         // assemble the next batch on a background thread (same batches)
  bool verify_checksums = true;  // checked once per shard at open
};

class TokenLoader {
 public:
  TokenLoader(const std::vector<std::filesystem::path>& shards, TokenLoaderOptions options);
  ~TokenLoader();
  TokenLoader(const TokenLoader&) = delete;
  TokenLoader& operator=(const TokenLoader&) = delete;

  // Fills inputs [B, T] and targets [B, T] (int32, row-major, caller-owned host memory; each
  // span holds exactly B*T values). Returns false (and writes nothing) at the end of a
  // validation pass; a training loader always returns true.
  bool next(std::span<int32_t> inputs, std::span<int32_t> targets);
  // Same with host tensors: i32, shape [B, T], CPU (checked).
  bool next(const Tensor& inputs, const Tensor& targets);

  LoaderState state() const;               // the position after the last batch returned
  void restore(const LoaderState& state);  // continue from a saved state
  void reset();                            // back to epoch 0 / the start of the pass

  uint64_t n_tokens() const { return offsets_.back(); }
  uint64_t n_windows() const { return n_windows_; }
  // Validation: batches in one pass. Training: batches per epoch, rounded down.
  uint64_t batches_per_pass() const;
  uint32_t vocab_size() const { return shards_.front().header().vocab_size; }
  uint32_t eos_id() const { return shards_.front().header().eos_id; }
  const TokenLoaderOptions& options() const { return options_; }

 private:
  struct Prefetcher;
  // Writes the next batch's B rows of T+1 tokens at rows and advances cursor; false at the end
  // of a validation pass. Pure in (cursor, data): the prefetch thread calls it on its own copy.
  bool assemble(LoaderState& cursor, int32_t* rows) const;
  void read_tokens(uint64_t begin, uint64_t count, int32_t* out) const;
  void restart_prefetch();

  TokenLoaderOptions options_;
  std::vector<Shard> shards_;
  std::vector<uint64_t> offsets_;  // offsets_[i] = first stream token of shard i; back() = N
  uint64_t n_windows_ = 0;
  LoaderState cursor_;         // after the last batch handed out
  std::vector<int32_t> rows_;  // [B, T+1] scratch for the synchronous path
  std::unique_ptr<Prefetcher> prefetch_;
};

}  // namespace diffmoe::data
