// Basic tensor ops and the token embedding (docs/model.md §1) on the GPU.
//
// Design: one thread per element with grid-stride loops. Element-wise arithmetic runs in double and
// rounds once to f32, as the CPU reference does (memory-bound, so the f64 units cost nothing here),
// which makes most results identical to the CPU's to the last bit.
// - copy converts between f32, f64, bf16 and f8e4m3 storage with the CPU's rounding rules
//   (core/dtype.cpp: bf16 round-to-nearest-even, e4m3 saturating RNE), re-implemented per element.
// - sum_squares: per-thread f64 sums (16-byte loads, four in flight per thread), a block sum into
//   one f64 partial per block, then one block adds the partials in a fixed order into out[0]. The
//   grid is a function of n alone and there are no atomics: bitwise reproducible.
// - count_nonfinite: one fused pass, the exponent bits tested per element (all ones = NaN or
//   ±inf), 16-byte loads, an integer block sum and one 64-bit atomicAdd per block: integer
//   addition is associative, so the count is exact and the same on every run.
// - embedding_bwd is deterministic without atomics: the token ids are stably sorted
//   (radix_sort.h), then one warp per distinct token adds that token's dout rows in token order,
//   the CPU's order exactly.
#include <cuda_bf16.h>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/radix_sort.h"
#include "backend/cuda/sum_squares.h"
#include "backend/op_validation.h"

namespace diffmoe {

// ================================================================ radix sort (radix_sort.h)
namespace cuda {

size_t sort_pairs_temp_bytes(int64_t n) {
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), static_cast<int>(n)));
  return bytes;
}

void sort_pairs(void* temp, size_t temp_bytes, const int32_t* keys_in, int32_t* keys_out, const int32_t* vals_in,
                int32_t* vals_out, int64_t n, cudaStream_t s) {
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out,
                                             static_cast<int>(n), 0, 32, s));
}

// ================================================================ f32 → bf16 (cuda_common.cuh)

// dst[i] = bf16(src[i]) for i < n, round to nearest even. 16-byte loads when src is 16-byte aligned
// and dst 8-byte aligned.
__global__ void f32_to_bf16_kernel(__nv_bfloat16* __restrict__ dst, const float* __restrict__ src, int64_t n,
                                   bool vec4) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t start = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
      reinterpret_cast<__nv_bfloat162*>(dst)[2 * i] = lo;
      reinterpret_cast<__nv_bfloat162*>(dst)[2 * i + 1] = hi;
    }
    start = n4 * 4;
  }
  for (int64_t i = start + blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride)
    dst[i] = __float2bfloat16_rn(src[i]);
}

void f32_to_bf16(void* dst, const float* src, int64_t n, cudaStream_t s, std::string_view op) {
  if (n == 0) return;
  const bool vec4 = reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  f32_to_bf16_kernel<<<grid_for(vec4 ? (n + 3) / 4 : n), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(dst), src, n,
                                                                           vec4);
  CUDA_CHECK_LAUNCH(op);
}

// dst[i] = f32(src[i]) for i < n: the bf16 bits in the upper half of an f32 (exact).
__global__ void bf16_to_f32_kernel(float* __restrict__ dst, const uint16_t* __restrict__ src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = __uint_as_float(static_cast<uint32_t>(src[i]) << 16);
}

void bf16_to_f32(float* dst, const void* src, int64_t n, cudaStream_t s, std::string_view op) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<grid_for(n), kThreads, 0, s>>>(dst, static_cast<const uint16_t*>(src), n);
  CUDA_CHECK_LAUNCH(op);
}

}  // namespace cuda

