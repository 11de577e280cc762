// SwiGLU (docs/model.md §4) on the GPU: h = silu(a) ⊙ b and its backward, element-wise over the flat tensors,
// kVec elements per thread access where every tensor is aligned (elementwise.cuh; a scalar tail and
// a scalar path for unaligned views).
//
// Arithmetic, by output type:
// - f32 outputs: double, rounded once, as on the CPU, so results match the reference to the last bit
//   almost everywhere.
// - bf16 outputs (the bf16 GEMM mode; h, da, db only feed GEMMs): f32, then one rounding to bf16. The
//   f32 value is within a few f32 ulps of the CPU's (expf ≤ 2 ulp, then four correctly rounded
//   operations), 2^-16 of a bf16 step, so the bf16 result is the CPU's f32 result in bf16 up to a
//   tie moved by one step (what the tests allow). Two places where f32 would lose that take the
//   double formula instead, per element: a < −80, where e^−a overflows f32 (σ would be 0 and 1 − σ
//   NaN while the double σ is still > 0), and 1 + a(1 − σ) within 2^-8 of 0 (silu'(a) crosses 0 near
//   a = −1.28, where the f32 sum loses digits: its error of a few 2^-24 grows, relative to a result
//   below 2^-8, toward a bf16 step; above 2^-8 it stays under ~2^-14). About 0.1% of elements.
// Inputs a, b (and dh) are f32, or bf16 where the bf16 GEMM mode's expert GEMMs wrote them in bf16
// (docs/model.md §7); bf16 inputs are widened exactly and take the same formulas.
// Why not double everywhere: the double exp and division per element made the forward
// compute-bound on the H100's f64 units (measured 1.7 of ~3 TB/s).
#include <cuda_bf16.h>

#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

// σ(a) = 1 / (1 + e^−a): for very negative a, e^−a overflows to +inf and σ becomes 0, as it should.
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

constexpr float kF32ExpLimit = -80.0f;  // below: e^−a is near the f32 overflow (e^88.7), use double

// ---------------------------------------------------------------- one element

// h = a·σ(a)·b, rounded once from double (the CPU's formula).
__device__ __forceinline__ float swiglu_f64(float a, float b) {
  const double ad = a;
  return static_cast<float>(ad * sigmoid(ad) * b);
}

template <class Out>
__device__ __forceinline__ float swiglu_value(float a, float b) {
  if constexpr (std::is_same_v<Out, float>) {
    return swiglu_f64(a, b);
  } else {
    if (a < kF32ExpLimit) return swiglu_f64(a, b);
    const float sig = __frcp_rn(1.0f + expf(-a));  // correctly rounded reciprocal, as 1.0f / x
    return a * sig * b;
  }
}

// da = dh·b·silu'(a), silu'(a) = σ(1 + a(1 − σ));  db = dh·a·σ   (the CPU's formula in double)
__device__ __forceinline__ void swiglu_grad_f64(float a, float b, float dh, float& da, float& db) {
  const double ad = a, bd = b, dhd = dh;
  const double sig = sigmoid(ad);
  da = static_cast<float>(dhd * bd * (sig * (1.0 + ad * (1.0 - sig))));
  db = static_cast<float>(dhd * ad * sig);
}

template <class Out>
__device__ __forceinline__ void swiglu_grad(float a, float b, float dh, float& da, float& db) {
  if constexpr (std::is_same_v<Out, float>) {
    swiglu_grad_f64(a, b, dh, da, db);
  } else {
    // 1 − σ = e·σ with e = e^−a: no cancellation when σ is near 1.
    const float e = expf(-a);
    const float sig = __frcp_rn(1.0f + e);
    const float one_plus = 1.0f + a * (e * sig);  // 1 + a(1 − σ)
    if (a < kF32ExpLimit || fabsf(one_plus) < 0x1p-8f) {
      swiglu_grad_f64(a, b, dh, da, db);
      return;
    }
    da = dh * b * (sig * one_plus);
    db = dh * a * sig;
  }
}

// ---------------------------------------------------------------- kernels

// h = silu(a) ⊙ b over n elements; kVec4: the first n/4·4 as float4 pieces, then a scalar tail.
// In: f32, or bf16 (a and b written in bf16 by the expert GEMMs in the bf16 GEMM mode), widened.
template <class Out, class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(Out* __restrict__ h, const In* __restrict__ a, const In* __restrict__ b, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x, first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  int64_t tail = 0;
  if constexpr (kVec4) {
    const int64_t n4 = n / kVec;
    for (int64_t i = first; i < n4; i += stride) {
      const float4 av = load4(a + i * kVec), bv = load4(b + i * kVec);
      float4 hv;
#pragma unroll
      for (int j = 0; j < kVec; ++j) at(hv, j) = swiglu_value<Out>(at(av, j), at(bv, j));
      store4(h + i * kVec, hv);
    }
    tail = n4 * kVec;
  }
  for (int64_t i = tail + first; i < n; i += stride) store1(h + i, swiglu_value<Out>(load1(a + i), load1(b + i)));
}

