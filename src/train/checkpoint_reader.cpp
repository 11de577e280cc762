#include "train/checkpoint_reader.h"

#include <filesystem>

#include "io/checkpoint.h"
#include "io/file_util.h"
#include "model/model_file.h"
#include "train/sharded_state.h"

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
    const auto state = nlohmann::ordered_json::parse(io::read_small_file(
        (fs::path(dir) / "trainer_state.json").string(), io::kMaxTrainerStateBytes, "trainer state"));
    if (!state.contains("tokenizer") || !state["tokenizer"].is_string()) return "";
    const std::string name = state["tokenizer"].get<std::string>();
    return name.find('/') == std::string::npos ? (fs::path(dir) / name).string() : "";
  } catch (const std::exception&) {
    return "";
  }
}

// Whether dir holds state shards (docs/formats.md §4.2) rather than a model.safetensors.
bool has_shards(const std::string& dir) {
  std::error_code ec;
  for (const auto& de : fs::directory_iterator(dir, ec)) {
    const std::string n = de.path().filename().string();
    if (n.rfind("shard-", 0) == 0 && n.ends_with(".safetensors")) return true;
  }
  return false;
}

}  // namespace

CheckpointInfo resolve_checkpoint_dir(const std::string& path) {
  std::error_code ec;
  DIFFMOE_CHECK(fs::is_directory(path, ec), "{}: no such checkpoint directory", path);
  std::optional<CheckpointInfo> info;
  if (fs::exists(fs::path(path) / "manifest.json", ec)) {
    info = open_checkpoint(path);
  } else {
    std::vector<std::string> warnings;
    info = find_latest_checkpoint(path, &warnings);
    for (const auto& w : warnings) fmt::print(stderr, "warning: {}\n", w);
  }
  DIFFMOE_CHECK(info.has_value(),
                "{}: no valid checkpoint found (no manifest.json here, and no step_* directory verifies)", path);
  return *info;
}

LoadedCheckpoint open_trained_model(const std::string& path, Backend& backend, DType dtype,
                                    const OpenModelOptions& options) {
  LoadedCheckpoint out;
  std::string tok = options.tokenizer_path;
  std::error_code ec;
  DIFFMOE_CHECK(fs::exists(path, ec), "{}: no such checkpoint, directory or file", path);
  if (!fs::is_directory(path, ec)) {
    // A model file. Inside a checkpoint directory it is verified with the whole checkpoint: the
    // manifest must list it under its own name.
    out.model_path = path;
    const fs::path dir = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
    const std::string name = fs::path(path).filename().string();
    const bool state_shard = name.rfind("shard-", 0) == 0 && name.ends_with(".safetensors");
    if (options.verify && fs::exists(dir / "manifest.json", ec)) {
      const CheckpointInfo info = open_checkpoint(dir.string());
      info.path_of(name);
      out.step = info.step;
      if (tok.empty()) tok = tokenizer_of(info);
    } else if (options.verify) {
      // A state shard exists only inside a checkpoint, which always has a manifest: without one it
      // is an incomplete or tampered checkpoint, not an exported model file.
      DIFFMOE_CHECK(
          !state_shard && !fs::exists(dir / "trainer_state.json", ec),
          "{}: a checkpoint file without {} beside it (an incomplete checkpoint?); pass --no-verify to read it anyway",
          path, (dir / "manifest.json").string());
    } else if (state_shard && tok.empty()) {
      tok = unverified_tokenizer_of(dir.string());
    }
    if (state_shard) {
      // One rank's state shard: the model is the whole checkpoint's, from every shard beside it.
      const StateReader reader(dir.string());
      out.model = std::make_unique<Model>(reader.config(), backend, dtype, options.model);
      load_model_weights(*out.model, reader);
    } else {
      out.model = load_model(out.model_path, backend, dtype, options.model);
    }
  } else {
    if (!options.verify && fs::exists(fs::path(path) / "manifest.json", ec)) {
      out.model_path = path;  // read as it is
      if (tok.empty()) tok = unverified_tokenizer_of(path);
    } else {
      const CheckpointInfo info = resolve_checkpoint_dir(path);
      out.model_path = info.dir;
      out.step = info.step;
      if (tok.empty()) tok = tokenizer_of(info);
      // Every file the reader opens must be one the manifest lists (and verified).
      for (const auto& de : fs::directory_iterator(info.dir, ec)) {
        const std::string n = de.path().filename().string();
        if (n.ends_with(".safetensors")) info.path_of(n);
      }
    }
    if (has_shards(out.model_path)) {  // the masters, from however many shards wrote them
      const StateReader reader(out.model_path);
      out.model = std::make_unique<Model>(reader.config(), backend, dtype, options.model);
      load_model_weights(*out.model, reader);
    } else {
      out.model = load_model(out.model_path + "/model.safetensors", backend, dtype, options.model);
    }
  }
  if (!tok.empty()) {
    out.tokenizer = data::load_tokenizer(tok);
    out.tokenizer_path = tok;
  }
  return out;
}

}  // namespace diffmoe
