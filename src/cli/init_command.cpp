// `diffmoe init --config X --out model.safetensors [--seed N]`: writes a freshly initialised model
// (docs/model.md §6) as safetensors with the config in its metadata — loadable by PyTorch and by
// `diffmoe` itself (a checkpoint alone rebuilds the model).
#include <fmt/core.h>

#include "backend/backend_registry.h"
#include "cli/commands.h"
#include "io/file_util.h"
#include "model/model_file.h"

namespace diffmoe::cli {

namespace {
int run_init(const std::string& config, const std::string& out, uint64_t seed) {
  const ModelConfig c = load_model_config(config);
  io::check_output_path(out, "model file");
  auto be = make_backend("cpu");
  Model m(c, *be, DType::kF32);
  m.init_weights(seed);
  save_model(m, out, {{"seed", std::to_string(seed)}});
  fmt::print("wrote {} ({} tensors, seed {})\n", out, m.specs().size(), seed);
  return 0;
}
}  // namespace

void add_init_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("init", "Write a freshly initialised model as safetensors");
  auto config = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto seed = std::make_shared<uint64_t>(1234);
  cmd->add_option("--config", *config, "YAML config file")->required();
  cmd->add_option("--out", *out, "output .safetensors path")->required();
  cmd->add_option("--seed", *seed, "initialisation seed (default 1234)");
  cmd->callback([&run, config, out, seed] { run = [=] { return run_init(*config, *out, *seed); }; });
}

}  // namespace diffmoe::cli
