// SwiGLU activation (spec §4, sources Appendix A) of the CPU reference backend: h = silu(a) ⊙ b.
// Element-wise, computed in double and rounded once to the tensor type.
#include <cmath>

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
  dispatch_float(args.a.dtype, kOp, [&]<class T>() {
    const T* a = args.a.ptr<T>();
    const T* b = args.b.ptr<T>();
    T* h = args.h.ptr<T>();
    const int64_t n = args.a.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) {
      const double ai = a[i];
      h[i] = static_cast<T>(ai * sigmoid(ai) * b[i]);
    }
  });
}

// da = dh ⊙ b ⊙ silu'(a),  silu'(a) = σ(a)(1 + a(1 − σ(a)));  db = dh ⊙ silu(a)   (both overwritten)
void CpuBackend::swiglu_bwd(Context, const SwigluBwdArgs& args) {
  constexpr std::string_view kOp = "swiglu_bwd";
  validate_swiglu_bwd(args, Device::kCPU);
  dispatch_float(args.a.dtype, kOp, [&]<class T>() {
    const T* a = args.a.ptr<T>();
    const T* b = args.b.ptr<T>();
    const T* dh = args.dh.ptr<T>();
    T* da = args.da.ptr<T>();
    T* db = args.db.ptr<T>();
    const int64_t n = args.a.numel();
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
}

}  // namespace diffmoe
