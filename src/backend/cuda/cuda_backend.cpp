// CudaBackend glue: device selection, cuBLAS handle and workspaces, host transfers, and the
// device-side index checks' report (device_issue.h). The ops live in the .cu files.
#include "backend/cuda/cuda_backend.h"

#include <array>
#include <string_view>

#include "backend/cuda/cuda_check.h"
#include "backend/op_validation.h"

namespace diffmoe {

namespace {

// cuBLAS's recommended workspace on Hopper (cublasSetWorkspace docs): 32 MiB.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

struct SiteText {
  std::string_view op, field;
  bool allows_ignore;  // −1 is valid (cross-entropy targets)
};

SiteText site_text(IssueSite s) {
  switch (s) {
    case IssueSite::kEmbeddingFwdTokens: return {"embedding_fwd", "tokens", false};
    case IssueSite::kEmbeddingBwdTokens: return {"embedding_bwd", "tokens", false};
    case IssueSite::kRouterBwdTopkIdx: return {"router_bwd", "topk_idx", false};
    case IssueSite::kPermuteTopkIdx: return {"moe_permute", "topk_idx", false};
    case IssueSite::kGatherSrcRow: return {"moe_gather", "src_row", false};
    case IssueSite::kGatherBwdSlotPos: return {"moe_gather_bwd", "slot_pos", false};
    case IssueSite::kCombineFwdSlotPos: return {"moe_combine_fwd", "slot_pos", false};
    case IssueSite::kCombineBwdSlotPos: return {"moe_combine_bwd", "slot_pos", false};
    case IssueSite::kCrossEntropyFwdTargets: return {"cross_entropy_fwd", "targets", true};
    case IssueSite::kCrossEntropyBwdTargets: return {"cross_entropy_bwd", "targets", true};
    case IssueSite::kNone: break;
  }
  return {"cuda", "index", false};
}

}  // namespace

CudaBackend::CudaBackend() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  DIFFMOE_CHECK(err == cudaSuccess && count > 0, "[cuda] no usable CUDA device: {} ({})",
                err == cudaSuccess ? "the driver reports 0 devices" : cudaGetErrorString(err),
                err == cudaSuccess ? "cudaSuccess" : cudaGetErrorName(err));
  CUDA_CHECK(cudaGetDevice(&device_));
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  int smem = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  max_smem_optin_ = static_cast<size_t>(smem);
  CUBLAS_CHECK(cublasCreate(&cublas_));
  // Plain f32 arithmetic: CUBLAS_DEFAULT_MATH never uses TF32 for SGEMM (only
  // CUBLAS_TF32_TENSOR_OP_MATH or NVIDIA_TF32_OVERRIDE would), so the f32 check against the CPU is
  // meaningful. The bf16 milestone chooses its own compute types per call.
  CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  cublas_workspace_.reserve(kCublasWorkspaceBytes);  // bound with the stream, in cublas()
  issue_.reserve(sizeof(DeviceIssue));
  CUDA_CHECK(cudaMemset(issue_.get(), 0, sizeof(DeviceIssue)));
}

CudaBackend::~CudaBackend() {
  if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
}

cublasHandle_t CudaBackend::cublas(cudaStream_t s) {
  if (!cublas_stream_set_ || s != cublas_stream_) {
    // cublasSetStream resets the workspace to cuBLAS's default pool: set ours again after it.
    CUBLAS_CHECK(cublasSetStream(cublas_, s));
    CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_.get(), cublas_workspace_.bytes()));
    cublas_stream_ = s;
    cublas_stream_set_ = true;
  }
  return cublas_;
}

void* CudaBackend::scratch(size_t bytes) {
  scratch_.reserve(bytes);
  return scratch_.get();
}

const int32_t* CudaBackend::read_to_host(const Tensor& t, cudaStream_t s) {
  host_staging_.resize(static_cast<size_t>(t.numel()));
  if (t.numel() == 0) return host_staging_.data();
  CUDA_CHECK(cudaMemcpyAsync(host_staging_.data(), t.data, t.nbytes(), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  return host_staging_.data();
}

void CudaBackend::check_issue() {
  DeviceIssue rec;
  CUDA_CHECK(cudaMemcpy(&rec, issue_.get(), sizeof(DeviceIssue), cudaMemcpyDeviceToHost));
  if (rec.flag == 0) return;
  CUDA_CHECK(cudaMemset(issue_.get(), 0, sizeof(DeviceIssue)));  // the backend stays usable
  const SiteText t = site_text(static_cast<IssueSite>(rec.site));
  if (t.allows_ignore) {
    DIFFMOE_FAIL("[{}] {}[{}] = {} is neither −1 (ignore) nor in [0, {}) (checked on the device; the op skipped "
                 "it, reported at the next synchronize)", t.op, t.field, rec.index, rec.value, rec.limit);
  }
  DIFFMOE_FAIL("[{}] {}[{}] = {} is outside [0, {}) (checked on the device; the op skipped it, reported at the next "
               "synchronize)", t.op, t.field, rec.index, rec.value, rec.limit);
}

void CudaBackend::upload(const Tensor& dst, const void* src) {
  check_device(dst, Device::kCUDA, "upload", "dst");
  if (dst.nbytes() == 0) return;
  CUDA_CHECK(cudaDeviceSynchronize());  // ops on any stream may still use dst
  CUDA_CHECK(cudaMemcpy(dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice));
}

void CudaBackend::download(void* dst, const Tensor& src) {
  check_device(src, Device::kCUDA, "download", "src");
  CUDA_CHECK(cudaDeviceSynchronize());
  check_issue();
  if (src.nbytes() == 0) return;
  CUDA_CHECK(cudaMemcpy(dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost));
}

void CudaBackend::synchronize(Context ctx) {
  CUDA_CHECK(cudaStreamSynchronize(stream(ctx)));
  check_issue();
}

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace diffmoe
