#include "train/checkpoint_reader.h"

#include <filesystem>

#include "io/checkpoint.h"
#include "model/model_file.h"
#include "train/sharded_state.h"

namespace diffmoe {

namespace fs = std::filesystem;

CheckpointInfo resolve_checkpoint_dir(const std::string& path) {
  DIFFMOE_CHECK(fs::is_directory(path), "{}: no such checkpoint directory", path);
  std::optional<CheckpointInfo> info;
  if (fs::exists(fs::path(path) / "manifest.json")) {
    info = open_checkpoint(path);
  } else {
    std::vector<std::string> warnings;
    info = find_latest_checkpoint(path, &warnings);
    for (const auto& w : warnings) fmt::print(stderr, "warning: {}\n", w);
  }
  DIFFMOE_CHECK(info.has_value(), "{}: no valid checkpoint found (no manifest.json here, and no step_* directory verifies)", path);
  return *info;
}

LoadedCheckpoint open_trained_model(const std::string& path, const std::string& tokenizer_path, Backend& backend, DType dtype,
                                    const ModelOptions& opt) {
  LoadedCheckpoint out;
  std::string tok = tokenizer_path;
  DIFFMOE_CHECK(fs::exists(path), "{}: no such checkpoint, directory or file", path);
  if (fs::is_regular_file(path)) {
    out.model_path = path;
  } else {
    const std::optional<CheckpointInfo> info = resolve_checkpoint_dir(path);
    out.model_path = info->dir;
    out.step = info->step;
    if (tok.empty() && info->state.contains("tokenizer")) tok = info->dir + "/" + info->state["tokenizer"].get<std::string>();
  }
  if (fs::is_regular_file(out.model_path)) {
    out.model = load_model(out.model_path, backend, dtype, opt);
  } else {  // a checkpoint directory: the masters, from however many shards wrote them
    const StateReader reader(out.model_path);
    out.model = std::make_unique<Model>(reader.config(), backend, dtype, opt);
    load_model_weights(*out.model, reader);
  }
  if (!tok.empty()) {
    out.tokenizer = data::load_tokenizer(tok);
    out.tokenizer_path = tok;
  }
  return out;
}

}  // namespace diffmoe
