// AdamW with decoupled weight decay and global-norm clipping folded in (op_args.h AdamWArgs) for
// the CPU reference backend. Per element, in double, rounded once to the tensor type on store (bf16
// moments: to f32, then to bf16 with round to nearest even, as the CUDA kernel stores them).
// adamw_multi is the per-tensor op over its entries, in order (the spec of the CUDA one-launch form).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;

// The moments' storage: the param's type T, or bf16 (uint16_t bits) holding bf16(f32(x)) rounded to
// nearest even, as the CUDA kernel's __float2bfloat16_rn(float) stores it (op_args.h AdamWArgs).
template <class T>
double load_moment(const T* a, int64_t i) {
  return a[i];
}
template <>
double load_moment<uint16_t>(const uint16_t* a, int64_t i) {
  return bf16_to_f32(a[i]);
}
template <class T, class M>
void store_moment(M* a, int64_t i, double x) {
  if constexpr (std::is_same_v<M, uint16_t>) a[i] = f32_to_bf16(static_cast<float>(x));
  else a[i] = static_cast<T>(x);
}

}  // namespace

void CpuBackend::adamw(Context, const AdamWArgs& args) {
  constexpr std::string_view kOp = "adamw";
  const DType dt = args.param.dtype;
  validate_adamw(args, Device::kCPU);
  const bool clipping = args.max_norm > 0.0;  // grad_sq is only read when clipping
  const bool bf16_moments = args.m.dtype == DType::kBF16;
  dispatch_float(dt, kOp, [&]<class T>() {
    // clip = min(1, max_norm / (sqrt(Σg²) + 1e-6)) from the device-resident global Σg².
    const double clip =
        clipping ? std::min(1.0, args.max_norm / (std::sqrt(static_cast<double>(args.grad_sq.ptr<T>()[0])) + 1e-6))
                 : 1.0;
    const double b1 = args.beta1, b2 = args.beta2;
    const double t = static_cast<double>(args.step);
    const double bias1 = 1.0 - std::pow(b1, t), bias2 = 1.0 - std::pow(b2, t);
    T* p = args.param.ptr<T>();
    const T* grad = args.grad.ptr<T>();
    auto* p16 = static_cast<uint16_t*>(args.param_bf16.data);  // null when no bf16 copy is asked for
    const int64_t n = args.param.numel();
    const auto update = [&]<class M>(M* m, M* v) {
#pragma omp parallel for if (n >= kParallelMinWork)
      for (int64_t i = 0; i < n; ++i) {
        const double g = grad[i] * clip;
        const double mi = b1 * load_moment(m, i) + (1.0 - b1) * g;      // m = b1·m + (1−b1)·g
        const double vi = b2 * load_moment(v, i) + (1.0 - b2) * g * g;  // v = b2·v + (1−b2)·g²
        store_moment<T>(m, i, mi);
        store_moment<T>(v, i, vi);
        // p −= lr·( m̂ / (sqrt(v̂) + eps) + wd·p ), decoupled decay on the pre-update p.
        const double pi = p[i];
        const double step = (mi / bias1) / (std::sqrt(vi / bias2) + args.eps) + args.weight_decay * pi;
        p[i] = static_cast<T>(pi - args.lr * step);
        if (p16 != nullptr) p16[i] = f32_to_bf16(static_cast<float>(p[i]));  // through the stored value
      }
    };
    if (bf16_moments) update(static_cast<uint16_t*>(args.m.data), static_cast<uint16_t*>(args.v.data));
    else update(args.m.ptr<T>(), args.v.ptr<T>());
  });
}

void CpuBackend::adamw_multi(Context ctx, const AdamWMultiArgs& args) {
  validate_adamw_multi(args, Device::kCPU);  // every entry before any is updated
  for (const AdamWEntry& e : args.entries) {
    adamw(ctx, {.param = e.param,
                .m = e.m,
                .v = e.v,
                .grad = e.grad,
                .grad_sq = args.grad_sq,
                .lr = args.lr,
                .beta1 = args.beta1,
                .beta2 = args.beta2,
                .eps = args.eps,
                .weight_decay = e.weight_decay,
                .max_norm = args.max_norm,
                .step = args.step,
                .param_bf16 = e.param_bf16});
  }
}

}  // namespace diffmoe
