// The directories a training run writes (train.out_dir, checkpoint.dir): locked for the run, so a
// second trainer on them fails at once naming the holder (io/run_lock.h), and checked for an
// earlier run's products. A fresh run over an earlier run's checkpoints or logs would silently
// truncate its metrics and move `latest` backwards, so it needs a decision: --resume continues
// the earlier run, --overwrite deletes its checkpoints and logs first.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/run_lock.h"
#include "train/run_setup.h"
#include "train/train_config.h"

namespace diffmoe {

// What in the run's directories belongs to an earlier run: checkpoints (step_* directories and
// `latest` in the checkpoint root), a non-empty metrics.jsonl and TensorBoard event files.
std::vector<std::string> earlier_run_products(const RunConfig& rc);

class RunDirectories {
 public:
  // Locks train.out_dir and checkpoint.dir (io/run_lock.h). A fresh run (!resume)
  // over earlier products throws naming them, unless `overwrite`, which removes them first.
  RunDirectories(const RunConfig& rc, bool resume, bool overwrite, const LogLine& log);

 private:
  std::unique_ptr<RunLock> out_lock_, checkpoint_lock_;
};

}  // namespace diffmoe
