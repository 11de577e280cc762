// One error policy for CUDA and cuBLAS calls (docs/style.md habit 7): every call is checked, and a
// failure throws diffmoe::Error naming the call's text, file:line and the library's error string.
//   CUDA_CHECK(cudaMemcpyAsync(...));   CUBLAS_CHECK(cublasSgemm(...));
//   CUBLASLT_CHECK(cublasLtMatmul(...), what);  what: a std::string naming the op and its shapes,
//                                       evaluated only on failure
//   CUDA_CHECK_LAUNCH("rmsnorm_fwd");   after a kernel launch (launch-configuration errors)
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>
#include <string_view>

namespace diffmoe {

[[noreturn]] void cuda_fail(const char* call, const char* file, int line, cudaError_t err);
[[noreturn]] void cublas_fail(const char* call, const char* file, int line, cublasStatus_t status);
[[noreturn]] void cublaslt_fail(const char* call, const char* file, int line, cublasStatus_t status,
                                const std::string& what);
const char* cublas_status_name(cublasStatus_t status);
// Throws "[op] kernel launch failed: ..." when cudaGetLastError reports an error.
void cuda_check_launch(std::string_view op, const char* file, int line);

}  // namespace diffmoe

#define CUDA_CHECK(call)                                                                                      \
  do {                                                                                                        \
    const cudaError_t diffmoe_cuda_err_ = (call);                                                             \
    if (diffmoe_cuda_err_ != cudaSuccess) ::diffmoe::cuda_fail(#call, __FILE__, __LINE__, diffmoe_cuda_err_); \
  } while (0)

#define CUBLAS_CHECK(call)                                                   \
  do {                                                                       \
    const cublasStatus_t diffmoe_cublas_st_ = (call);                        \
    if (diffmoe_cublas_st_ != CUBLAS_STATUS_SUCCESS)                         \
      ::diffmoe::cublas_fail(#call, __FILE__, __LINE__, diffmoe_cublas_st_); \
  } while (0)

// cuBLASLt calls also return cublasStatus_t; their failures name what the call was for.
#define CUBLASLT_CHECK(call, what)                                                       \
  do {                                                                                   \
    const cublasStatus_t diffmoe_cublaslt_st_ = (call);                                  \
    if (diffmoe_cublaslt_st_ != CUBLAS_STATUS_SUCCESS)                                   \
      ::diffmoe::cublaslt_fail(#call, __FILE__, __LINE__, diffmoe_cublaslt_st_, (what)); \
  } while (0)

// Launch errors (bad grid, too much shared memory) surface at cudaGetLastError; errors inside a
// kernel surface at the next synchronising call, which is checked too.
#define CUDA_CHECK_LAUNCH(op) ::diffmoe::cuda_check_launch((op), __FILE__, __LINE__)
