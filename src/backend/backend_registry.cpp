#include "backend/backend_registry.h"

#include <charconv>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#ifdef DIFFMOE_HAVE_CUDA
#include "backend/cuda/cuda_factory.h"
#endif

namespace diffmoe {

bool backend_available(std::string_view name) {
  if (name == "cpu") return true;
#ifdef DIFFMOE_HAVE_CUDA
  if (name == "cuda") return true;
#endif
  return false;
}

std::string backend_unusable_reason(std::string_view name) {
  if (name == "cpu") return {};
  if (name == "cuda") {
#ifdef DIFFMOE_HAVE_CUDA
    return cuda_unusable_reason();
#else
    return "'cuda' was not built into this binary";
#endif
  }
  return fmt::format("unknown backend '{}'", name);
}

std::unique_ptr<Backend> make_backend(std::string_view name) {
  if (name == "cpu") return make_cpu_backend();
  if (name.rfind("cuda:", 0) == 0) {  // "cuda:N": device N (one process per GPU, LOCAL_RANK)
    int device = -1;
    const auto [ptr, ec] = std::from_chars(name.data() + 5, name.data() + name.size(), device);
    DIFFMOE_CHECK(ec == std::errc() && ptr == name.data() + name.size() && device >= 0,
                  "[backend] '{}': expected cuda:<device index>", name);
#ifdef DIFFMOE_HAVE_CUDA
    return make_cuda_backend(device);
#else
    DIFFMOE_FAIL(
        "[backend] 'cuda' was not built into this binary (configure with -DDIFFMOE_CUDA=ON where nvcc exists)");
#endif
  }
  if (name == "cuda") {
#ifdef DIFFMOE_HAVE_CUDA
    return make_cuda_backend();
#else
    DIFFMOE_FAIL(
        "[backend] 'cuda' was not built into this binary (configure with -DDIFFMOE_CUDA=ON where nvcc exists)");
#endif
  }
  DIFFMOE_FAIL("[backend] unknown backend '{}' (expected 'cpu' or 'cuda')", name);
}

}  // namespace diffmoe
