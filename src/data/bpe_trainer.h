// Byte-level BPE trainer and the diffmoe tokenizer file (docs/formats.md §3.3 "Also train our own
// tokenizer").
//
// Training: the corpus is pre-tokenized with the GPT-2 (or cl100k) pattern and pre-token
// frequencies are counted; special tokens in the text are skipped and invalid UTF-8 byte runs
// count as words of their own (as the encoders treat them, tokenizer.h). Then, starting from the
// 256 single bytes, the most frequent adjacent pair over all words (weighted by frequency) is
// merged repeatedly. Pair counts are kept incrementally: a merge only revisits the words that
// contain the pair. Ties are broken by the pair's bytes (left token bytes, then right token
// bytes, lexicographically smallest first), so training is deterministic and does not depend on
// insertion order or hashing.
//
// Ids: 0..255 are the single bytes in byte order, then one id per merge result in merge order,
// then the special tokens (default "<|endoftext|>") in the given order.
//
// File: an HF-compatible tokenizer.json (model BPE with byte-level vocab and "a b" merges,
// ByteLevel pre-tokenizer/decoder) plus a top-level "diffmoe" object {format, version, name,
// pattern}. HF tools load it and ignore the extra key; load_tokenizer() reads it through the HF
// loader and reports kind() == kDiffmoe.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/text_source.h"
#include "data/tokenizer.h"

namespace diffmoe::data {

struct BpeTrainerOptions {
  int32_t vocab_size = 4096;     // total ids: 256 bytes + merges + special tokens
  std::string pattern = "gpt2";  // "gpt2" or "cl100k" (the split pattern, docs/formats.md §1c)
  std::vector<std::string> special_tokens = {"<|endoftext|>"};
  int64_t min_frequency = 2;  // stop early when the best pair occurs fewer times than this
  std::string name = "diffmoe-bpe";
};

struct TrainedBpe {
  struct Merge {
    int32_t left = -1, right = -1, result = -1;
  };
  std::string name;
  std::string pattern;              // "gpt2" or "cl100k"
  std::vector<std::string> tokens;  // id -> bytes for ids < 256 + merges
  std::vector<Merge> merges;        // in rank order
  std::vector<SpecialToken> specials;
  int32_t vocab_size() const { return static_cast<int32_t>(tokens.size() + specials.size()); }
};

class BpeTrainer {
 public:
  explicit BpeTrainer(BpeTrainerOptions options);
  ~BpeTrainer();
  BpeTrainer(const BpeTrainer&) = delete;
  BpeTrainer& operator=(const BpeTrainer&) = delete;

  // Counts the pre-tokens of one document (may be called repeatedly).
  void add_text(std::string_view text);
  size_t unique_words() const { return counts_.size(); }
  // Runs the merges; does not change the counts, so it can be called again.
  TrainedBpe train() const;

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  BpeTrainerOptions options_;
  struct Impl;
  std::unique_ptr<Impl> impl_;  // compiled pattern and special-token matcher (kept out of this header)
  std::unordered_map<std::string, int64_t, Hash, std::equal_to<>> counts_;
};

// The HF-compatible tokenizer.json text / file for a trained BPE (see the file comment).
std::string trained_bpe_to_json(const TrainedBpe& bpe);
void save_trained_bpe(const TrainedBpe& bpe, const std::filesystem::path& path);

// Feeds every document of `files` (read with `reader`) to `trainer`: what `diffmoe tokenizer
// train` and a run's first-use tokenizer training both do.
struct CorpusStats {
  uint64_t documents = 0;
  uint64_t bytes = 0;
};
CorpusStats add_documents(BpeTrainer& trainer, const std::vector<std::filesystem::path>& files,
                          const ReaderOptions& reader);

}  // namespace diffmoe::data
