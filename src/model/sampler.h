// Sampling the next token from logits on the host: temperature (0 = greedy), top-k, top-p
// (nucleus). Randomness is the counter-based RNG (core/rng.h): a draw is uniform_at(seed, stream,
// counter), so a (seed, counter) pair reproduces a sample exactly, on any machine, in any order.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"

namespace diffmoe {

struct SamplerOptions {
  double temperature = 1.0;  // p ∝ exp(logit / temperature); 0 = greedy (argmax, ties to the lower id)
  int64_t top_k = 0;         // keep the k most likely tokens; 0 = all (1 = greedy)
  double top_p = 1.0;        // nucleus: keep the most likely tokens until their mass reaches top_p (0 < top_p ≤ 1)
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplerOptions opt);

  // One token id from logits [V]; a logit of −inf masks its token (probability 0), NaN or +inf, or every
  // logit −inf, throws. `counter` selects the random number (a generation loop uses
  // counter = step·batch + b), so the same (seed, counter, logits) always give the same token.
  int32_t sample(std::span<const float> logits, uint64_t counter) const;
  int32_t sample(std::span<const double> logits, uint64_t counter) const;
  // Downloads logits [B, V] (f32 or f64) and samples row b with counter = step·B + b.
  std::vector<int32_t> sample_rows(Backend& be, const Tensor& logits, uint64_t step) const;

  const SamplerOptions& options() const { return opt_; }

 private:
  SamplerOptions opt_;
};

}  // namespace diffmoe
