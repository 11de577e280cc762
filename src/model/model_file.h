// Model weights as safetensors (docs/model.md §8 names; docs/formats.md §1b). The config travels in the
// metadata ("config": the model section as JSON), so a file alone rebuilds the model.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "io/safetensors.h"
#include "model/model.h"

namespace diffmoe {

// Writes every parameter's compute weights (the balancing biases included) as F32, atomically: in
// the f32 mode the parameters themselves; in the bf16 mode the GEMM weights are their bf16 copies
// (training checkpoints take the f32 masters from the optimizer instead). Needs the whole model on
// this rank (no expert parallelism). Extra metadata entries (e.g. "step") may be passed; "format"
// and "config" are always set.
void save_model(const Model& m, const std::string& path, const std::map<std::string, std::string>& extra_metadata = {});

// Reads the config from the file's metadata, builds a Model on `backend` in `dtype` (with `opt`:
// precision, expert split), loads every parameter (this rank's experts), rounded to its compute
// dtype. A missing config, a missing or extra tensor, or a wrong shape is an error naming the file
// and the tensor.
std::unique_ptr<Model> load_model(const std::string& path, Backend& backend, DType dtype, const ModelOptions& opt = {});

// Loads the parameters of an existing model from a file whose config must be identical.
void load_weights(Model& m, const std::string& path);

// Reads tensor `name` of `f` into `dst` on any backend: directly into host memory, or through a
// host staging buffer and an upload when `dst` lives on a device.
void read_tensor(const SafetensorsFile& f, const std::string& name, const Tensor& dst, Backend& backend);

}  // namespace diffmoe
