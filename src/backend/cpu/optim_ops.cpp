// AdamW with decoupled weight decay and global-norm clipping folded in (op_args.h AdamWArgs) for
// the CPU reference backend. Per element, in double, rounded once to the tensor type on store.
// adamw_multi is the per-tensor op over its entries, in order (the spec of the CUDA one-launch form).
#include <algorithm>
#include <cmath>
#include <utility>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;

}  // namespace

void CpuBackend::adamw(Context, const AdamWArgs& args) {
  constexpr std::string_view kOp = "adamw";
  const DType dt = args.param.dtype;
  validate_adamw(args, Device::kCPU);
  const bool clipping = args.max_norm > 0.0;  // grad_sq is only read when clipping
  dispatch_float(dt, kOp, [&]<class T>() {
    // clip = min(1, max_norm / (sqrt(Σg²) + 1e-6)) from the device-resident global Σg².
    const double clip =
        clipping ? std::min(1.0, args.max_norm / (std::sqrt(static_cast<double>(args.grad_sq.ptr<T>()[0])) + 1e-6))
                 : 1.0;
    const double b1 = args.beta1, b2 = args.beta2;
    const double t = static_cast<double>(args.step);
    const double bias1 = 1.0 - std::pow(b1, t), bias2 = 1.0 - std::pow(b2, t);
    T* p = args.param.ptr<T>();
    T* m = args.m.ptr<T>();
    T* v = args.v.ptr<T>();
    const T* grad = args.grad.ptr<T>();
    auto* p16 = static_cast<uint16_t*>(args.param_bf16.data);  // null when no bf16 copy is asked for
    const int64_t n = args.param.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) {
      const double g = grad[i] * clip;
      const double mi = b1 * m[i] + (1.0 - b1) * g;  // m = b1·m + (1−b1)·g
      const double vi = b2 * v[i] + (1.0 - b2) * g * g;  // v = b2·v + (1−b2)·g²
      m[i] = static_cast<T>(mi);
      v[i] = static_cast<T>(vi);
      // p −= lr·( m̂ / (sqrt(v̂) + eps) + wd·p ), decoupled decay on the pre-update p.
      const double pi = p[i];
      const double update = (mi / bias1) / (std::sqrt(vi / bias2) + args.eps) + args.weight_decay * pi;
      p[i] = static_cast<T>(pi - args.lr * update);
      if (p16 != nullptr) p16[i] = f32_to_bf16(static_cast<float>(p[i]));  // through the stored value
    }
  });
}

void CpuBackend::adamw_multi(Context ctx, const AdamWMultiArgs& args) {
  validate_adamw_multi(args, Device::kCPU);  // every entry before any is updated
  for (const AdamWEntry& e : args.entries) {
    adamw(ctx, {.param = e.param, .m = e.m, .v = e.v, .grad = e.grad, .grad_sq = args.grad_sq, .lr = args.lr,
                .beta1 = args.beta1, .beta2 = args.beta2, .eps = args.eps, .weight_decay = e.weight_decay,
                .max_norm = args.max_norm, .step = args.step, .param_bf16 = e.param_bf16});
  }
}

}  // namespace diffmoe
