// RoPE on the CPU (docs/model.md §3, sources conventions): interleaved pairs (x[2i], x[2i+1]) of each
// addressed head are rotated in place by the angle pos·θ'_i, read from cos/sin tables that already
// hold YaRN (model/rope_tables.h). The backward of a rotation is the rotation by −angle, so the
// same op with inverse = true is RoPE's backward. Rows are independent: OpenMP over rows.
// A bf16 x (the bf16 GEMM mode's q, written in bf16 by its GEMM) is widened, rotated in f32 and
// rounded once (bf16_staging.h); the columns outside the rope range keep their bits. With per-row
// positions (a serving step's packed rows) each position is checked against the table first.
#include "backend/cpu/bf16_staging.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

#include <algorithm>

namespace diffmoe {

namespace {

constexpr std::string_view kOp = "rope";

template <class T>
void rope_impl(const RopeArgs& a, const Tensor& xt, int64_t width) {
  T* x = xt.ptr<T>();
  const T* cos_tab = a.cos.ptr<T>();
  const T* sin_tab = a.sin.ptr<T>();
  const int64_t rows = xt.dim(0);
  const int64_t half = a.rope_dim / 2;
  const int32_t* positions = a.positions.defined() && a.positions.numel() > 0 ? a.positions.ptr<int32_t>() : nullptr;
  // Rotation by −angle: sin changes sign, cos does not.
  const T sign = a.inverse ? T(-1) : T(1);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t pos = positions != nullptr ? positions[n] : a.pos_offset + n % a.seq_len;
    const T* c_row = cos_tab + pos * half;
    const T* s_row = sin_tab + pos * half;
    T* row = x + n * width;
    for (int64_t h = 0; h < a.n_heads; ++h) {
      T* pairs = row + h * a.head_stride + a.col_offset;
      for (int64_t i = 0; i < half; ++i) {
        // (x0 + i·x1) · e^{±i·angle}:  x0' = x0·c ∓ x1·s,  x1' = ±x0·s + x1·c
        const T c = c_row[i];
        const T s = sign * s_row[i];
        const T x0 = pairs[2 * i];
        const T x1 = pairs[2 * i + 1];
        pairs[2 * i] = x0 * c - x1 * s;
        pairs[2 * i + 1] = x0 * s + x1 * c;
      }
    }
  }
}

}  // namespace

void CpuBackend::rope(Context, const RopeArgs& a) {
  const int64_t width = validate_rope(a, Device::kCPU);
  if (a.positions.defined()) {
    const int32_t* pos = a.positions.numel() > 0 ? a.positions.ptr<int32_t>() : nullptr;
    for (int64_t n = 0; n < a.positions.numel(); ++n)
      DIFFMOE_CHECK(pos[n] >= 0 && pos[n] < a.cos.dim(0), "[rope] positions[{}] = {} is outside the table's [0, {})", n,
                    pos[n], a.cos.dim(0));
  }
  Bf16Staging staged(scratch_);
  const Tensor x = staged.output(a.x);  // in place: the buffer starts as x's widened values
  dispatch_float(a.cos.dtype, kOp, [&]<class T>() { rope_impl<T>(a, x, width); });
  staged.finish();
}

}  // namespace diffmoe
