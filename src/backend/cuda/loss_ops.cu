// Cross-entropy over the vocabulary on the GPU.
//
// Design: one block per row; the row is read twice (max, then Σ exp(z − max)), probabilities are
// never stored. exp runs in f32 (V exps per row; f64 would make this op compute-bound), the sums
// in double. The forward writes each row's loss to the backend's scratch and one block then adds
// the rows in a fixed order into loss_sum and valid, so the result is reproducible. The backward
// reads valid[0] on the device (no host sync). Targets are checked on the device (device_issue.h):
// a bad one is reported at the next synchronize and its row treated as ignored.
#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kRowThreads = 256;

// log Σ_j exp(z_j) of one row, computed by the whole block (every thread gets it).
__device__ double row_logsumexp(const float* row, int64_t vocab, float* red_f, double* red_d) {
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = block_max(mx, red_f);
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(row[j] - mx);
  sum = block_sum(sum, red_d);
  return static_cast<double>(mx) + log(sum);
}

// row_loss[n] = logsumexp(logits[n]) − logits[n, target[n]], 0 for ignored rows.
__global__ void __launch_bounds__(kRowThreads) cross_entropy_rows_kernel(double* row_loss, const float* logits,
                                                                         const int32_t* targets, int64_t rows,
                                                                         int64_t vocab, DeviceIssue* issue) {
  __shared__ float red_f[kWarp];
  __shared__ double red_d[kWarp];
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const int32_t tgt = targets[n];
    const bool valid = index_ok(issue, IssueSite::kCrossEntropyFwdTargets, n, tgt, vocab, true) && tgt != -1;
    if (!valid) {  // uniform across the block
      if (threadIdx.x == 0) row_loss[n] = 0.0;
      continue;
    }
    const float* row = logits + n * vocab;
    const double lse = row_logsumexp(row, vocab, red_f, red_d);
    if (threadIdx.x == 0) row_loss[n] = lse - row[tgt];
  }
}

// loss_sum[0] += Σ_n row_loss[n];  valid[0] += #{n : target in range}. One block, fixed order.
__global__ void cross_entropy_total_kernel(float* loss_sum, void* valid, bool valid_is_i32, const double* row_loss,
                                           const int32_t* targets, int64_t rows, int64_t vocab) {
  __shared__ double red[kWarp];
  double total = 0.0, count = 0.0;
  for (int64_t n = threadIdx.x; n < rows; n += blockDim.x) {
    total += row_loss[n];
    count += (targets[n] >= 0 && targets[n] < vocab) ? 1.0 : 0.0;
  }
  total = block_sum(total, red);
  count = block_sum(count, red);
  if (threadIdx.x == 0) {
    loss_sum[0] = static_cast<float>(loss_sum[0] + total);
    if (valid_is_i32) static_cast<int32_t*>(valid)[0] += static_cast<int32_t>(count);
    else static_cast<float*>(valid)[0] += static_cast<float>(count);
  }
}

// dlogits = grad_scale · (softmax − onehot(target)) / valid[0]; ignored rows (and all rows when
// valid[0] = 0) get 0.
// Out: float, or bf16 in the bf16 GEMM mode (dlogits only feeds the head's two GEMMs).
template <class Out>
__global__ void __launch_bounds__(kRowThreads) cross_entropy_bwd_kernel(Out* dlogits, const float* logits,
                                                                        const int32_t* targets, const void* valid,
                                                                        bool valid_is_i32, double grad_scale,
                                                                        int64_t rows, int64_t vocab,
                                                                        DeviceIssue* issue) {
  __shared__ float red_f[kWarp];
  __shared__ double red_d[kWarp];
  const double n_valid = valid_is_i32 ? static_cast<double>(static_cast<const int32_t*>(valid)[0])
                                      : static_cast<double>(static_cast<const float*>(valid)[0]);
  const double coef = n_valid > 0.0 ? grad_scale / n_valid : 0.0;
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const int32_t tgt = targets[n];
    const bool use = index_ok(issue, IssueSite::kCrossEntropyBwdTargets, n, tgt, vocab, true) && tgt != -1;
    Out* drow = dlogits + n * vocab;
    if (!use) {
      for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) store_as(drow + j, 0.0);
      continue;
    }
    const float* row = logits + n * vocab;
    const double lse = row_logsumexp(row, vocab, red_f, red_d);
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const double p = expf(static_cast<float>(row[j] - lse));  // softmax
      store_as(drow + j, coef * (p - (j == tgt ? 1.0 : 0.0)));
    }
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)); }

}  // namespace

void CudaBackend::cross_entropy_fwd(Context ctx, const CrossEntropyFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "cross_entropy_fwd");
  constexpr std::string_view kOp = "cross_entropy_fwd";
  const CrossEntropyDims d = validate_cross_entropy_fwd(a, Device::kCUDA);
  require_f32(a.logits, kOp);
  if (d.rows == 0) return;
  const cudaStream_t s = stream(ctx);
  auto* row_loss = static_cast<double*>(scratch(static_cast<size_t>(d.rows) * sizeof(double)));
  cross_entropy_rows_kernel<<<row_blocks(d.rows), kRowThreads, 0, s>>>(row_loss, f32(a.logits), i32(a.targets),
                                                                       d.rows, d.vocab, issue());
  CUDA_CHECK_LAUNCH(kOp);
  cross_entropy_total_kernel<<<1, 1024, 0, s>>>(f32(a.loss_sum), a.valid.data, a.valid.dtype == DType::kI32, row_loss,
                                                i32(a.targets), d.rows, d.vocab);
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::cross_entropy_bwd(Context ctx, const CrossEntropyBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "cross_entropy_bwd");
  constexpr std::string_view kOp = "cross_entropy_bwd";
  const CrossEntropyDims d = validate_cross_entropy_bwd(a, Device::kCUDA);
  require_f32(a.logits, kOp);
  if (d.rows == 0) return;
  const auto launch = [&](auto* dlogits) {
    cross_entropy_bwd_kernel<<<row_blocks(d.rows), kRowThreads, 0, stream(ctx)>>>(
        dlogits, f32(a.logits), i32(a.targets), a.valid.data, a.valid.dtype == DType::kI32, a.grad_scale, d.rows,
        d.vocab, issue());
  };
  if (a.dlogits.dtype == DType::kBF16) launch(static_cast<__nv_bfloat16*>(a.dlogits.data));
  else launch(f32(a.dlogits));
  CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace diffmoe
