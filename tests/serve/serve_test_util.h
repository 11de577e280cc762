// Shared helpers of the serving tests: a small BPE tokenizer trained on built-in pseudo-English text
// (ASCII and multi-byte UTF-8 words), and the micro model config the serving tests use (its
// vocabulary is the tokenizer's 300 ids; O(1) random weights so greedy decoding is varied).
#pragma once
#include <filesystem>
#include <memory>
#include <string>

#include "data/bpe_trainer.h"
#include "data/tokenizer.h"
#include "model/config.h"
#include "model/micro_config.h"

namespace diffmoe::serve::test {

inline std::string sample_text(size_t bytes, uint64_t seed = 7) {
  static const char* kWords[] = {"the",     "of",      "and",   "to",          "a",       "in",     "that",   "was",
                                 "he",      "she",     "it",    "with",        "as",      "for",    "sea",    "ship",
                                 "whale",   "captain", "house", "letter",      "morning", "garden", "walked", "looked",
                                 "thought", "little",  "great", "café",        "naïve",   "über",   "señor",  "façade",
                                 "Zürich",  "déjà",    "vu",    "smörgåsbord", "日本",    "東京"};
  constexpr uint64_t kN = sizeof(kWords) / sizeof(kWords[0]);
  uint64_t s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  const auto next = [&](uint64_t n) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (s >> 33) % n;
  };
  std::string text;
  while (text.size() < bytes) {
    const uint64_t words = 4 + next(10);
    for (uint64_t w = 0; w < words; ++w) {
      text += kWords[next(kN)];
      text += w + 1 == words ? ".\n" : " ";
    }
  }
  return text;
}

// Trains (or reads, when it exists) the test tokenizer at `path`: 256 bytes, merges, <|endoftext|>.
inline std::unique_ptr<data::Tokenizer> test_tokenizer(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) {
    data::BpeTrainer trainer({.vocab_size = 300});
    trainer.add_text(sample_text(40000));
    data::save_trained_bpe(trainer.train(), path);
  }
  return data::load_tokenizer(path);
}

inline ModelConfig serve_config(int64_t vocab = 300, int64_t max_seq_len = 64) {
  nlohmann::ordered_json j = {{"vocab_size", vocab},
                              {"dim", 32},
                              {"n_layers", 2},
                              {"n_dense_layers", 1},
                              {"n_heads", 4},
                              {"q_lora_rank", 16},
                              {"kv_lora_rank", 16},
                              {"qk_nope_head_dim", 8},
                              {"qk_rope_head_dim", 8},
                              {"v_head_dim", 8},
                              {"inter_dim", 64},
                              {"moe_inter_dim", 16},
                              {"n_routed_experts", 4},
                              {"n_shared_experts", 1},
                              {"n_activated_experts", 2},
                              {"n_expert_groups", 2},
                              {"n_limited_groups", 1},
                              {"max_seq_len", max_seq_len}};
  return ModelConfig::from_json(j, "serve_test");
}

}  // namespace diffmoe::serve::test
