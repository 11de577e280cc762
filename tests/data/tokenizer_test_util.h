// Helpers for the tokenizer tests: where the reference vocabularies and fixtures live, a cache of
// loaded tokenizers, and seeded random byte strings.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>

#include "data/tokenizer.h"

namespace diffmoe::test {

inline std::filesystem::path repo_dir() { return DIFFMOE_REPO_DIR; }

inline std::filesystem::path vocab_dir() {
  const char* env = std::getenv("DIFFMOE_VOCAB_DIR");
  return env != nullptr && *env != '\0' ? std::filesystem::path(env) : repo_dir() / "data" / "vocab";
}

inline std::filesystem::path fixtures_dir() {
  const char* env = std::getenv("DIFFMOE_FIXTURES");
  return env != nullptr && *env != '\0' ? std::filesystem::path(env) : repo_dir() / "tests" / "fixtures";
}

inline std::string missing_vocab_message(const std::filesystem::path& p) {
  return "reference vocabulary " + p.string() +
         " is missing: run tools/tokenizer-oracle/setup.sh (or point DIFFMOE_VOCAB_DIR at its output)";
}

// Loads (once per process) a tokenizer from the vocab folder; nullptr if the file is missing.
// Callers ASSERT on the result with missing_vocab_message(), so a missing vocab fails the test.
inline const data::Tokenizer* cached_vocab_tokenizer(const std::string& rel) {
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<data::Tokenizer>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(rel);
  if (it != cache.end()) return it->second.get();
  const auto path = vocab_dir() / rel;
  if (!std::filesystem::exists(path)) return nullptr;
  return cache.emplace(rel, data::load_tokenizer(path)).first->second.get();
}

// Random bytes of length n: mostly arbitrary bytes (invalid UTF-8 almost surely), mixed with
// ASCII words, valid multi-byte characters and long runs (the heap path of bpe.h).
inline std::string random_bytes(std::mt19937_64& rng, size_t n) {
  static const char* kFragments[] = {
      "the ", " and", "\xc3\xa9",      "\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\r\n",     "  ",
      "'s",   "123",  "<|endoftext|>", "\xc2\xa0",     "\xed\xa0\x80",     "\xc0\xaf", "\xf4\x90\x80\x80"};
  std::string s;
  while (s.size() < n) {
    const uint64_t r = rng();
    switch (r % 4) {
      case 0: s.push_back(static_cast<char>(r >> 8)); break;
      case 1: s += kFragments[(r >> 8) % (sizeof(kFragments) / sizeof(kFragments[0]))]; break;
      case 2: s.append(1 + (r >> 8) % 3, static_cast<char>(0x80 + (r >> 16) % 0x80)); break;
      default:
        if ((r >> 8) % 16 == 0) s.append(100 + (r >> 16) % 200, "a \xff"[(r >> 32) % 3]);
        else s.push_back(static_cast<char>('a' + (r >> 8) % 26));
    }
  }
  s.resize(n);
  return s;
}

}  // namespace diffmoe::test
