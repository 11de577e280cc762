// PCRE2 wrapper; see pretokenizer.h and docs/formats.md §1c for why these flags.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/pretokenizer.h"

#include <pcre2.h>

#include "core/error.h"

namespace diffmoe::data {

std::string_view pattern_by_name(std::string_view name) {
  if (name == "gpt2" || name == "r50k_base" || name == "p50k_base" || name == "p50k_edit") return patterns::kR50k;
  if (name == "cl100k_base") return patterns::kCl100k;
  if (name == "o200k_base") return patterns::kO200k;
  if (name == "gpt2_legacy") return patterns::kGpt2Legacy;
  if (name == "cl100k_legacy") return patterns::kCl100kLegacy;
  DIFFMOE_FAIL(
      "[pretokenizer] unknown pattern name '{}' (known: gpt2, r50k_base, p50k_base, cl100k_base, "
      "o200k_base, gpt2_legacy, cl100k_legacy)",
      name);
}

size_t utf8_sequence_length(std::string_view s) {
  if (s.empty()) return 0;
  const auto b0 = static_cast<unsigned char>(s[0]);
  if (b0 < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte (RFC 3629 table)
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;  // no overlong forms
    if (b0 == 0xF4) hi = 0x8F;  // at most U+10FFFF
  } else {
    return 0;
  }
  if (s.size() < n) return 0;
  const auto b1 = static_cast<unsigned char>(s[1]);
  if (b1 < lo || b1 > hi) return 0;
  for (size_t k = 2; k < n; ++k) {
    const auto b = static_cast<unsigned char>(s[k]);
    if (b < 0x80 || b > 0xBF) return 0;
  }
  return n;
}

Pretokenizer::Pretokenizer(std::string_view pattern) : pattern_(pattern) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  auto* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern_.data()), pattern_.size(),
                             PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, &err, &err_off, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    DIFFMOE_FAIL("[pretokenizer] cannot compile pattern at offset {}: {} (pattern: {})", err_off,
                 reinterpret_cast<const char*>(msg), pattern_);
  }
  code_ = code;
  // JIT is an optimisation only: when unavailable, pcre2_match interprets the same pattern.
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

Pretokenizer::~Pretokenizer() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

Pretokenizer::Matches::Matches(const Pretokenizer& pre, std::string_view text) : pre_(pre), text_(text) {
  match_data_ = pcre2_match_data_create_from_pattern(static_cast<pcre2_code*>(pre_.code_), nullptr);
  DIFFMOE_CHECK(match_data_ != nullptr, "[pretokenizer] out of memory for match data");
}

Pretokenizer::Matches::~Matches() {
  pcre2_match_data_free(static_cast<pcre2_match_data*>(match_data_));
  pcre2_match_context_free(static_cast<pcre2_match_context*>(match_ctx_));
  pcre2_jit_stack_free(static_cast<pcre2_jit_stack*>(jit_stack_));
}

bool Pretokenizer::Matches::next(size_t* begin, size_t* end) {
  auto* code = static_cast<pcre2_code*>(pre_.code_);
  auto* md = static_cast<pcre2_match_data*>(match_data_);
  while (pos_ < text_.size()) {
    // The subject is the whole text (so lookbehind/anchors see real context); matching starts at pos_.
    const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text_.data()), text_.size(), pos_, PCRE2_NO_UTF_CHECK,
                               md, static_cast<pcre2_match_context*>(match_ctx_));
    if (rc == PCRE2_ERROR_NOMATCH) {
      pos_ = text_.size();
      return false;
    }
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && jit_stack_ == nullptr) {
      // Very long runs can exceed the 32 KiB default JIT stack; retry once with a private one.
      jit_stack_ = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr);
      match_ctx_ = pcre2_match_context_create(nullptr);
      DIFFMOE_CHECK(jit_stack_ != nullptr && match_ctx_ != nullptr, "[pretokenizer] out of memory for JIT stack");
      pcre2_jit_stack_assign(static_cast<pcre2_match_context*>(match_ctx_), nullptr, jit_stack_);
      continue;
    }
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof(msg));
      DIFFMOE_FAIL("[pretokenizer] pcre2_match failed at byte {}: {}", pos_, reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t b = ov[0], e = ov[1];
    if (e == b) {
      // An empty match (none of our patterns produce one) must not stall: step one character.
      const size_t n = utf8_sequence_length(text_.substr(b));
      pos_ = b + (n == 0 ? 1 : n);
      continue;
    }
    *begin = b;
    *end = e;
    pos_ = e;
    return true;
  }
  return false;
}

}  // namespace diffmoe::data
