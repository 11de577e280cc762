#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace diffmoe {

double learning_rate(int64_t step, int64_t warmup_steps, int64_t max_steps, double lr, double min_lr) {
  if (step < warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  const int64_t decay_steps = std::max<int64_t>(1, max_steps - warmup_steps);
  const double progress =
      std::clamp(static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps), 0.0, 1.0);
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace diffmoe
