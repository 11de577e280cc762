// Validation loss and perplexity over a fixed set of validation windows (no shuffling), used by
// the trainer every eval.every steps and by `diffmoe eval`.
#pragma once
#include <cstdint>

#include "data/loader.h"
#include "model/model.h"

namespace diffmoe {

struct EvalResult {
  double loss_sum = 0;    // Σ cross-entropy over the target tokens (nats)
  double loss = 0;        // mean cross-entropy per target token (nats)
  double perplexity = 0;  // exp(loss)
  int64_t tokens = 0;
  int64_t batches = 0;
};

// Runs forward passes over up to `max_batches` batches (0 = the whole pass) from the start of the
// loader's pass; the model's batch shape must match the loader's. Leaves parameters untouched.
// With ranks: this rank evaluates the batches b with b % world == rank (the others' batches are read
// and skipped); the caller sums loss_sum and tokens over the ranks.
EvalResult evaluate(Model& model, data::TokenLoader& loader, int64_t max_batches, int rank = 0, int world = 1);

}  // namespace diffmoe
