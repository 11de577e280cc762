#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"

namespace diffmoe {

#ifdef DIFFMOE_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend();  // backend/cuda/cuda_backend.cu
#endif

bool backend_available(std::string_view name) {
  if (name == "cpu") return true;
#ifdef DIFFMOE_HAVE_CUDA
  if (name == "cuda") return true;
#endif
  return false;
}

std::unique_ptr<Backend> make_backend(std::string_view name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") {
#ifdef DIFFMOE_HAVE_CUDA
    return make_cuda_backend();
#else
    DIFFMOE_FAIL("[backend] 'cuda' was not built into this binary (configure with -DDIFFMOE_CUDA=ON where nvcc exists)");
#endif
  }
  DIFFMOE_FAIL("[backend] unknown backend '{}' (expected 'cpu' or 'cuda')", name);
}

}  // namespace diffmoe
