// Cross-entropy over the vocabulary on the GPU.
//
// Design: one block per row (grid-stride over rows). lse = m + ln Σ exp(z − m) takes two passes
// over the row (the max m, then the sum), the backward a third (the probabilities); probabilities
// are never stored.
// - Cached path (the row fits the block's shared memory: V ≤ ~58k f32 on an H100): the row is read
//   from global memory once, straight into shared memory (cp.async), and every pass reads it there:
//   the forward moves V·4 bytes per row, the backward V·4 + the dlogits row (the streaming version
//   re-read each row 2-3 times from DRAM: the rows in flight did not fit the L2). 1024 threads,
//   one block per SM at the bench vocabulary (128 KB).
// - Streaming path (larger vocabularies): the same passes over the row in global memory.
// - Both read the row as float4 pieces where V % 4 == 0 and the rows are aligned (elementwise.cuh),
//   else element by element (the cache is padded with −inf to whole pieces).
// - Logits are f32, or bf16 in the bf16 GEMM mode (the head's GEMM writes them rounded once, as
//   under autocast): the row moves (and is cached) in bf16, half the bytes, and every value is
//   widened exactly to f32 before the same arithmetic.
// Arithmetic: exp in f32 (V exps per row; f64 would make this op compute-bound). Σ exp: each float4
// piece's four terms in f32, the pieces in double (relative error ≤ 3·2^-24 per piece, below the
// f32 exp's own); probabilities p = exp(z − lse) with z − lse in f32 from lse split into two floats
// (hi + lo), and the output coef·(p − onehot) in f32: ~1e-6 relative to the CPU's f64 value, as
// before (the argument's f32 rounding dominates). The forward writes each row's loss to the
// backend's scratch and one block then adds the rows in a fixed order into loss_sum and valid, so
// the result is reproducible. The backward reads valid[0] on the device (no host sync). Targets are
// checked on the device (device_issue.h): a bad one is reported at the next synchronize and its row
// treated as ignored.
#include <cuda_pipeline.h>

#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kRowThreads = 256;      // streaming path
constexpr int kCachedThreads = 1024;  // cached path: the whole SM's threads on one row
constexpr size_t kStaticSmemBytes = kWarp * (sizeof(float) + sizeof(double));  // the reductions' arrays

// Pieces of four values in a row of V: the last one padded (with −inf) when V % 4 ≠ 0.
__host__ __device__ constexpr int64_t pieces_of(int64_t vocab) { return (vocab + kVec - 1) / kVec; }

// The row's source: its copy in shared memory (kCached; always whole pieces of four) or the row in
// global memory, as pieces of four (kVec4) or element by element (−inf past the end). T: float or
// bf16 (widened exactly).
template <class T, bool kCached, bool kVec4>
struct RowSource {
  const T* p;
  int64_t vocab;
  __device__ __forceinline__ float4 piece(int64_t i) const {
    if constexpr (kCached || kVec4) {
      return load4(p + i * kVec);
    } else {
      float4 v;
#pragma unroll
      for (int j = 0; j < kVec; ++j) at(v, j) = i * kVec + j < vocab ? load1(p + i * kVec + j) : -INFINITY;
      return v;
    }
  }
  __device__ __forceinline__ float value(int64_t j) const { return load1(p + j); }
};

__device__ __forceinline__ void set_neg_inf(float* p) { *p = -INFINITY; }
__device__ __forceinline__ void set_neg_inf(__nv_bfloat16* p) { *p = __float2bfloat16_rn(-INFINITY); }

// Copies row[0, V) into cache by cp.async (pieces of four values, 16 or 8 bytes, when kVec4; else
// f32 values by cp.async and bf16 ones, 2 bytes, by plain loads and stores) and pads it with −inf to
// whole pieces; returns after a barrier, so the block sees the whole row.
template <class T, bool kVec4>
__device__ void cache_row(T* cache, const T* row, int64_t vocab) {
  if constexpr (kVec4) {
    for (int64_t i = threadIdx.x; i < vocab / kVec; i += blockDim.x)
      __pipeline_memcpy_async(cache + i * kVec, row + i * kVec, kVec * sizeof(T));
  } else if constexpr (sizeof(T) == 4) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) __pipeline_memcpy_async(cache + j, row + j, sizeof(T));
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) cache[j] = row[j];
  }
  if constexpr (!kVec4)
    for (int64_t j = vocab + threadIdx.x; j < pieces_of(vocab) * kVec; j += blockDim.x) set_neg_inf(cache + j);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
}

