// Opening a trained model for `diffmoe eval` / `diffmoe generate`: PATH may be a checkpoint root
// (the newest valid checkpoint is used), one checkpoint directory (verified against its manifest),
// or a bare model .safetensors file (then the tokenizer must be given separately).
#pragma once
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "model/model.h"

namespace diffmoe {

struct LoadedCheckpoint {
  std::unique_ptr<Model> model;
  std::unique_ptr<data::Tokenizer> tokenizer;  // null when none was found or given
  std::string model_path;
  std::string tokenizer_path;                  // empty when no tokenizer was found or given
  int64_t step = -1;                           // -1 for a bare model file
};

// `tokenizer_path` overrides the checkpoint's own tokenizer copy when non-empty.
LoadedCheckpoint open_trained_model(const std::string& path, const std::string& tokenizer_path, Backend& backend, DType dtype);

}  // namespace diffmoe
