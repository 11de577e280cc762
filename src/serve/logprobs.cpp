#include "serve/logprobs.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace diffmoe::serve {

double log_sum_exp(std::span<const float> logits) {
  double m = -std::numeric_limits<double>::infinity();
  for (const float z : logits) m = std::max(m, static_cast<double>(z));
  if (!std::isfinite(m)) return m;
  double s = 0.0;
  for (const float z : logits) s += std::exp(static_cast<double>(z) - m);
  return m + std::log(s);
}

std::vector<std::pair<int32_t, double>> top_logprobs(std::span<const float> logits, int64_t k, double lse) {
  const int64_t V = static_cast<int64_t>(logits.size());
  k = std::min(k, V);
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la > lb || (la == lb && a < b);
  });
  std::vector<std::pair<int32_t, double>> out;
  for (int64_t i = 0; i < k; ++i) {
    const int32_t id = idx[static_cast<size_t>(i)];
    const double z = logits[static_cast<size_t>(id)];
    if (!std::isfinite(z)) break;
    out.emplace_back(id, z - lse);
  }
  return out;
}

}  // namespace diffmoe::serve
