// SwiGLU (spec §4) on the GPU: h = silu(a) ⊙ b and its backward, one thread per element. The
// arithmetic runs in double and rounds once, as on the CPU (memory-bound: the f64 units are free
// here), so results match the reference to the last bit almost everywhere. In the bf16 GEMM mode h,
// da and db may be bf16 (they only feed GEMMs): rounded once more, from the f32 value.
#include <cuda_bf16.h>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

// σ(a) = 1 / (1 + e^−a): for very negative a, e^−a overflows to +inf and σ becomes 0, as it should.
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

template <class Out>
__global__ void swiglu_fwd_kernel(Out* h, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const double ai = a[i];
    store_as(h + i, ai * sigmoid(ai) * b[i]);
  }
}

// da = dh ⊙ b ⊙ silu'(a), silu'(a) = σ(a)(1 + a(1 − σ(a)));  db = dh ⊙ silu(a). Inputs are read
// before the outputs are written: da or db may alias an input (f32 outputs).
template <class Out>
__global__ void swiglu_bwd_kernel(Out* da, Out* db, const float* dh, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const double ai = a[i], bi = b[i], dhi = dh[i];
    const double sig = sigmoid(ai);
    store_as(da + i, dhi * bi * (sig * (1.0 + ai * (1.0 - sig))));
    store_as(db + i, dhi * ai * sig);
  }
}

}  // namespace

void CudaBackend::swiglu_fwd(Context ctx, const SwigluFwdArgs& args) {
  const OpScope profile_scope(*this, stream(ctx), "swiglu_fwd");
  validate_swiglu_fwd(args, Device::kCUDA);
  require_f32(args.a, "swiglu_fwd");
  const int64_t n = args.a.numel();
  if (n == 0) return;
  if (args.h.dtype == DType::kBF16)
    swiglu_fwd_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(static_cast<__nv_bfloat16*>(args.h.data), f32(args.a),
                                                                  f32(args.b), n);
  else
    swiglu_fwd_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(f32(args.h), f32(args.a), f32(args.b), n);
  CUDA_CHECK_LAUNCH("swiglu_fwd");
}

void CudaBackend::swiglu_bwd(Context ctx, const SwigluBwdArgs& args) {
  const OpScope profile_scope(*this, stream(ctx), "swiglu_bwd");
  validate_swiglu_bwd(args, Device::kCUDA);
  require_f32(args.a, "swiglu_bwd");
  const int64_t n = args.a.numel();
  if (n == 0) return;
  if (args.da.dtype == DType::kBF16)
    swiglu_bwd_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(static_cast<__nv_bfloat16*>(args.da.data),
                                                                  static_cast<__nv_bfloat16*>(args.db.data), f32(args.dh),
                                                                  f32(args.a), f32(args.b), n);
  else
    swiglu_bwd_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(f32(args.da), f32(args.db), f32(args.dh), f32(args.a),
                                                                  f32(args.b), n);
  CUDA_CHECK_LAUNCH("swiglu_bwd");
}

}  // namespace diffmoe
