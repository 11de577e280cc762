// HuggingFace tokenizer.json, byte-level BPE only (docs/formats.md §1c "HuggingFace tokenizer.json").
//
// Supported: model.type "BPE" (vocab + merges as "a b" strings or [a, b] pairs, ignore_merges);
// pre_tokenizer chains of Sequence / Split(Regex or String; behavior Isolated, or Removed
// with invert=true) / ByteLevel(add_prefix_space, use_regex -> the GPT-2 pattern); added_tokens
// (lstrip/rstrip/single_word honoured; special ones are recognised by encode_with_special only);
// decoder ByteLevel; post_processor is ignored (ids come back without BOS/EOS templates).
// Anything else (WordPiece/Unigram models, normalizers, dropout, byte_fallback, other
// pre-tokenizers) fails with an error naming the file and the JSON field.
//
// Merge rule: HF's pair ranks (the index in `merges`), not tiktoken's byte ranks; see bpe.h.
// A top-level "diffmoe" object marks files written by bpe_trainer.h (kind() == kDiffmoe); HF
// tools ignore unknown top-level keys.
#pragma once
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "data/tokenizer.h"

namespace diffmoe::data {

// Reads `path`; eos_id() comes from a sibling tokenizer_config.json ("eos_token") when present,
// else from the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> among the added tokens.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& path);

// Same from JSON text; `origin` names the source in error messages and is the default name().
// `eos_hint`: the end-of-text token's text when known (tokenizer_config.json's eos_token).
std::unique_ptr<Tokenizer> load_hf_tokenizer_from_string(std::string_view json_text, std::string_view origin,
                                                         std::optional<std::string> eos_hint = std::nullopt);
// eos_token of the tokenizer_config.json beside an HF tokenizer.json, if there is one that says.
std::optional<std::string> read_hf_eos_hint(const std::filesystem::path& tokenizer_path);

}  // namespace diffmoe::data
