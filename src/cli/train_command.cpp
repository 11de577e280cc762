// `diffmoe train --config X [--set key=value ...] [--resume [latest|DIR] | --overwrite]`, one process
// per GPU (or CPU rank): started alone, or by mpirun, srun or torchrun (dist/launch.h reads their
// variables). Exit status: 0 done (or train.stop_after reached), 1 an error, kExitStopped (75)
// stopped by SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint (stop_signal.h).
#include <fmt/core.h>

#include <new>
#include <optional>

#include "cli/commands.h"
#include "core/error.h"
#include "dist/dist_context.h"
#include "dist/launch.h"
#include "train/memory_report.h"
#include "train/stop_signal.h"
#include "train/trainer.h"

namespace diffmoe::cli {

namespace {
// One process's run; out-of-memory errors say what the run's memory is made of.
int train_once(const std::string& config, const std::vector<std::string>& sets, const TrainOptions& base, bool lead) {
  const RunConfig rc = load_run_config(config, sets);
  TrainResult r;
  try {
    r = train(rc, base);
  } catch (const OutOfMemory& e) {  // an arena
    throw Error(out_of_memory_message(rc, config, e.bytes()), e.location());
  } catch (const std::bad_alloc&) {
    throw Error(out_of_memory_message(rc, config, std::nullopt));
  }
  if (r.stop_signal != 0) return kExitStopped;  // the trainer said where it stopped and what it saved
  if (lead)
    fmt::print("done: {} steps, last loss {:.4f}, validation loss {:.4f}, checkpoint {}\n", r.steps, r.last_loss,
               r.val_loss, r.last_checkpoint);
  return 0;
}

int run_train(const std::string& config, const std::vector<std::string>& sets, const std::string& resume,
              bool overwrite) {
  const TrainOptions base{.resume = resume, .config_path = config, .overwrite = overwrite};
  const dist::Launch launch = dist::detect_launch();
  if (launch.world == 1) return train_once(config, sets, base, true);
  // Several ranks: an error on one rank stops every rank (dist_context.h); this rank prints its
  // own error once, through fail().
  auto dist = dist::DistContext::init(launch);
  try {
    TrainOptions o = base;
    o.dist = dist.get();
    const int status = train_once(config, sets, o, dist->rank() == 0);
    dist->cpu_world().barrier({})->wait({});
    return status;
  } catch (const std::exception& e) {
    dist->fail(e.what());
    return 1;
  }
}
}  // namespace

void add_train_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("train", "Train a model from a YAML config");
  auto config = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  auto resume = std::make_shared<std::string>();
  auto device = std::make_shared<std::string>();
  cmd->add_option("--config", *config, "YAML config file")->required();
  cmd->add_option("--set", *sets, "override a config key, e.g. --set optim.lr=3e-4 (repeatable)");
  cmd->add_option("--device", *device, "cpu or cuda (shorthand for --set train.device=...)");
  cmd->add_option("--resume", *resume, "resume from 'latest' (the newest valid checkpoint) or a checkpoint directory")
      ->expected(0, 1)
      ->default_str("latest");
  auto overwrite = std::make_shared<bool>(false);
  cmd->add_flag("--overwrite", *overwrite,
                "start afresh over an earlier run in train.out_dir: delete its checkpoints and logs first")
      ->excludes("--resume");
  cmd->callback([&run, config, sets, resume, device, overwrite, cmd] {
    std::string r = cmd->count("--resume") > 0 ? (resume->empty() ? "latest" : *resume) : "";
    std::vector<std::string> overrides = *sets;
    if (!device->empty()) overrides.push_back("train.device=" + *device);
    run = [=] { return run_train(*config, overrides, r, *overwrite); };
  });
}

}  // namespace diffmoe::cli
