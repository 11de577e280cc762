// What a training run's host memory is made of, for the error when it runs out: the sizes of the
// weights, gradients, optimizer state and activations, and the config keys that set each, so that
// the user knows what to shrink (or asks `diffmoe plan` beforehand).
#pragma once
#include <cstddef>
#include <optional>
#include <string>

#include "train/train_config.h"

namespace diffmoe {

// "out of host memory (allocating 12.0 GiB): the run needs about 3.1 GiB of weights (model.dim = …,
// …), 3.1 GiB of gradients, 6.2 GiB of AdamW moments (optim.moment_dtype = f32), and activations for
// train.micro_batch × train.seq_len = 8 × 2048 tokens; …; `diffmoe plan --config <file>` estimates a
// config's memory before a run".
// `failed_bytes`: the allocation that failed, when known.
std::string out_of_memory_message(const RunConfig& rc, const std::string& config_path,
                                  std::optional<size_t> failed_bytes);

}  // namespace diffmoe
