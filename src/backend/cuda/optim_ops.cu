// AdamW with decoupled weight decay and global-norm clipping folded in (op_args.h AdamWArgs) on the
// GPU. One thread per element, in double like the CPU reference (memory-bound). The clip factor is
// computed by every thread from the device-resident grad_sq[0]: no host sync.
#include <cmath>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

struct AdamWConsts {
  double lr, beta1, beta2, eps, weight_decay, max_norm, bias1, bias2;  // bias_i = 1 − beta_i^step
};

__global__ void adamw_kernel(float* p, float* m, float* v, const float* grad, const float* grad_sq, AdamWConsts c,
                             int64_t n) {
  // clip = min(1, max_norm / (sqrt(Σg²) + 1e-6)) when clipping
  const double clip = c.max_norm > 0.0 ? fmin(1.0, c.max_norm / (sqrt(static_cast<double>(grad_sq[0])) + 1e-6)) : 1.0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const double g = grad[i] * clip;
    const double mi = c.beta1 * m[i] + (1.0 - c.beta1) * g;      // m = b1·m + (1−b1)·g
    const double vi = c.beta2 * v[i] + (1.0 - c.beta2) * g * g;  // v = b2·v + (1−b2)·g²
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    // p −= lr·( m̂ / (sqrt(v̂) + eps) + wd·p ), decoupled decay on the pre-update p.
    const double pi = p[i];
    const double update = (mi / c.bias1) / (sqrt(vi / c.bias2) + c.eps) + c.weight_decay * pi;
    p[i] = static_cast<float>(pi - c.lr * update);
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
  adamw_kernel<<<grid_for(n), kThreads, 0, stream(ctx)>>>(f32(a.param), f32(a.m), f32(a.v), f32(a.grad),
                                                          a.max_norm > 0.0 ? f32(a.grad_sq) : nullptr, c, n);
  CUDA_CHECK_LAUNCH("adamw");
}

}  // namespace diffmoe
