#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/rng.h"

namespace diffmoe {

namespace {

// The RNG stream of every sampler draw (rng.h: a stable id per purpose).
const uint64_t kSamplerStream = stream_id("sampler");

template <class T>
int32_t argmax(std::span<const T> logits) {
  // max_element returns the first maximum: ties go to the lower token id.
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

template <class T>
int32_t sample_impl(const SamplerOptions& o, std::span<const T> logits, uint64_t counter) {
  const int64_t V = static_cast<int64_t>(logits.size());
  DIFFMOE_CHECK(V >= 1, "[sampler] empty logits");
  // −inf is a masked token (probability 0: ids a tokenizer does not have, sampler.h); NaN and +inf are errors.
  for (int64_t i = 0; i < V; ++i) {
    const double z = static_cast<double>(logits[static_cast<size_t>(i)]);
    DIFFMOE_CHECK(!std::isnan(z) && z != std::numeric_limits<double>::infinity(),
                  "[sampler] logits[{}] = {} is not finite", i, z);
  }
  const int32_t best = argmax(logits);
  DIFFMOE_CHECK(std::isfinite(static_cast<double>(logits[static_cast<size_t>(best)])),
                "[sampler] every one of the {} logits is -inf (masked): nothing to sample", V);
  if (o.temperature == 0.0 || o.top_k == 1) return best;

  // Candidates: with top-k or top-p, in descending logit order (ties: lower id first), top-k keeping the first k;
  // with neither, the ids in order, since the draw's distribution does not depend on it (a sort of the vocabulary
  // per token would be most of a server step's host time with a 32768-id vocabulary).
  const int64_t k = o.top_k > 0 ? std::min(o.top_k, V) : V;
  thread_local std::vector<int32_t> idx;
  idx.resize(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  if (k < V || o.top_p < 1.0) {
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
      const T la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
      return la > lb || (la == lb && a < b);
    });
  }
  // Unnormalised p_i = exp((z_i − z_max) / temperature) over the kept candidates, in double (0 for a masked one).
  const double z_max = static_cast<double>(logits[static_cast<size_t>(best)]);
  thread_local std::vector<double> p;
  p.resize(static_cast<size_t>(k));
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    p[static_cast<size_t>(i)] = std::exp(
        (static_cast<double>(logits[static_cast<size_t>(idx[static_cast<size_t>(i)])]) - z_max) / o.temperature);
    total += p[static_cast<size_t>(i)];
  }
  // Top-p: the shortest prefix whose mass reaches top_p of the total (always at least one token).
  int64_t keep = k;
  if (o.top_p < 1.0) {
    double mass = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      mass += p[static_cast<size_t>(i)];
      if (mass >= o.top_p * total) {
        keep = i + 1;
        break;
      }
    }
    total = mass;
  }
  // Inverse CDF at u·total with u ∈ (0, 1]; the last kept token of non-zero probability absorbs any rounding
  // shortfall.
  const double target = uniform_at(o.seed, kSamplerStream, counter) * total;
  double cum = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < keep; ++i) {
    if (p[static_cast<size_t>(i)] == 0.0) continue;
    last = i;
    cum += p[static_cast<size_t>(i)];
    if (target <= cum) return idx[static_cast<size_t>(i)];
  }
  return idx[static_cast<size_t>(last)];
}

template <class T>
std::vector<int32_t> sample_rows_impl(const Sampler& s, Backend& be, const Tensor& logits, uint64_t step) {
  const int64_t B = logits.dim(0), V = logits.dim(1);
  std::vector<T> host(static_cast<size_t>(B * V));
  be.download(host.data(), logits);
  std::vector<int32_t> ids(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    ids[static_cast<size_t>(b)] = s.sample(std::span<const T>(host.data() + b * V, static_cast<size_t>(V)),
                                           step * static_cast<uint64_t>(B) + static_cast<uint64_t>(b));
  return ids;
}

}  // namespace

Sampler::Sampler(SamplerOptions opt) : opt_(opt) {
  DIFFMOE_CHECK(opt_.temperature >= 0.0 && std::isfinite(opt_.temperature), "[sampler] temperature {} must be >= 0",
                opt_.temperature);
  DIFFMOE_CHECK(opt_.top_k >= 0, "[sampler] top_k {} must be >= 0 (0 = off)", opt_.top_k);
  DIFFMOE_CHECK(opt_.top_p > 0.0 && opt_.top_p <= 1.0, "[sampler] top_p {} must be in (0, 1]", opt_.top_p);
}

int32_t Sampler::sample(std::span<const float> logits, uint64_t counter) const {
  return sample_impl(opt_, logits, counter);
}
int32_t Sampler::sample(std::span<const double> logits, uint64_t counter) const {
  return sample_impl(opt_, logits, counter);
}

std::vector<int32_t> Sampler::sample_rows(Backend& be, const Tensor& logits, uint64_t step) const {
  DIFFMOE_CHECK(logits.rank() == 2, "[sampler] logits must be [B, V], got {}", logits.describe());
  if (logits.dtype == DType::kF64) return sample_rows_impl<double>(*this, be, logits, step);
  DIFFMOE_CHECK(logits.dtype == DType::kF32, "[sampler] logits must be f32 or f64, got {}", logits.describe());
  return sample_rows_impl<float>(*this, be, logits, step);
}

}  // namespace diffmoe
