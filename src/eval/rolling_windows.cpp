#include "eval/rolling_windows.h"

#include <algorithm>

#include "core/error.h"

namespace diffmoe::eval {

std::vector<TokenWindow> rolling_windows(int64_t n, int64_t window, int64_t stride) {
  DIFFMOE_CHECK(n >= 1, "[eval] rolling windows over {} tokens", n);
  DIFFMOE_CHECK(window >= 1 && stride >= 1 && stride <= window, "[eval] stride {} must be in [1, window = {}]", stride,
                window);
  std::vector<TokenWindow> out;
  for (int64_t a = 0; a < n;) {
    const int64_t b = std::min(a + stride, n);
    out.push_back(TokenWindow{.begin = std::max<int64_t>(0, b - window), .end = b, .first_scored = a + 1});
    a = b;
  }
  return out;
}

std::vector<ScoreRow> rolling_rows(std::span<const int32_t> tokens, int32_t prefix, int64_t window, int64_t stride) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  // s[i] = prefix for i = 0, tokens[i − 1] after.
  const auto s = [&](int64_t i) { return i == 0 ? prefix : tokens[static_cast<size_t>(i - 1)]; };
  std::vector<ScoreRow> rows;
  for (const TokenWindow& w : rolling_windows(n, window, stride)) {
    ScoreRow r;
    for (int64_t i = w.begin; i < w.end; ++i) {
      r.inputs.push_back(s(i));
      r.targets.push_back(i + 1 >= w.first_scored ? s(i + 1) : -1);
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

}  // namespace diffmoe::eval