// log Σ_j exp(z_j) of one row, computed by the whole block (every thread gets it).
template <class Source>
__device__ double row_logsumexp(const Source& src, float* red_f, double* red_d) {
  const int64_t n_pieces = pieces_of(src.vocab);
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < n_pieces; i += blockDim.x) {
    const float4 v = src.piece(i);
    mx = fmaxf(mx, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)));
  }
  mx = block_max(mx, red_f);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n_pieces; i += blockDim.x) {
    const float4 v = src.piece(i);
    sum += (expf(v.x - mx) + expf(v.y - mx)) + (expf(v.z - mx) + expf(v.w - mx));  // exp(−inf) = 0 pads
  }
  sum = block_sum(sum, red_d);
  return static_cast<double>(mx) + log(sum);
}

// row_loss[n] = logsumexp(logits[n]) − logits[n, target[n]], 0 for ignored rows.
template <class T, bool kCached, bool kVec4, int kBlock>
__global__ void __launch_bounds__(kBlock)
    cross_entropy_rows_kernel(double* row_loss, const T* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                              DeviceIssue* issue) {
  extern __shared__ __align__(16) unsigned char ce_smem[];  // kCached: T [pieces_of(vocab) · 4]
  T* ce_cache = reinterpret_cast<T*>(ce_smem);
  __shared__ float red_f[kWarp];
  __shared__ double red_d[kWarp];
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const int32_t tgt = targets[n];
    const bool valid = index_ok(issue, IssueSite::kCrossEntropyFwdTargets, n, tgt, vocab, true) && tgt != -1;
    if (!valid) {  // uniform across the block
      if (threadIdx.x == 0) row_loss[n] = 0.0;
      continue;
    }
    const T* row = logits + n * vocab;
    if constexpr (kCached) cache_row<T, kVec4>(ce_cache, row, vocab);
    const RowSource<T, kCached, kVec4> src{kCached ? ce_cache : row, vocab};
    const double lse = row_logsumexp(src, red_f, red_d);
    if (threadIdx.x == 0) row_loss[n] = lse - src.value(tgt);
    if constexpr (kCached) __syncthreads();  // the cache is refilled for the next row
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
template <class Out, class T, bool kCached, bool kVec4, int kBlock>
__global__ void __launch_bounds__(kBlock)
    cross_entropy_bwd_kernel(Out* dlogits, const T* logits, const int32_t* targets, const void* valid,
                             bool valid_is_i32, double grad_scale, int64_t rows, int64_t vocab, DeviceIssue* issue) {
  extern __shared__ __align__(16) unsigned char ce_smem[];  // kCached: T [pieces_of(vocab) · 4]
  T* ce_cache = reinterpret_cast<T*>(ce_smem);
  __shared__ float red_f[kWarp];
  __shared__ double red_d[kWarp];
  const double n_valid = valid_is_i32 ? static_cast<double>(static_cast<const int32_t*>(valid)[0])
                                      : static_cast<double>(static_cast<const float*>(valid)[0]);
  const float coef = n_valid > 0.0 ? static_cast<float>(grad_scale / n_valid) : 0.0f;
  const int64_t n_pieces = pieces_of(vocab);
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const int32_t tgt = targets[n];
    const bool use = index_ok(issue, IssueSite::kCrossEntropyBwdTargets, n, tgt, vocab, true) && tgt != -1;
    Out* drow = dlogits + n * vocab;
    if (!use) {  // uniform across the block
      if constexpr (kVec4) {
        for (int64_t i = threadIdx.x; i < n_pieces; i += blockDim.x) store4(drow + i * kVec, make_float4(0, 0, 0, 0));
      } else {
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) store1(drow + j, 0.0f);
      }
      continue;
    }
    const T* row = logits + n * vocab;
    if constexpr (kCached) cache_row<T, kVec4>(ce_cache, row, vocab);
    const RowSource<T, kCached, kVec4> src{kCached ? ce_cache : row, vocab};
    const double lse = row_logsumexp(src, red_f, red_d);
    // z − lse = (z − hi) − lo with lse = hi + lo (two floats): f32 arithmetic, ≤ 1 ulp of the result.
    const float lse_hi = static_cast<float>(lse), lse_lo = static_cast<float>(lse - lse_hi);
    const auto grad = [&](float z, int64_t j) {
      const float p = expf((z - lse_hi) - lse_lo);  // softmax
      return coef * (j == tgt ? p - 1.0f : p);
    };
    for (int64_t i = threadIdx.x; i < n_pieces; i += blockDim.x) {
      const float4 z = src.piece(i);
      if constexpr (kVec4) {
        float4 g;
#pragma unroll
        for (int k = 0; k < kVec; ++k) at(g, k) = grad(at(z, k), i * kVec + k);
        store4(drow + i * kVec, g);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          if (i * kVec + k < vocab) store1(drow + i * kVec + k, grad(at(z, k), i * kVec + k));
      }
    }
    if constexpr (kCached) __syncthreads();  // the cache is refilled for the next row
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)); }