namespace {

using namespace cuda;

// ================================================================ fill and copy

template <class T>
__global__ void fill_kernel(T* out, int64_t n, T value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = value;
}

template <class T>
void launch_fill(void* out, int64_t n, T value, cudaStream_t s) {
  fill_kernel<T><<<grid_for(n), kThreads, 0, s>>>(static_cast<T*>(out), n, value);
  CUDA_CHECK_LAUNCH("fill");
}

// The float storage types copy() converts between (op_validation.h: f32, f64, bf16, f8e4m3).
enum class Storage : int { kF32, kF64, kBF16, kE4M3 };

Storage storage_of(DType d) {
  switch (d) {
    case DType::kF32: return Storage::kF32;
    case DType::kF64: return Storage::kF64;
    case DType::kBF16: return Storage::kBF16;
    default: return Storage::kE4M3;  // validate_copy admits nothing else
  }
}

// bf16 = upper half of an f32, round to nearest even; NaN stays a quiet NaN (core/dtype.cpp).
__device__ uint16_t to_bf16_bits(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__device__ float e4m3_value(uint8_t b) {
  const uint32_t sign = b >> 7, exp = (b >> 3) & 0xf, man = b & 0x7;
  if (exp == 0xf && man == 0x7) return __int_as_float(0x7fc00000);  // NaN
  const float mag = exp == 0 ? ldexpf(static_cast<float>(man), -9)  // subnormal: man/8 · 2^-6
                             : ldexpf(1.0f + static_cast<float>(man) / 8.0f, static_cast<int>(exp) - 7);
  return sign ? -mag : mag;
}

// f32 → e4m3 "FN", round to nearest even, saturating to ±448 (core/dtype.cpp's f32_to_e4m3): |x|
// is counted in units of the target's last place for its binade and rounded with rintf (ties to
// even); every step is exact in f32.
__device__ uint8_t to_e4m3_bits(float x) {
  if (isnan(x)) return 0x7f;
  const uint8_t sign = signbit(x) ? 0x80 : 0x00;
  const float a = fabsf(x);
  if (a >= 464.0f) return static_cast<uint8_t>(sign | 0x7e);  // also +inf
  int e = 0;
  frexpf(a, &e);
  const int unbiased = max(e - 1, -6);  // subnormals share the smallest binade's ulp, 2^-9
  const float ulp = ldexpf(1.0f, unbiased - 3);
  const float r = rintf(a / ulp) * ulp;
  if (r == 0.0f) return sign;
  int re = 0;
  frexpf(r, &re);
  const int rexp = re - 1;  // rounding may carry into the next binade
  if (rexp < -6) return static_cast<uint8_t>(sign | static_cast<uint8_t>(r / ldexpf(1.0f, -9)));
  const int man = static_cast<int>(r / ldexpf(1.0f, rexp - 3)) - 8;
  return static_cast<uint8_t>(sign | ((rexp + 7) << 3) | man);
}

__device__ double load_value(const void* p, Storage s, int64_t i) {
  switch (s) {
    case Storage::kF32: return static_cast<const float*>(p)[i];
    case Storage::kF64: return static_cast<const double*>(p)[i];
    case Storage::kBF16: return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
    default: return e4m3_value(static_cast<const uint8_t*>(p)[i]);
  }
}

// Narrowing to bf16/e4m3 rounds through f32 first, as the CPU does.
__device__ void store_value(void* p, Storage s, int64_t i, double v) {
  switch (s) {
    case Storage::kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case Storage::kF64: static_cast<double*>(p)[i] = v; break;
    case Storage::kBF16: static_cast<uint16_t*>(p)[i] = to_bf16_bits(static_cast<float>(v)); break;
    default: static_cast<uint8_t*>(p)[i] = to_e4m3_bits(static_cast<float>(v)); break;
  }
}

__global__ void convert_kernel(void* dst, Storage dst_type, const void* src, Storage src_type, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    store_value(dst, dst_type, i, load_value(src, src_type, i));
}

// ================================================================ axpy, scale, sum_squares

__global__ void axpy_kernel(float* y, const float* x, double alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    y[i] = static_cast<float>(static_cast<double>(y[i]) + alpha * static_cast<double>(x[i]));
}

__global__ void scale_kernel(float* y, double alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    y[i] = static_cast<float>(alpha * static_cast<double>(y[i]));
}

constexpr int kSumSqUnroll = 4;            // float4 loads in flight per thread
constexpr int64_t kSumSqMaxBlocks = 1024;  // partials per call: a full H100 wave of 256-thread blocks

// Blocks for n elements: about one float4 per unrolled load per thread, capped; a function of n
// only, so the order of the sums (and the result) does not depend on the device.
int64_t sum_squares_blocks(int64_t n) {
  return std::clamp<int64_t>((n + kThreads * 4 * kSumSqUnroll - 1) / (kThreads * 4 * kSumSqUnroll), 1, kSumSqMaxBlocks);
}

// partial[b] = Σ x² over block b's elements (grid-stride), in f64. vec4: x is 16-byte aligned and
// the first n/4·4 elements move as float4, kSumSqUnroll loads issued before they are added.
__global__ void sum_squares_partial_kernel(double* partial, const float* x, int64_t n, bool vec4) {
  __shared__ double smem[kWarp];
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  double s = 0.0;
  int64_t start = 0;
  if (vec4) {
    const auto* x4 = reinterpret_cast<const float4*>(x);
    const int64_t n4 = n / 4;
    for (; i + (kSumSqUnroll - 1) * stride < n4; i += kSumSqUnroll * stride) {
      float4 v[kSumSqUnroll];
#pragma unroll
      for (int u = 0; u < kSumSqUnroll; ++u) v[u] = x4[i + u * stride];
#pragma unroll
      for (int u = 0; u < kSumSqUnroll; ++u) {
        const double a = v[u].x, b = v[u].y, c = v[u].z, d = v[u].w;
        s += a * a + b * b + c * c + d * d;
      }
    }
    for (; i < n4; i += stride) {
      const float4 v = x4[i];
      const double a = v.x, b = v.y, c = v.z, d = v.w;
      s += a * a + b * b + c * c + d * d;
    }
    start = n4 * 4;
    i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  }
  for (i += start; i < n; i += stride) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  s = block_sum(s, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] += Σ_b partial[b]: thread t adds partials t, t + kFinishThreads, … in order, then a fixed
// block tree. A whole block, not one warp: the grouped wgrad's Σ C² has ~12K partials, whose
// serial loads took one warp ~30 µs a call.
constexpr int kFinishThreads = 1024;
__global__ void __launch_bounds__(kFinishThreads)
    sum_squares_finish_kernel(float* out, const double* partial, int64_t blocks) {
  __shared__ double smem[kFinishThreads / kWarp];
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kFinishThreads) s += partial[b];
  s = block_sum(s, smem);
  if (threadIdx.x == 0) out[0] = static_cast<float>(static_cast<double>(out[0]) + s);
}

// ================================================================ embedding

// out[n, d] = scale · table[tokens[n], d]; a bad token leaves its row untouched (device_issue.h).
__global__ void embedding_fwd_kernel(float* out, const int32_t* tokens, const float* table, int64_t rows, int64_t vocab,
                                     int64_t dim, double scale, DeviceIssue* issue) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * dim;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = i / dim, d = i % dim;
    const int32_t t = tokens[n];
    if (!index_ok(issue, IssueSite::kEmbeddingFwdTokens, n, t, vocab)) continue;
    out[i] = static_cast<float>(scale * static_cast<double>(table[t * dim + d]));
  }
}

