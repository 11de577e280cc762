// Learning-rate schedule: linear warmup to `lr`, then cosine decay to `min_lr` at max_steps.
//   step < warmup:  lr · (step + 1) / warmup
//   else:           min_lr + ½(lr − min_lr)(1 + cos(π · (step − warmup) / (max_steps − warmup)))
// `step` is 0-based (the optimizer step about to be taken).
#pragma once
#include <cstdint>

namespace diffmoe {

double learning_rate(int64_t step, int64_t warmup_steps, int64_t max_steps, double lr, double min_lr);

}  // namespace diffmoe
