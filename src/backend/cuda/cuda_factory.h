// The CUDA backend's entry points for the registry (backend_registry.cpp), declared without CUDA
// headers so that the registry compiles without the toolkit's include paths.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"

namespace diffmoe {

// cuda_backend.cpp; throws when no device is usable. device >= 0 makes that device current first
// (for this thread); -1 keeps the current one.
std::unique_ptr<Backend> make_cuda_backend(int device = -1);

// Why no CUDA backend can start here ("no usable CUDA device: ..."), "" when one can.
std::string cuda_unusable_reason();

}  // namespace diffmoe
