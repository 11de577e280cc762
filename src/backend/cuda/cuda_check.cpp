#include "backend/cuda/cuda_check.h"

#include "core/error.h"

namespace diffmoe {

void cuda_fail(const char* call, const char* file, int line, cudaError_t err) {
  throw_error(file, line,
              fmt::format("[cuda] {} failed: {} ({})", call, cudaGetErrorString(err), cudaGetErrorName(err)));
}

void cuda_check_launch(std::string_view op, const char* file, int line) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw_error(file, line,
                fmt::format("[{}] kernel launch failed: {} ({})", op, cudaGetErrorString(err), cudaGetErrorName(err)));
}

const char* cublas_status_name(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}

void cublas_fail(const char* call, const char* file, int line, cublasStatus_t status) {
  throw_error(file, line,
              fmt::format("[cublas] {} failed: {} ({})", call, cublas_status_name(status), static_cast<int>(status)));
}

void cublaslt_fail(const char* call, const char* file, int line, cublasStatus_t status, const std::string& what) {
  throw_error(file, line,
              fmt::format("[cublasLt] {} failed: {} ({}) in {}", call, cublas_status_name(status),
                          static_cast<int>(status), what));
}

}  // namespace diffmoe
