// Opening a trained model for `diffmoe eval` / `diffmoe generate`: PATH may be a checkpoint root
// (the newest valid checkpoint is used), one checkpoint directory (verified against its manifest),
// or a model .safetensors file (inside a checkpoint, a manifest.json beside it, the whole checkpoint
// is verified first and must list the file); for a model file the tokenizer is given separately.
#pragma once
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "io/checkpoint.h"
#include "model/model.h"

namespace diffmoe {

struct LoadedCheckpoint {
  std::unique_ptr<Model> model;
  std::unique_ptr<data::Tokenizer> tokenizer;  // null when none was found or given
  std::string model_path;                      // the model file, or the checkpoint directory
  std::string tokenizer_path;                  // empty when no tokenizer was found or given
  int64_t step = -1;                           // -1 for a bare model file
};

// The checkpoint directory PATH names: a checkpoint directory (verified against its manifest) or a
// checkpoint root (its newest valid checkpoint; skipped ones are printed as warnings).
CheckpointInfo resolve_checkpoint_dir(const std::string& path);

struct OpenModelOptions {
  std::string tokenizer_path;  // overrides the checkpoint's own tokenizer copy when non-empty
  // Check every file against the checkpoint's manifest (sizes and XXH3-64), also for a model file
  // named directly when a manifest.json is beside it. Off (--no-verify): a checkpoint directory or
  // model file is read as it is (a checkpoint root still picks its newest checkpoint that verifies).
  bool verify = true;
  ModelOptions model = {};  // the model's precision (its f32 masters are rounded to its compute dtypes)
};

// A checkpoint's model (its state shards, docs/formats.md §4.2, or a model.safetensors) for evaluation
// and generation.
LoadedCheckpoint open_trained_model(const std::string& path, Backend& backend, DType dtype,
                                    const OpenModelOptions& options = {});

}  // namespace diffmoe
