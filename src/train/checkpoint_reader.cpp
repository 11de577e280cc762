#include "train/checkpoint_reader.h"

#include <filesystem>

#include "io/checkpoint.h"
#include "io/file_util.h"
#include "model/model_file.h"

namespace diffmoe {

namespace fs = std::filesystem;

namespace {

// The tokenizer copy a checkpoint's trainer_state.json names ("" when none), as a listed file.
std::string tokenizer_of(const CheckpointInfo& info) {
  if (!info.state.contains("tokenizer")) return "";
  const auto& t = info.state["tokenizer"];
  DIFFMOE_CHECK(t.is_string(), "{}/trainer_state.json: 'tokenizer' must be a file name, got {}", info.dir, t.dump());
  return info.path_of(t.get<std::string>());
}

// A checkpoint directory read without verification (--no-verify): its trainer state, if readable.
std::string unverified_tokenizer_of(const std::string& dir) {
  try {
    const auto state = nlohmann::ordered_json::parse(
        io::read_small_file((fs::path(dir) / "trainer_state.json").string(), io::kMaxTrainerStateBytes, "trainer state"));
    if (!state.contains("tokenizer") || !state["tokenizer"].is_string()) return "";
    const std::string name = state["tokenizer"].get<std::string>();
    return name.find('/') == std::string::npos ? (fs::path(dir) / name).string() : "";
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

LoadedCheckpoint open_trained_model(const std::string& path, Backend& backend, DType dtype, const OpenModelOptions& options) {
  LoadedCheckpoint out;
  std::string tok = options.tokenizer_path;
  std::error_code ec;
  DIFFMOE_CHECK(fs::exists(path, ec), "{}: no such checkpoint, directory or file", path);
  if (!fs::is_directory(path, ec)) {
    // A model file. Inside a checkpoint directory it is verified with the whole checkpoint: the
    // manifest must list it under its own name.
    out.model_path = path;
    const fs::path dir = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
    if (options.verify && fs::exists(dir / "manifest.json", ec)) {
      const CheckpointInfo info = open_checkpoint(dir.string());
      info.path_of(fs::path(path).filename().string());
      out.step = info.step;
    }
  } else if (!options.verify && fs::exists(fs::path(path) / "model.safetensors", ec)) {
    out.model_path = (fs::path(path) / "model.safetensors").string();
    if (tok.empty()) tok = unverified_tokenizer_of(path);
  } else {
    std::optional<CheckpointInfo> info;
    if (fs::exists(fs::path(path) / "manifest.json", ec)) {
      info = open_checkpoint(path);
    } else {
      std::vector<std::string> warnings;
      info = find_latest_checkpoint(path, &warnings);
      for (const auto& w : warnings) fmt::print(stderr, "warning: {}\n", w);
    }
    DIFFMOE_CHECK(info.has_value(), "{}: no valid checkpoint found (no manifest.json here, and no step_* directory verifies)", path);
    out.model_path = info->path_of("model.safetensors");
    out.step = info->step;
    if (tok.empty()) tok = tokenizer_of(*info);
  }
  out.model = load_model(out.model_path, backend, dtype);
  if (!tok.empty()) {
    out.tokenizer = data::load_tokenizer(tok);
    out.tokenizer_path = tok;
  }
  return out;
}

}  // namespace diffmoe
