// The training loop: micro-batches from the shard loader, forward/backward with
// gradient accumulation, AdamW with warmup + cosine LR and global-norm clipping, the MoE bias
// update once per optimizer step, validation, metrics, atomic checkpoints and exact resume.
#pragma once
#include <memory>
#include <string>

#include "dist/dist_context.h"
#include "train/train_config.h"

namespace diffmoe {

struct TrainOptions {
  std::string resume;        // "" = fresh run; "latest" = newest valid checkpoint; or a directory
  std::string config_path;   // for the log only
  // The process's distributed context (the launch and the CPU world; dist/dist_context.h); null =
  // one process.
  dist::DistContext* dist = nullptr;
};

struct TrainResult {
  int64_t steps = 0;         // optimizer steps taken in total (including resumed ones)
  double last_loss = 0;      // mean LM loss of the last step
  double val_loss = 0;       // last validation loss (NaN when none)
  std::string last_checkpoint;
};

// Runs training to rc.train.max_steps (or for rc.train.stop_after steps of this invocation). A
// non-finite loss or gradient norm is never applied; train.max_bad_steps consecutive ones throw an
// Error naming the step. Checkpoints already written stay valid.
TrainResult train(const RunConfig& rc, const TrainOptions& opt);

}  // namespace diffmoe
