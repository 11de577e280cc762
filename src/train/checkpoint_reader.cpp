#include "train/checkpoint_reader.h"

#include <filesystem>

#include "io/checkpoint.h"
#include "model/model_file.h"

namespace diffmoe {

namespace fs = std::filesystem;

LoadedCheckpoint open_trained_model(const std::string& path, const std::string& tokenizer_path, Backend& backend, DType dtype) {
  LoadedCheckpoint out;
  std::string tok = tokenizer_path;
  DIFFMOE_CHECK(fs::exists(path), "{}: no such checkpoint, directory or file", path);
  if (fs::is_regular_file(path)) {
    out.model_path = path;
  } else {
    std::optional<CheckpointInfo> info;
    if (fs::exists(fs::path(path) / "manifest.json")) {
      info = open_checkpoint(path);
    } else {
      std::vector<std::string> warnings;
      info = find_latest_checkpoint(path, &warnings);
      for (const auto& w : warnings) fmt::print(stderr, "warning: {}\n", w);
    }
    DIFFMOE_CHECK(info.has_value(), "{}: no valid checkpoint found (no manifest.json here, and no step_* directory verifies)", path);
    out.model_path = info->dir + "/model.safetensors";
    out.step = info->step;
    if (tok.empty() && info->state.contains("tokenizer")) tok = info->dir + "/" + info->state["tokenizer"].get<std::string>();
  }
  out.model = load_model(out.model_path, backend, dtype);
  if (!tok.empty()) {
    out.tokenizer = data::load_tokenizer(tok);
    out.tokenizer_path = tok;
  }
  return out;
}

}  // namespace diffmoe
