// Regex pre-tokenization with PCRE2 (8-bit), and UTF-8 validation (docs/formats.md §1c "Which C++
// regex engine", "Required PCRE2 flags", "PCRE2 caveats").
//
// A Pretokenizer owns one compiled pattern (PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, JIT).
// It is immutable after construction and may be shared across threads: every match loop
// (Pretokenizer::Matches) allocates its own match data, and its own JIT stack when the default
// one is too small.
//
// Matching requires valid UTF-8 (patterns run with PCRE2_NO_UTF_CHECK); callers split their text
// with for_each_utf8_run() first and handle invalid byte runs themselves.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace diffmoe::data {

// Exact pattern strings of docs/formats.md §1c.
namespace patterns {
// r50k_pat_str: gpt2, r50k_base, p50k_base (current possessive form of tiktoken).
inline constexpr std::string_view kR50k =
    R"('(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s)";
// The original GPT-2 pattern; HF's ByteLevel(use_regex=true) applies this one.
inline constexpr std::string_view kGpt2Legacy =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kCl100k =
    R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)";
// Older equivalent (npm tiktoken, HF cl100k json); also what we write into saved HF files because
// JavaScript regex engines (transformers.js) reject possessive quantifiers.
inline constexpr std::string_view kCl100kLegacy =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kO200k =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
}  // namespace patterns

// Pattern for a tokenizer or pattern name: "gpt2", "r50k_base", "p50k_base", "cl100k_base",
// "o200k_base", "gpt2_legacy", "cl100k_legacy". Throws on an unknown name.
std::string_view pattern_by_name(std::string_view name);

// Calls fn(run, valid) over consecutive runs covering `text` exactly: maximal valid UTF-8 runs
// (valid=true) and maximal runs of bytes that belong to no valid sequence (valid=false).
// Valid means RFC 3629: shortest form, no surrogates, at most U+10FFFF (what PCRE2 accepts).
template <class Fn>
void for_each_utf8_run(std::string_view text, Fn&& fn);
// Length of the valid UTF-8 sequence starting at s[0], or 0 if s[0] does not start one.
size_t utf8_sequence_length(std::string_view s);

class Pretokenizer {
 public:
  explicit Pretokenizer(std::string_view pattern);
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;

  const std::string& pattern() const { return pattern_; }

  // Iterates the matches of the pattern over valid UTF-8 `text`, left to right, as a regex
  // `find_iter` does. next() returns false at the end. Not thread-safe itself; make one per call.
  class Matches {
   public:
    Matches(const Pretokenizer& pre, std::string_view text);
    ~Matches();
    Matches(const Matches&) = delete;
    Matches& operator=(const Matches&) = delete;
    // On success sets [*begin, *end) to the next match (never empty).
    bool next(size_t* begin, size_t* end);

   private:
    const Pretokenizer& pre_;
    std::string_view text_;
    size_t pos_ = 0;
    void* match_data_ = nullptr;  // pcre2_match_data_8*
    void* jit_stack_ = nullptr;   // pcre2_jit_stack_8*, created on PCRE2_ERROR_JIT_STACKLIMIT
    void* match_ctx_ = nullptr;   // pcre2_match_context_8*
  };

 private:
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

// ---- implementation of the template ----
template <class Fn>
void for_each_utf8_run(std::string_view text, Fn&& fn) {
  size_t i = 0;
  while (i < text.size()) {
    const size_t start = i;
    // Fast path: ASCII bytes are always valid.
    while (i < text.size()) {
      const auto c = static_cast<unsigned char>(text[i]);
      if (c < 0x80) {
        ++i;
        continue;
      }
      const size_t n = utf8_sequence_length(text.substr(i));
      if (n == 0) break;
      i += n;
    }
    if (i > start) fn(text.substr(start, i - start), true);
    const size_t bad = i;
    while (i < text.size() && static_cast<unsigned char>(text[i]) >= 0x80 &&
           utf8_sequence_length(text.substr(i)) == 0) {
      ++i;
    }
    if (i > bad) fn(text.substr(bad, i - bad), false);
  }
}

}  // namespace diffmoe::data
