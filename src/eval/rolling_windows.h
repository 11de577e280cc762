// Windows over a long token sequence for perplexity: every token is scored exactly once, each with
// as much preceding context as the window allows.
//
// The sequence is s = [prefix, t_0, …, t_{n−1}] (prefix = the end-of-text token, so that t_0 is
// predicted too, as lm-evaluation-harness's loglikelihood_rolling does). Targets are s[1..n]. They
// are scored in chunks of `stride` tokens: chunk (a, b] (b = min(a + stride, n)) by one window
// whose input is s[max(0, b − window) .. b − 1] and whose scored targets are s[a + 1 .. b]. So
//  * stride = window: disjoint chunks of `window` targets, every chunk but the first and the last
//    with its own full window; the last chunk's window is right-aligned to the end of the sequence
//    (lm-eval's rolling windows with context_len 1);
//  * stride < window: every target after the first window sees at least window − stride tokens of
//    context (the sliding window of the Hugging Face perplexity guide), at n / stride forwards.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "eval/batch_scorer.h"

namespace diffmoe::eval {

struct TokenWindow {
  int64_t begin = 0;         // first input position in s
  int64_t end = 0;           // one past the last input position; the last target is s[end]
  int64_t first_scored = 0;  // first scored target index in s (a + 1); targets s[first_scored..end]
  bool operator==(const TokenWindow&) const = default;
};

// The windows for n targets (n ≥ 1), 1 ≤ stride ≤ window.
std::vector<TokenWindow> rolling_windows(int64_t n, int64_t window, int64_t stride);

// The scorer's rows for one document: `tokens` = t_0..t_{n−1}, prefix = the token before t_0.
std::vector<ScoreRow> rolling_rows(std::span<const int32_t> tokens, int32_t prefix, int64_t window, int64_t stride);

}  // namespace diffmoe::eval
