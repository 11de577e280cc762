// The tokenizer interface and the loader that picks an implementation by file content
// (docs/formats.md §1c, §3.3). Implementations: tiktoken rank files (tiktoken_tokenizer.h), HF
// byte-level BPE tokenizer.json (hf_tokenizer.h), and our own trained BPE (bpe_trainer.h), which
// is saved as an HF-compatible tokenizer.json and read back through the HF loader.
//
// Contract shared by all implementations:
//  * encode(text): ordinary text; special tokens such as "<|endoftext|>" are encoded as the plain
//    characters they are made of (tiktoken's encode_ordinary). HF *non-special* added tokens are
//    part of the ordinary vocabulary and are still matched atomically, as HF does.
//  * encode_with_special(text): additionally treats every special token as one atomic id
//    (tiktoken's encode(text, allowed_special="all"); HF's AddedVocabulary split).
//  * decode(encode(x)) == x byte for byte for ANY input, including invalid UTF-8. The regex
//    pre-tokenizers need valid UTF-8 (PCRE2 caveat, docs/formats.md §1c), so the text is split into
//    maximal valid UTF-8 runs and maximal invalid byte runs; valid runs are pre-tokenized with the
//    pattern, each invalid run is BPE-encoded as one piece of its own (its bytes still merge
//    according to the ranks). On valid UTF-8 the ids are exactly tiktoken's / HF's. (Exception:
//    an HF file with ByteLevel add_prefix_space=true inserts a space, as HF does; decode keeps it.)
//  * Implementations are immutable after loading: encode/decode are safe to call concurrently.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::data {

enum class TokenizerKind { kTiktoken, kHuggingFace, kDiffmoe };

// Bounds on a tokenizer's ids, checked when a file is loaded (one id of 10^9 would otherwise
// allocate gigabytes): every id is below kMaxTokenizerVocab (4,194,304: 16x the largest public
// vocabularies), and the ids are dense, [0, vocab_size) with at most kMaxUnusedTokenIds unused
// (cl100k_base leaves 16 between its ranks and its special tokens, o200k_base 18).
inline constexpr int32_t kMaxTokenizerVocab = int32_t{1} << 22;
inline constexpr int32_t kMaxUnusedTokenIds = 1024;
std::string_view tokenizer_kind_name(TokenizerKind kind);  // "tiktoken", "huggingface", "diffmoe"

struct SpecialToken {
  std::string text;
  int32_t id = -1;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::vector<int32_t> encode_with_special(std::string_view text) const = 0;
  // Concatenated token bytes (no UTF-8 repair: the caller decides how to show partial sequences).
  // Throws diffmoe::Error naming the id when an id is not a token (out of range or unused).
  std::string decode(std::span<const int32_t> ids) const;

  // One past the largest id (cl100k: 100277, with unused ids in between; see is_token()).
  virtual int32_t vocab_size() const = 0;
  virtual bool is_token(int32_t id) const = 0;
  // Raw bytes of one token (special tokens: their text). Throws when !is_token(id).
  virtual std::string_view token_bytes(int32_t id) const = 0;
  // The end-of-text id ("<|endoftext|>" for OpenAI vocabularies and diffmoe), if the vocabulary has one.
  virtual std::optional<int32_t> eos_id() const = 0;
  virtual std::span<const SpecialToken> special_tokens() const = 0;
  // Id of a special token by text, if present.
  std::optional<int32_t> special_id(std::string_view text) const;

  virtual const std::string& name() const = 0;  // e.g. "cl100k_base", "hf-gpt35turbo"
  virtual TokenizerKind kind() const = 0;
};

// Loads a tokenizer, recognising the format by content (not by extension):
//  * a tiktoken rank file (lines "base64 rank"); pattern and special tokens come from the preset
//    named by the file stem (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base) or, failing that,
//    the preset whose rank count matches;
//  * an HF tokenizer.json (a JSON object with a "model" object);
//  * a diffmoe tokenizer (HF tokenizer.json with a top-level "diffmoe" object, bpe_trainer.h).
// Throws diffmoe::Error with a one-line message naming the file otherwise.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path);

}  // namespace diffmoe::data
