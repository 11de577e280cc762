// SwiGLU activation (docs/model.md §4, sources Appendix A) of the CPU reference backend: h = silu(a) ⊙ b.
// Element-wise, computed in double and rounded once to the tensor type. bf16 tensors (f32 calls, the
// bf16 GEMM mode's expert activations): inputs widened exactly, outputs the f32 result rounded once
// (bf16_staging.h).
#include <cmath>

#include "backend/cpu/bf16_staging.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;
// σ(a) = 1 / (1 + e^−a): for very negative a, e^−a overflows to +inf and σ becomes 0, as it should.
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace

// h = silu(a) ⊙ b,  silu(a) = a·σ(a)
void CpuBackend::swiglu_fwd(Context, const SwigluFwdArgs& args) {
  constexpr std::string_view kOp = "swiglu_fwd";
  validate_swiglu_fwd(args, Device::kCPU);
  Bf16Staging staged(scratch_);
  const Tensor ta = staged.input(args.a), tb = staged.input(args.b), th = staged.output(args.h);
  dispatch_float(ta.dtype, kOp, [&]<class T>() {
    const T* a = ta.ptr<T>();
    const T* b = tb.ptr<T>();
    T* h = th.ptr<T>();
    const int64_t n = ta.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) {
      const double ai = a[i];
      h[i] = static_cast<T>(ai * sigmoid(ai) * b[i]);
    }
  });
  staged.finish();
}

// da = dh ⊙ b ⊙ silu'(a),  silu'(a) = σ(a)(1 + a(1 − σ(a)));  db = dh ⊙ silu(a)   (both overwritten)
void CpuBackend::swiglu_bwd(Context, const SwigluBwdArgs& args) {
  constexpr std::string_view kOp = "swiglu_bwd";
  validate_swiglu_bwd(args, Device::kCPU);
  Bf16Staging staged(scratch_);
  const Tensor ta = staged.input(args.a), tb = staged.input(args.b), tdh = staged.input(args.dh);
  const Tensor tda = staged.output(args.da), tdb = staged.output(args.db);
  dispatch_float(ta.dtype, kOp, [&]<class T>() {
    const T* a = ta.ptr<T>();
    const T* b = tb.ptr<T>();
    const T* dh = tdh.ptr<T>();
    T* da = tda.ptr<T>();
    T* db = tdb.ptr<T>();
    const int64_t n = ta.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) {
      // Read everything first: da or db may alias an input.
      const double ai = a[i], bi = b[i], dhi = dh[i];
      const double sig = sigmoid(ai);
      const double silu_grad = sig * (1.0 + ai * (1.0 - sig));
      da[i] = static_cast<T>(dhi * bi * silu_grad);
      db[i] = static_cast<T>(dhi * ai * sig);
    }
  });
  staged.finish();
}

}  // namespace diffmoe
