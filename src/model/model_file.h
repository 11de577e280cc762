// Model weights as safetensors (spec §8 names; formats.md §1b). The config travels in the
// metadata ("config": the model section as JSON), so a file alone rebuilds the model.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "io/safetensors.h"
#include "model/model.h"

namespace diffmoe {

// Writes every parameter (the balancing biases included) as F32, atomically. Extra metadata
// entries (e.g. "step") may be passed; "format" and "config" are always set.
void save_model(const Model& m, const std::string& path, const std::map<std::string, std::string>& extra_metadata = {});

// Reads the config from the file's metadata, builds a Model on `backend` in `dtype`, loads every
// parameter. A missing config, a missing or extra tensor, or a wrong shape is an error naming the
// file and the tensor.
std::unique_ptr<Model> load_model(const std::string& path, Backend& backend, DType dtype);

// Loads the parameters of an existing model from a file whose config must be identical.
void load_weights(Model& m, const std::string& path);

// Reads tensor `name` of `f` into `dst` on any backend: directly into host memory, or through a
// host staging buffer and an upload when `dst` lives on a device.
void read_tensor(const SafetensorsFile& f, const std::string& name, const Tensor& dst, Backend& backend);

}  // namespace diffmoe