// da = dh ⊙ b ⊙ silu'(a), db = dh ⊙ silu(a). A thread reads its inputs before it writes its outputs:
// da or db may alias an input (f32 outputs), so no __restrict__ here. In: as swiglu_fwd_kernel's,
// for dh, a and b.
template <class Out, class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(Out* da, Out* db, const In* dh, const In* a, const In* b, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x, first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  int64_t tail = 0;
  if constexpr (kVec4) {
    const int64_t n4 = n / kVec;
    for (int64_t i = first; i < n4; i += stride) {
      const float4 av = load4(a + i * kVec), bv = load4(b + i * kVec), gv = load4(dh + i * kVec);
      float4 dav, dbv;
#pragma unroll
      for (int j = 0; j < kVec; ++j) swiglu_grad<Out>(at(av, j), at(bv, j), at(gv, j), at(dav, j), at(dbv, j));
      store4(da + i * kVec, dav);
      store4(db + i * kVec, dbv);
    }
    tail = n4 * kVec;
  }
  for (int64_t i = tail + first; i < n; i += stride) {
    float dai, dbi;
    swiglu_grad<Out>(load1(a + i), load1(b + i), load1(dh + i), dai, dbi);
    store1(da + i, dai);
    store1(db + i, dbi);
  }
}

// Threads for n elements: one per float4 piece on the vector path.
unsigned swiglu_grid(int64_t n, bool vec4) { return grid_for(vec4 ? (n + kVec - 1) / kVec : n); }

// The element type of a swiglu input: f32, or bf16 (the bf16 GEMM mode, validate_swiglu_*).
template <class In>
const In* in_ptr(const Tensor& t) {
  return static_cast<const In*>(t.data);
}

}  // namespace

void CudaBackend::swiglu_fwd(Context ctx, const SwigluFwdArgs& args) {
  const OpScope profile_scope(*this, stream(ctx), "swiglu_fwd");
  validate_swiglu_fwd(args, Device::kCUDA);
  require_f32_or_bf16(args.a, "swiglu_fwd", "a");
  const int64_t n = args.a.numel();
  if (n == 0) return;
  const auto launch = [&](auto* h, auto in_tag) {
    using Out = std::remove_pointer_t<decltype(h)>;
    using In = decltype(in_tag);
    const In *a = in_ptr<In>(args.a), *b = in_ptr<In>(args.b);
    if (vec_aligned(h) && vec_aligned(a) && vec_aligned(b))
      swiglu_fwd_kernel<Out, In, true><<<swiglu_grid(n, true), kThreads, 0, stream(ctx)>>>(h, a, b, n);
    else swiglu_fwd_kernel<Out, In, false><<<swiglu_grid(n, false), kThreads, 0, stream(ctx)>>>(h, a, b, n);
    CUDA_CHECK_LAUNCH("swiglu_fwd");
  };
  const auto with_in = [&](auto* h) {
    if (args.a.dtype == DType::kBF16) launch(h, __nv_bfloat16{});
    else launch(h, float{});
  };
  if (args.h.dtype == DType::kBF16) with_in(static_cast<__nv_bfloat16*>(args.h.data));
  else with_in(f32(args.h));
}

void CudaBackend::swiglu_bwd(Context ctx, const SwigluBwdArgs& args) {
  const OpScope profile_scope(*this, stream(ctx), "swiglu_bwd");
  validate_swiglu_bwd(args, Device::kCUDA);
  require_f32_or_bf16(args.a, "swiglu_bwd", "a");
  const int64_t n = args.a.numel();
  if (n == 0) return;
  const auto launch = [&](auto* da, auto* db, auto in_tag) {
    using Out = std::remove_pointer_t<decltype(da)>;
    using In = decltype(in_tag);
    const In *dh = in_ptr<In>(args.dh), *a = in_ptr<In>(args.a), *b = in_ptr<In>(args.b);
    const bool vec4 = vec_aligned(da) && vec_aligned(db) && vec_aligned(dh) && vec_aligned(a) && vec_aligned(b);
    if (vec4) swiglu_bwd_kernel<Out, In, true><<<swiglu_grid(n, true), kThreads, 0, stream(ctx)>>>(da, db, dh, a, b, n);
    else swiglu_bwd_kernel<Out, In, false><<<swiglu_grid(n, false), kThreads, 0, stream(ctx)>>>(da, db, dh, a, b, n);
    CUDA_CHECK_LAUNCH("swiglu_bwd");
  };
  const auto with_in = [&](auto* da, auto* db) {
    if (args.a.dtype == DType::kBF16) launch(da, db, __nv_bfloat16{});
    else launch(da, db, float{});
  };
  if (args.da.dtype == DType::kBF16)
    with_in(static_cast<__nv_bfloat16*>(args.da.data), static_cast<__nv_bfloat16*>(args.db.data));
  else with_in(f32(args.da), f32(args.db));
}

}  // namespace diffmoe
