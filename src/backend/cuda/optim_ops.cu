// AdamW with decoupled weight decay and global-norm clipping folded in (op_args.h AdamWArgs) on the
// GPU. One thread per element, in double like the CPU reference (memory-bound). The clip factor is
// computed by every thread from the device-resident grad_sq[0]: no host sync.
#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

struct AdamWConsts {
  double lr, beta1, beta2, eps, weight_decay, max_norm, bias1, bias2;  // bias_i = 1 − beta_i^step
};

// One element: m = b1·m + (1−b1)·g;  v = b2·v + (1−b2)·g²;
// p −= lr·( m̂ / (sqrt(v̂) + eps) + wd·p ), decoupled decay on the pre-update p.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float grad, double clip,
                                              const AdamWConsts& c) {
  const double g = grad * clip;
  const double mi = c.beta1 * m + (1.0 - c.beta1) * g;
  const double vi = c.beta2 * v + (1.0 - c.beta2) * g * g;
  m = static_cast<float>(mi);
  v = static_cast<float>(vi);
  const double pi = p;
  const double update = (mi / c.bias1) / (sqrt(vi / c.bias2) + c.eps) + c.weight_decay * pi;
  p = static_cast<float>(pi - c.lr * update);
}

// vec4: all four arrays are 16-byte aligned (and p16, when given, 8-byte aligned), so the first
// n/4·4 elements move as float4 (the op is memory-bound: 16 bytes read and 12 written per element,
// 2 more with the bf16 copy); the tail, or everything otherwise, by scalars. The arithmetic per
// element is the same either way. p16: the bf16 weight copy (AdamWArgs::param_bf16), or null.
__global__ void adamw_kernel(float* p, float* m, float* v, const float* grad, const float* grad_sq, AdamWConsts c,
                             int64_t n, bool vec4, __nv_bfloat16* p16) {
  // clip = min(1, max_norm / (sqrt(Σg²) + 1e-6)) when clipping
  const double clip = c.max_norm > 0.0 ? fmin(1.0, c.max_norm / (sqrt(static_cast<double>(grad_sq[0])) + 1e-6)) : 1.0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t start = 0;
  if (vec4) {
    for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n / 4; i += stride) {
      float4 pi = reinterpret_cast<float4*>(p)[i], mi = reinterpret_cast<float4*>(m)[i],
             vi = reinterpret_cast<float4*>(v)[i];
      const float4 gi = reinterpret_cast<const float4*>(grad)[i];
      adamw_element(pi.x, mi.x, vi.x, gi.x, clip, c);
      adamw_element(pi.y, mi.y, vi.y, gi.y, clip, c);
      adamw_element(pi.z, mi.z, vi.z, gi.z, clip, c);
      adamw_element(pi.w, mi.w, vi.w, gi.w, clip, c);
      reinterpret_cast<float4*>(p)[i] = pi;
      reinterpret_cast<float4*>(m)[i] = mi;
      reinterpret_cast<float4*>(v)[i] = vi;
      if (p16 != nullptr) {
        reinterpret_cast<__nv_bfloat162*>(p16)[2 * i] = __floats2bfloat162_rn(pi.x, pi.y);
        reinterpret_cast<__nv_bfloat162*>(p16)[2 * i + 1] = __floats2bfloat162_rn(pi.z, pi.w);
      }
    }
    start = n / 4 * 4;
  }
  for (int64_t i = start + blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
    adamw_element(p[i], m[i], v[i], grad[i], clip, c);
    if (p16 != nullptr) p16[i] = __float2bfloat16_rn(p[i]);
  }
}

}  // namespace

void CudaBackend::adamw(Context ctx, const AdamWArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "adamw");
  validate_adamw(a, Device::kCUDA);
  require_f32(a.param, "adamw");
  const int64_t n = a.param.numel();
  if (n == 0) return;
  const double t = static_cast<double>(a.step);
  const AdamWConsts c{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.max_norm, 1.0 - std::pow(a.beta1, t),
                      1.0 - std::pow(a.beta2, t)};
  const auto aligned = [](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data) % 16 == 0; };
  auto* p16 = static_cast<__nv_bfloat16*>(a.param_bf16.data);  // null when no bf16 copy is asked for
  const bool vec4 = aligned(a.param) && aligned(a.m) && aligned(a.v) && aligned(a.grad) &&
                    reinterpret_cast<uintptr_t>(p16) % 8 == 0;
  adamw_kernel<<<grid_for(vec4 ? (n + 3) / 4 : n), kThreads, 0, stream(ctx)>>>(
      f32(a.param), f32(a.m), f32(a.v), f32(a.grad), a.max_norm > 0.0 ? f32(a.grad_sq) : nullptr, c, n, vec4, p16);
  CUDA_CHECK_LAUNCH("adamw");
}

}  // namespace diffmoe
