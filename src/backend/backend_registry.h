// The backends built into this binary, by name (library diffmoe_backends): the one place that knows
// the concrete backends, so the interface (backend.h) and the model depend on none of them.
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include "backend/backend.h"

namespace diffmoe {

// "cpu", "cuda" (the current device) or "cuda:N" (device N, made current). Throws "[backend] 'cuda' was not built into
// this binary" when absent, and the backend's own error when it cannot start (e.g. "[cuda] no usable CUDA device:
// ...").
std::unique_ptr<Backend> make_backend(std::string_view name);

// Whether `name` was built into this binary (it may still be unusable on this machine).
bool backend_available(std::string_view name);

// Why make_backend(name) would fail on this machine, "" when it would not: not built in, unknown,
// or (cuda) no usable device. Creates no backend, so tests and tools can skip cheaply.
std::string backend_unusable_reason(std::string_view name);

}  // namespace diffmoe
