// tiktoken rank files (`*.tiktoken`, docs/formats.md §1c): one "base64(token) rank" line per token.
// Special tokens and the split pattern are not in the file; they come from a named preset
// (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base) or are given explicitly.
#pragma once
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace diffmoe::data {

struct TiktokenPreset {
  std::string name;
  std::string_view pattern;
  std::vector<SpecialToken> specials;
  int32_t n_ranks = 0;  // lines in the official rank file, used to recognise an unnamed file
};
// nullopt for an unknown name.
std::optional<TiktokenPreset> tiktoken_preset(std::string_view name);

struct TiktokenOptions {
  // Preset to use. Empty: the file stem if it names a preset, else the preset with the file's rank count.
  std::string preset;
  // Overrides of the preset (or the whole configuration when no preset matches).
  std::optional<std::string> pattern;
  std::optional<std::vector<SpecialToken>> specials;
  std::optional<std::string> name;  // defaults to the preset name, else the file stem
};

// Loads and validates a rank file. Throws diffmoe::Error naming the file (and line) on malformed
// input, duplicate ranks or tokens, or when neither a preset nor an explicit pattern is available.
std::unique_ptr<Tokenizer> load_tiktoken(const std::filesystem::path& path, const TiktokenOptions& options = {});
// Same from the file's contents; `origin` names it in errors, and its stem picks the preset.
std::unique_ptr<Tokenizer> load_tiktoken_from_string(std::string_view content, const std::filesystem::path& origin,
                                                     const TiktokenOptions& options = {});

}  // namespace diffmoe::data
