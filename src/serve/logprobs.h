// Log-probabilities of tokens under a row of logits (log-softmax of the raw logits, in double), and
// the k most likely tokens: what a completion's `logprobs` reports. Ids the tokenizer does not know
// have been set to −inf by the caller and never appear.
#pragma once
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace diffmoe::serve {

// log Σ_i exp(z_i) over the finite logits.
double log_sum_exp(std::span<const float> logits);
// The k largest logits as (id, logit − lse), in descending order (ties: lower id first).
std::vector<std::pair<int32_t, double>> top_logprobs(std::span<const float> logits, int64_t k, double lse);

}  // namespace diffmoe::serve
