// Opening a trained model for `diffmoe eval` / `diffmoe generate`: PATH may be a checkpoint root
// (the newest valid checkpoint is used), one checkpoint directory (verified against its manifest),
// or a bare model .safetensors file (then the tokenizer must be given separately).
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

// `tokenizer_path` overrides the checkpoint's own tokenizer copy when non-empty. The model is built
// with `opt` (precision) and holds the checkpoint's f32 masters, rounded to its compute dtypes.
LoadedCheckpoint open_trained_model(const std::string& path, const std::string& tokenizer_path, Backend& backend, DType dtype,
                                    const ModelOptions& opt = {});

}  // namespace diffmoe