__global__ void iota_kernel(int32_t* v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    v[i] = static_cast<int32_t>(i);
}

// One warp per run of equal sorted token ids: dtable[t, :] += scale · dout[n, :] for the run's rows n
// in increasing order (the sort is stable), lanes over columns. Only the warp at a run's first
// position works, so every dtable row has exactly one writer.
__global__ void embedding_bwd_kernel(float* dtable, const int32_t* sorted_tok, const int32_t* sorted_row,
                                     const float* dout, int64_t rows, int64_t vocab, int64_t dim, double scale,
                                     DeviceIssue* issue) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n_warps = int64_t{gridDim.x} * blockDim.x / kWarp;
  for (int64_t i = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp; i < rows; i += n_warps) {
    const int32_t t = sorted_tok[i];
    if (i > 0 && sorted_tok[i - 1] == t) continue;  // not the first row of its run
    if (!index_ok(issue, IssueSite::kEmbeddingBwdTokens, sorted_row[i], t, vocab)) continue;
    int64_t end = i + 1;
    while (end < rows && sorted_tok[end] == t) ++end;
    for (int64_t d = lane; d < dim; d += kWarp) {
      float acc = dtable[t * dim + d];
      for (int64_t j = i; j < end; ++j)
        acc = static_cast<float>(static_cast<double>(acc) + scale * static_cast<double>(dout[sorted_row[j] * dim + d]));
      dtable[t * dim + d] = acc;
    }
  }
}

