// `diffmoe train --config X [--set key=value ...] [--resume [latest|DIR]]`, one process per GPU (or
// CPU rank): started alone, or by mpirun, srun or torchrun (dist/launch.h reads their variables).
#include <fmt/core.h>

#include "cli/commands.h"
#include "dist/dist_context.h"
#include "dist/launch.h"
#include "train/trainer.h"

namespace diffmoe::cli {

namespace {
int run_train(const std::string& config, const std::vector<std::string>& sets, const std::string& resume) {
  const dist::Launch launch = dist::detect_launch();
  if (launch.world == 1) {
    const RunConfig rc = load_run_config(config, sets);
    const TrainResult r = train(rc, TrainOptions{.resume = resume, .config_path = config});
    fmt::print("done: {} steps, last loss {:.4f}, validation loss {:.4f}, checkpoint {}\n", r.steps, r.last_loss, r.val_loss,
               r.last_checkpoint);
    return 0;
  }
  // Several ranks: an error on one rank stops every rank (dist_context.h); this rank prints its
  // own error once, through fail().
  auto dist = dist::DistContext::init(launch);
  try {
    const RunConfig rc = load_run_config(config, sets);
    const TrainResult r = train(rc, TrainOptions{.resume = resume, .config_path = config, .dist = dist.get()});
    if (dist->rank() == 0)
      fmt::print("done: {} steps, last loss {:.4f}, validation loss {:.4f}, checkpoint {}\n", r.steps, r.last_loss, r.val_loss,
                 r.last_checkpoint);
    dist->cpu_world().barrier({})->wait({});
    return 0;
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
  cmd->callback([&run, config, sets, resume, device, cmd] {
    std::string r = cmd->count("--resume") > 0 ? (resume->empty() ? "latest" : *resume) : "";
    std::vector<std::string> overrides = *sets;
    if (!device->empty()) overrides.push_back("train.device=" + *device);
    run = [=] { return run_train(*config, overrides, r); };
  });
}

}  // namespace diffmoe::cli
