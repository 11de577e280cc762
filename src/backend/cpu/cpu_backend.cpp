#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/openblas_kernels.h"
#include "backend/op_validation.h"

#include <cstring>

namespace diffmoe {

void check_cpu(const Tensor& t, std::string_view op, std::string_view name) { check_device(t, Device::kCPU, op, name); }

void CpuBackend::upload(const Tensor& dst, const void* src) {
  check_cpu(dst, "upload", "dst");
  std::memcpy(dst.data, src, dst.nbytes());
}

void CpuBackend::download(void* dst, const Tensor& src) {
  check_cpu(src, "download", "src");
  std::memcpy(dst, src.data, src.nbytes());
}

std::unique_ptr<Backend> make_cpu_backend() {
  warn_if_generic_blas_kernels();
  return std::make_unique<CpuBackend>();
}

}  // namespace diffmoe