// ================================================================ count_nonfinite

constexpr int64_t kCountMaxBlocks = 1024;  // atomics per call: one per block, a full H100 wave at most

// An f32 / bf16 is NaN or ±inf exactly when its exponent bits are all ones.
__device__ __forceinline__ unsigned long long nonfinite_f32(uint32_t bits) {
  return (bits & 0x7f800000u) == 0x7f800000u;
}
__device__ __forceinline__ unsigned long long nonfinite_bf16(uint16_t bits) { return (bits & 0x7f80u) == 0x7f80u; }

// count[0] += non-finite elements of x[0, n) (the op zeroes count first). x is read as 32-bit words (f32) or 16-bit
// words (bf16); vec4: 16-byte aligned, the first n/4·4 f32 (or n/8·8 bf16) move as uint4.
template <bool kBf16>
__global__ void count_nonfinite_kernel(unsigned long long* count, const void* x, int64_t n, bool vec4) {
  __shared__ unsigned long long smem[kWarp];
  constexpr int64_t kPerVec = kBf16 ? 8 : 4;  // elements per 16-byte load
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  unsigned long long c = 0;
  int64_t start = 0;
  if (vec4) {
    const auto* x4 = static_cast<const uint4*>(x);
    const int64_t nv = n / kPerVec;
    for (int64_t i = first; i < nv; i += stride) {
      const uint4 v = x4[i];
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (kBf16) {
          c +=
              nonfinite_bf16(static_cast<uint16_t>(w[k] & 0xffffu)) + nonfinite_bf16(static_cast<uint16_t>(w[k] >> 16));
        } else {
          c += nonfinite_f32(w[k]);
        }
      }
    }
    start = nv * kPerVec;
  }
  for (int64_t i = start + first; i < n; i += stride) {
    if constexpr (kBf16) c += nonfinite_bf16(static_cast<const uint16_t*>(x)[i]);
    else c += nonfinite_f32(static_cast<const uint32_t*>(x)[i]);
  }
  c = block_sum(c, smem);
  if (threadIdx.x == 0 && c != 0) atomicAdd(count, c);
}

}  // namespace

void CudaBackend::fill(Context ctx, const FillArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "fill");
  validate_fill(a, Device::kCUDA);
  const int64_t n = a.out.numel();
  if (n == 0) return;
  const cudaStream_t s = stream(ctx);
  switch (a.out.dtype) {
    case DType::kF32: {
      const float v = static_cast<float>(a.value);
      if (v == 0.0f && !std::signbit(v)) {
        CUDA_CHECK(cudaMemsetAsync(a.out.data, 0, a.out.nbytes(), s));
        return;
      }
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      return launch_fill<uint32_t>(a.out.data, n, bits, s);
    }
    case DType::kF64: {
      uint64_t bits;
      std::memcpy(&bits, &a.value, sizeof bits);
      return launch_fill<uint64_t>(a.out.data, n, bits, s);
    }
    case DType::kI32:
      return launch_fill<uint32_t>(a.out.data, n, static_cast<uint32_t>(static_cast<int32_t>(a.value)), s);
    case DType::kBF16: return launch_fill<uint16_t>(a.out.data, n, f32_to_bf16(static_cast<float>(a.value)), s);
    case DType::kF8E4M3: return launch_fill<uint8_t>(a.out.data, n, f32_to_e4m3(static_cast<float>(a.value)), s);
    default:
      DIFFMOE_FAIL("[fill] the CUDA backend fills f32, f64, bf16, f8e4m3 or i32 tensors, got {}",
                   dtype_name(a.out.dtype));
  }
}

