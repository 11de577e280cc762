// State and encode plumbing shared by the BPE tokenizers (tiktoken, HF, diffmoe): the id -> bytes
// table, the atomic (special / added) token matcher and the special-token splitting loop.
// Subclasses only implement encode_ordinary() for text that contains no atomic tokens.
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace diffmoe::data {

// A token matched as a whole before pre-tokenization (docs/formats.md §1c "added_tokens").
struct AtomicToken {
  std::string text;
  int32_t id = -1;
  bool special = true;       // false: HF non-special added token (matched by encode() too)
  bool lstrip = false;       // absorb whitespace on the left into the token (HF)
  bool rstrip = false;       // absorb whitespace on the right into the token (HF)
  bool single_word = false;  // only match when not inside a word (HF)
};

// Finds atomic tokens: the leftmost occurrence, the longest token among those starting there.
class AtomicMatcher {
 public:
  AtomicMatcher() = default;
  explicit AtomicMatcher(std::vector<AtomicToken> tokens);
  bool empty() const { return tokens_.empty(); }
  struct Hit {
    size_t begin = 0, end = 0;  // the token text itself, [begin, end)
    const AtomicToken* token = nullptr;
  };
  // Next hit at or after `from`; a single_word token next to a word character is skipped.
  std::optional<Hit> find(std::string_view text, size_t from) const;

 private:
  std::vector<AtomicToken> tokens_;
  std::array<std::vector<uint32_t>, 256> by_first_byte_;  // indices into tokens_, longest first
  std::array<bool, 256> is_first_{};
};

class TokenizerBase : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text) const override;
  std::vector<int32_t> encode_with_special(std::string_view text) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(spans_.size()); }
  bool is_token(int32_t id) const override;
  std::string_view token_bytes(int32_t id) const override;
  std::optional<int32_t> eos_id() const override { return eos_; }
  std::span<const SpecialToken> special_tokens() const override { return specials_; }
  const std::string& name() const override { return name_; }
  TokenizerKind kind() const override { return kind_; }

 protected:
  TokenizerBase(std::string name, TokenizerKind kind) : name_(std::move(name)), kind_(kind) {}
  // Appends the ids of `text` (which is to be treated as plain text) to `out`.
  virtual void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const = 0;

  // Setup, called by subclass constructors only.
  void set_token(int32_t id, std::string_view bytes);  // throws on a negative or duplicate id
  // Registers the atomic tokens (also set_token()s them) and builds both matchers. The last setup
  // step: the ids are then checked dense (kMaxUnusedTokenIds).
  void set_atomic_tokens(std::vector<AtomicToken> tokens);
  void set_eos(std::optional<int32_t> id) { eos_ = id; }

 private:
  void encode_split(std::string_view text, const AtomicMatcher& matcher, std::vector<int32_t>& out) const;

  std::string name_;
  TokenizerKind kind_;
  struct Span {
    uint32_t offset = 0;
    int32_t length = -1;  // -1: unused id
  };
  std::string arena_;
  std::vector<Span> spans_;
  std::vector<SpecialToken> specials_;
  AtomicMatcher all_atomic_;       // encode_with_special
  AtomicMatcher ordinary_atomic_;  // encode: HF non-special added tokens only
  std::optional<int32_t> eos_;
};

}  // namespace diffmoe::data
