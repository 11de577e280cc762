// `diffmoe checkpoint export --checkpoint PATH --out model.safetensors`: the whole model of a
// (sharded) training checkpoint as one safetensors file with the docs/model.md §8 names, loadable by
// PyTorch's safetensors and by diffmoe eval/generate. PATH: a checkpoint directory or a root.
#include <fmt/core.h>

#include <filesystem>

#include "cli/commands.h"
#include "train/checkpoint_reader.h"
#include "train/sharded_state.h"

namespace diffmoe::cli {

namespace {
int run_export(const std::string& checkpoint, const std::string& out) {
  // A file of a checkpoint (one of its state shards) names that checkpoint.
  std::error_code ec;
  const bool file = std::filesystem::is_regular_file(checkpoint, ec);
  const std::string parent = std::filesystem::path(checkpoint).parent_path().string();
  const CheckpointInfo info = resolve_checkpoint_dir(file ? (parent.empty() ? "." : parent) : checkpoint);
  const StateReader reader(info.dir);
  export_model(reader, out, {{"step", std::to_string(info.step)}});
  fmt::print("wrote {} (the model of {}, step {})\n", out, info.dir, info.step);
  return 0;
}
}  // namespace

void add_checkpoint_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("checkpoint", "Work with training checkpoints");
  cmd->require_subcommand(1);
  auto* exp = cmd->add_subcommand("export", "Write a checkpoint's model as one safetensors file (spec names, f32)");
  auto checkpoint = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  exp->add_option("--checkpoint", *checkpoint,
                  "checkpoint directory (or one of its files), or a checkpoint root (its newest valid checkpoint)")
      ->required();
  exp->add_option("--out", *out, "output .safetensors path")->required();
  exp->callback([&run, checkpoint, out] { run = [=] { return run_export(*checkpoint, *out); }; });
}

}  // namespace diffmoe::cli