void CudaBackend::copy(Context ctx, const CopyArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "copy");
  validate_copy(a, Device::kCUDA);
  const int64_t n = a.src.numel();
  if (n == 0) return;
  const cudaStream_t s = stream(ctx);
  if (a.dst.dtype == a.src.dtype) {
    if (a.dst.data == a.src.data) return;
    const auto* d = static_cast<const char*>(a.dst.data);
    const auto* sp = static_cast<const char*>(a.src.data);
    const size_t bytes = a.src.nbytes();
    if (d < sp + bytes && sp < d + bytes) {  // overlapping ranges (the CPU memmoves): through scratch
      void* tmp = scratch(bytes);
      CUDA_CHECK(cudaMemcpyAsync(tmp, a.src.data, bytes, cudaMemcpyDeviceToDevice, s));
      CUDA_CHECK(cudaMemcpyAsync(a.dst.data, tmp, bytes, cudaMemcpyDeviceToDevice, s));
      return;
    }
    CUDA_CHECK(cudaMemcpyAsync(a.dst.data, a.src.data, bytes, cudaMemcpyDeviceToDevice, s));
    return;
  }
  if (a.src.dtype == DType::kF32 && a.dst.dtype == DType::kBF16) {  // the hot conversion (bf16 weight copies)
    f32_to_bf16(a.dst.data, f32(a.src), n, s, "copy");
    return;
  }
  convert_kernel<<<grid_for(n), kThreads, 0, s>>>(a.dst.data, storage_of(a.dst.dtype), a.src.data,
                                                  storage_of(a.src.dtype), n);
  CUDA_CHECK_LAUNCH("copy");
}

void CudaBackend::axpy(Context ctx, const AxpyArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "axpy");
  validate_axpy(a, Device::kCUDA);
  require_f32(a.y, "axpy");
  const int64_t n = a.y.numel();
  if (n == 0) return;
  axpy_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(f32(a.y), f32(a.x), a.alpha, n);
  CUDA_CHECK_LAUNCH("axpy");
}

void CudaBackend::scale(Context ctx, const ScaleArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "scale");
  validate_scale(a, Device::kCUDA);
  require_f32(a.y, "scale");
  const int64_t n = a.y.numel();
  if (n == 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(f32(a.y), a.alpha, n);
  CUDA_CHECK_LAUNCH("scale");
}

namespace cuda {  // sum_squares.h

int64_t sum_squares_partials(int64_t n) { return sum_squares_blocks(n); }

void launch_sum_squares(float* out, const float* x, int64_t n, double* partial, cudaStream_t s) {
  if (n == 0) return;
  const int64_t blocks = sum_squares_blocks(n);
  const bool vec4 = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  sum_squares_partial_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(partial, x, n, vec4);
  CUDA_CHECK_LAUNCH("sum_squares");
  launch_add_partial_sums(out, partial, blocks, s);
}

void launch_add_partial_sums(float* out, const double* partial, int64_t n, cudaStream_t s) {
  sum_squares_finish_kernel<<<1, kFinishThreads, 0, s>>>(out, partial, n);
  CUDA_CHECK_LAUNCH("sum_squares finish");
}

}  // namespace cuda

