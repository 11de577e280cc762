// Tokenizer interface helpers, the shared TokenizerBase, and load_tokenizer() (format detection).
#include "data/tokenizer.h"

#include <algorithm>
#include <cctype>

#include "core/error.h"
#include "data/hf_tokenizer.h"
#include "data/tiktoken_tokenizer.h"
#include "data/tokenizer_base.h"
#include "io/file_util.h"

namespace diffmoe::data {

std::string_view tokenizer_kind_name(TokenizerKind kind) {
  switch (kind) {
    case TokenizerKind::kTiktoken: return "tiktoken";
    case TokenizerKind::kHuggingFace: return "huggingface";
    case TokenizerKind::kDiffmoe: return "diffmoe";
  }
  return "?";
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) out.append(token_bytes(id));
  return out;
}

std::optional<int32_t> Tokenizer::special_id(std::string_view text) const {
  for (const SpecialToken& s : special_tokens())
    if (s.text == text) return s.id;
  return std::nullopt;
}

// ---- AtomicMatcher ----
namespace {
bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
// Word character for HF single_word: ASCII alphanumerics and '_', and any non-ASCII byte (an
// approximation of Unicode alphanumerics that is exact for ASCII text).
bool is_word_byte(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u >= 0x80 || std::isalnum(u) != 0 || c == '_';
}
}  // namespace

AtomicMatcher::AtomicMatcher(std::vector<AtomicToken> tokens) : tokens_(std::move(tokens)) {
  for (uint32_t i = 0; i < tokens_.size(); ++i) {
    DIFFMOE_CHECK(!tokens_[i].text.empty(), "[tokenizer] empty special/added token (id {})", tokens_[i].id);
    const auto b = static_cast<unsigned char>(tokens_[i].text[0]);
    by_first_byte_[b].push_back(i);
    is_first_[b] = true;
  }
  for (auto& v : by_first_byte_)
    std::stable_sort(v.begin(), v.end(),
                     [&](uint32_t a, uint32_t b) { return tokens_[a].text.size() > tokens_[b].text.size(); });
}

std::optional<AtomicMatcher::Hit> AtomicMatcher::find(std::string_view text, size_t from) const {
  if (tokens_.empty()) return std::nullopt;
  for (size_t pos = from; pos < text.size(); ++pos) {
    const auto b = static_cast<unsigned char>(text[pos]);
    if (!is_first_[b]) continue;
    for (uint32_t i : by_first_byte_[b]) {
      const AtomicToken& t = tokens_[i];
      if (text.compare(pos, t.text.size(), t.text) != 0) continue;
      const size_t end = pos + t.text.size();
      if (t.single_word && ((pos > 0 && is_word_byte(text[pos - 1])) || (end < text.size() && is_word_byte(text[end]))))
        continue;
      return Hit{pos, end, &t};
    }
  }
  return std::nullopt;
}

// ---- TokenizerBase ----
void TokenizerBase::set_token(int32_t id, std::string_view bytes) {
  DIFFMOE_CHECK(id >= 0, "[tokenizer] {}: negative token id {}", name_, id);
  DIFFMOE_CHECK(id < kMaxTokenizerVocab, "[tokenizer] {}: token id {} is over the largest supported id {}", name_, id,
                kMaxTokenizerVocab - 1);
  if (static_cast<size_t>(id) >= spans_.size()) spans_.resize(static_cast<size_t>(id) + 1);
  DIFFMOE_CHECK(spans_[id].length < 0, "[tokenizer] {}: id {} assigned twice", name_, id);
  spans_[id] = {static_cast<uint32_t>(arena_.size()), static_cast<int32_t>(bytes.size())};
  arena_.append(bytes);
}

void TokenizerBase::set_atomic_tokens(std::vector<AtomicToken> tokens) {
  std::vector<AtomicToken> ordinary;
  for (const AtomicToken& t : tokens) {
    // HF lists added tokens that may already be in the model vocab with the same id: keep one entry.
    if (is_token(t.id)) {
      DIFFMOE_CHECK(token_bytes(t.id) == t.text, "[tokenizer] {}: added token '{}' reuses id {} of another token",
                    name_, t.text, t.id);
    } else {
      set_token(t.id, t.text);
    }
    if (t.special) specials_.push_back({t.text, t.id});
    else ordinary.push_back(t);
  }
  all_atomic_ = AtomicMatcher(std::move(tokens));
  ordinary_atomic_ = AtomicMatcher(std::move(ordinary));
  // The vocabulary is complete: its ids must be dense (tokenizer.h).
  int64_t unused = 0;
  for (const Span& sp : spans_) unused += sp.length < 0 ? 1 : 0;
  DIFFMOE_CHECK(unused <= kMaxUnusedTokenIds,
                "[tokenizer] {}: ids are not dense: {} of the ids below the largest ({}) are unused "
                "(at most {} may be)",
                name_, unused, spans_.size() - 1, kMaxUnusedTokenIds);
}

bool TokenizerBase::is_token(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < spans_.size() && spans_[id].length >= 0;
}

std::string_view TokenizerBase::token_bytes(int32_t id) const {
  DIFFMOE_CHECK(is_token(id), "[tokenizer] {}: id {} is not a token (vocab_size {})", name_, id, spans_.size());
  return std::string_view(arena_).substr(spans_[id].offset, static_cast<size_t>(spans_[id].length));
}

std::vector<int32_t> TokenizerBase::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  encode_split(text, ordinary_atomic_, out);
  return out;
}

std::vector<int32_t> TokenizerBase::encode_with_special(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  encode_split(text, all_atomic_, out);
  return out;
}

void TokenizerBase::encode_split(std::string_view text, const AtomicMatcher& matcher, std::vector<int32_t>& out) const {
  size_t pos = 0;
  while (auto hit = matcher.find(text, pos)) {
    size_t seg_end = hit->begin;
    if (hit->token->lstrip)
      while (seg_end > pos && is_ascii_space(text[seg_end - 1])) --seg_end;
    encode_ordinary(text.substr(pos, seg_end - pos), out);
    out.push_back(hit->token->id);
    pos = hit->end;
    if (hit->token->rstrip)
      while (pos < text.size() && is_ascii_space(text[pos])) ++pos;
  }
  encode_ordinary(text.substr(pos), out);
}

// ---- load_tokenizer ----
namespace {
bool looks_like_tiktoken_line(std::string_view line) {
  const size_t sp = line.find(' ');
  if (sp == std::string_view::npos || sp == 0 || sp + 1 >= line.size()) return false;
  for (char c : line.substr(0, sp))
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '/' || c == '=')) return false;
  for (char c : line.substr(sp + 1))
    if (!std::isdigit(static_cast<unsigned char>(c)) && c != '\r') return false;
  return true;
}
}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path) {
  const std::string text = io::read_small_file(path.string(), io::kMaxTokenizerBytes, "tokenizer file");
  const std::string_view head = std::string_view(text).substr(0, 4096);
  const size_t first = head.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && head[first] == '{')  // validates "model"
    return load_hf_tokenizer_from_string(text, path.string(), read_hf_eos_hint(path));
  const std::string_view first_line = head.substr(0, head.find('\n'));
  if (looks_like_tiktoken_line(first_line)) return load_tiktoken_from_string(text, path);
  DIFFMOE_FAIL(
      "[tokenizer] '{}' is not a tokenizer: expected a .tiktoken rank file (\"base64 rank\" lines), an HF "
      "tokenizer.json or a diffmoe tokenizer.json",
      path.string());
}

}  // namespace diffmoe::data