// The cached path's dynamic shared memory for rows of elem_bytes values, or 0 when the row does not
// fit (streaming path).
size_t cached_row_bytes(const CudaBackend& be, int64_t vocab, size_t elem_bytes) {
  const size_t bytes = static_cast<size_t>(pieces_of(vocab)) * kVec * elem_bytes;
  return bytes + kStaticSmemBytes <= be.max_shared_bytes() ? bytes : 0;
}

template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace

void CudaBackend::cross_entropy_fwd(Context ctx, const CrossEntropyFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "cross_entropy_fwd");
  constexpr std::string_view kOp = "cross_entropy_fwd";
  const CrossEntropyDims d = validate_cross_entropy_fwd(a, Device::kCUDA);
  require_f32_or_bf16(a.logits, kOp, "logits");
  if (d.rows == 0) return;
  const cudaStream_t s = stream(ctx);
  auto* row_loss = static_cast<double*>(scratch(static_cast<size_t>(d.rows) * sizeof(double)));
  const auto run = [&](const auto* logits) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(logits)>>;
    const size_t cache = cached_row_bytes(*this, d.vocab, sizeof(T));
    const bool vec4 = vec_sizes({d.vocab}) && vec_aligned(logits);
    const auto launch = [&](auto kernel, int threads, size_t smem) {
      allow_smem(kernel, smem);
      kernel<<<row_blocks(d.rows), threads, smem, s>>>(row_loss, logits, i32(a.targets), d.rows, d.vocab, issue());
      CUDA_CHECK_LAUNCH(kOp);
    };
    if (cache > 0 && vec4) launch(cross_entropy_rows_kernel<T, true, true, kCachedThreads>, kCachedThreads, cache);
    else if (cache > 0) launch(cross_entropy_rows_kernel<T, true, false, kCachedThreads>, kCachedThreads, cache);
    else if (vec4) launch(cross_entropy_rows_kernel<T, false, true, kRowThreads>, kRowThreads, 0);
    else launch(cross_entropy_rows_kernel<T, false, false, kRowThreads>, kRowThreads, 0);
  };
  if (a.logits.dtype == DType::kBF16) run(static_cast<const __nv_bfloat16*>(a.logits.data));
  else run(static_cast<const float*>(a.logits.data));
  cross_entropy_total_kernel<<<1, 1024, 0, s>>>(f32(a.loss_sum), a.valid.data, a.valid.dtype == DType::kI32, row_loss,
                                                i32(a.targets), d.rows, d.vocab);
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::cross_entropy_bwd(Context ctx, const CrossEntropyBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "cross_entropy_bwd");
  constexpr std::string_view kOp = "cross_entropy_bwd";
  const CrossEntropyDims d = validate_cross_entropy_bwd(a, Device::kCUDA);
  require_f32_or_bf16(a.logits, kOp, "logits");
  if (d.rows == 0) return;
  const auto run = [&](auto* dlogits, const auto* logits) {
    using Out = std::remove_pointer_t<decltype(dlogits)>;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(logits)>>;
    const size_t cache = cached_row_bytes(*this, d.vocab, sizeof(T));
    const bool vec4 = vec_sizes({d.vocab}) && vec_aligned(logits) && vec_aligned(dlogits);
    const auto launch = [&](auto kernel, int threads, size_t smem) {
      allow_smem(kernel, smem);
      kernel<<<row_blocks(d.rows), threads, smem, stream(ctx)>>>(dlogits, logits, i32(a.targets), a.valid.data,
                                                                 a.valid.dtype == DType::kI32, a.grad_scale, d.rows,
                                                                 d.vocab, issue());
      CUDA_CHECK_LAUNCH(kOp);
    };
    if (cache > 0 && vec4) launch(cross_entropy_bwd_kernel<Out, T, true, true, kCachedThreads>, kCachedThreads, cache);
    else if (cache > 0) launch(cross_entropy_bwd_kernel<Out, T, true, false, kCachedThreads>, kCachedThreads, cache);
    else if (vec4) launch(cross_entropy_bwd_kernel<Out, T, false, true, kRowThreads>, kRowThreads, 0);
    else launch(cross_entropy_bwd_kernel<Out, T, false, false, kRowThreads>, kRowThreads, 0);
  };
  const auto with_logits = [&](auto* dlogits) {
    if (a.logits.dtype == DType::kBF16) run(dlogits, static_cast<const __nv_bfloat16*>(a.logits.data));
    else run(dlogits, static_cast<const float*>(a.logits.data));
  };
  if (a.dlogits.dtype == DType::kBF16) with_logits(static_cast<__nv_bfloat16*>(a.dlogits.data));
  else with_logits(f32(a.dlogits));
}

}  // namespace diffmoe