void CudaBackend::sum_squares(Context ctx, const SumSquaresArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "sum_squares");
  validate_sum_squares(a, Device::kCUDA);
  require_f32(a.out, "sum_squares");
  const int64_t n = a.x.numel();
  if (n == 0) return;
  auto* partial = static_cast<double*>(scratch(static_cast<size_t>(cuda::sum_squares_partials(n)) * sizeof(double)));
  cuda::launch_sum_squares(f32(a.out), f32(a.x), n, partial, stream(ctx));
}

void CudaBackend::count_nonfinite(Context ctx, const CountNonfiniteArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "count_nonfinite");
  validate_count_nonfinite(a, Device::kCUDA);
  require_f32_or_bf16(a.x, "count_nonfinite", "x");
  const int64_t n = a.x.numel();
  auto* count = static_cast<unsigned long long*>(a.count.data);  // i64 storage; counts never exceed 2^63
  CUDA_CHECK(cudaMemsetAsync(count, 0, sizeof(unsigned long long), stream(ctx)));
  if (n == 0) return;
  const bool bf16 = a.x.dtype == DType::kBF16;
  const bool vec4 = reinterpret_cast<uintptr_t>(a.x.data) % 16 == 0;
  const int64_t per_block = int64_t{kThreads} * (bf16 ? 8 : 4);
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>((n + per_block - 1) / per_block, 1, kCountMaxBlocks));
  if (bf16) count_nonfinite_kernel<true><<<blocks, kThreads, 0, stream(ctx)>>>(count, a.x.data, n, vec4);
  else count_nonfinite_kernel<false><<<blocks, kThreads, 0, stream(ctx)>>>(count, a.x.data, n, vec4);
  CUDA_CHECK_LAUNCH("count_nonfinite");
}

void CudaBackend::embedding_fwd(Context ctx, const EmbeddingFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "embedding_fwd");
  const EmbeddingDims d = validate_embedding_fwd(a, Device::kCUDA);
  require_f32(a.table, "embedding_fwd");
  if (d.rows * d.dim == 0) return;
  embedding_fwd_kernel<<<grid_for(d.rows * d.dim), kThreads, 0, stream(ctx)>>>(
      f32(a.out), i32(a.tokens), f32(a.table), d.rows, d.vocab, d.dim, a.scale, issue());
  CUDA_CHECK_LAUNCH("embedding_fwd");
}

void CudaBackend::embedding_bwd(Context ctx, const EmbeddingBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "embedding_bwd");
  const EmbeddingDims d = validate_embedding_bwd(a, Device::kCUDA);
  require_f32(a.dtable, "embedding_bwd");
  if (d.rows == 0 || d.dim == 0) return;
  DIFFMOE_CHECK(d.rows <= INT_MAX, "[embedding_bwd] {} tokens exceed the sort's i32 range", d.rows);
  const cudaStream_t s = stream(ctx);
  // Scratch: sorted ids, row ids (in, sorted), CUB's temporaries.
  const size_t ids_bytes = align256(static_cast<size_t>(d.rows) * sizeof(int32_t));
  const size_t temp_bytes = sort_pairs_temp_bytes(d.rows);
  char* base = static_cast<char*>(scratch(3 * ids_bytes + temp_bytes));
  auto* sorted_tok = reinterpret_cast<int32_t*>(base);
  auto* row_in = reinterpret_cast<int32_t*>(base + ids_bytes);
  auto* sorted_row = reinterpret_cast<int32_t*>(base + 2 * ids_bytes);
  iota_kernel<<<grid_for(d.rows), kThreads, 0, s>>>(row_in, d.rows);
  CUDA_CHECK_LAUNCH("embedding_bwd");
  sort_pairs(base + 3 * ids_bytes, temp_bytes, i32(a.tokens), sorted_tok, row_in, sorted_row, d.rows, s);
  embedding_bwd_kernel<<<grid_for(d.rows * kWarp), kThreads, 0, s>>>(f32(a.dtable), sorted_tok, sorted_row, f32(a.dout),
                                                                     d.rows, d.vocab, d.dim, a.scale, issue());
  CUDA_CHECK_LAUNCH("embedding_bwd");
}

}  // namespace diffmoe
