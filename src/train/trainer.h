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
  std::string resume;       // "" = fresh run; "latest" = newest valid checkpoint; or a directory
  std::string config_path;  // for the log only
  bool overwrite = false;   // a fresh run over an earlier run's checkpoints and logs deletes them (run_dir.h)
  // The process's distributed context (the launch and the CPU world; dist/dist_context.h); null =
  // one process.
  dist::DistContext* dist = nullptr;
};

struct TrainResult {
  int64_t steps = 0;     // optimizer steps taken in total (including resumed ones)
  double last_loss = 0;  // mean LM loss of the last step
  double val_loss = 0;   // last validation loss (NaN when none)
  std::string last_checkpoint;
  int stop_signal = 0;  // the signal that stopped the run after its checkpoint (stop_signal.h); 0 = not stopped
};

// Runs training to rc.train.max_steps (or for rc.train.stop_after steps of this invocation). A
// non-finite loss or gradient norm is never applied; a non-finite validation loss counts as a bad
// step too; train.max_bad_steps consecutive ones throw an Error naming the step. Weights and
// optimizer state are checked finite before every checkpoint (finite_check.h): a run whose state
// is not finite throws without writing one. Checkpoints already written stay valid. SIGINT,
// SIGTERM or SIGUSR1 stop the run after the current step with a checkpoint (stop_signal.h).
TrainResult train(const RunConfig& rc, const TrainOptions& opt);

}  // namespace diffmoe
