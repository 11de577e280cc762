// RoPE on the CPU (spec §3, sources conventions): interleaved pairs (x[2i], x[2i+1]) of each
// addressed head are rotated in place by the angle pos·θ'_i, read from cos/sin tables that already
// hold YaRN (model/rope_tables.h). The backward of a rotation is the rotation by −angle, so the
// same op with inverse = true is RoPE's backward. Rows are independent: OpenMP over rows.
#include "backend/cpu/cpu_backend.h"

#include <algorithm>

namespace diffmoe {

namespace {

constexpr std::string_view kOp = "rope";

// Validates the layout and returns the row width W of x: [N, W].
int64_t check_rope(const RopeArgs& a) {
  check_cpu(a.x, kOp, "x");
  check_cpu(a.cos, kOp, "cos");
  check_cpu(a.sin, kOp, "sin");
  DIFFMOE_CHECK(a.x.rank() == 2, "[rope] x must be [N, W], got {}", a.x.describe());
  DIFFMOE_CHECK(a.rope_dim > 0 && a.rope_dim % 2 == 0, "[rope] rope_dim must be positive and even, got {}",
                a.rope_dim);
  DIFFMOE_CHECK(a.n_heads >= 1, "[rope] n_heads must be >= 1, got {}", a.n_heads);
  DIFFMOE_CHECK(a.n_heads == 1 || a.head_stride >= a.rope_dim,
                "[rope] head_stride {} must be >= rope_dim {} when n_heads > 1 (heads would overlap)", a.head_stride,
                a.rope_dim);
  DIFFMOE_CHECK(a.col_offset >= 0 && a.head_stride >= 0, "[rope] col_offset {} and head_stride {} must be >= 0",
                a.col_offset, a.head_stride);
  const int64_t width = a.x.dim(1);
  const int64_t last_col = (a.n_heads - 1) * a.head_stride + a.col_offset + a.rope_dim;  // one past the end
  DIFFMOE_CHECK(last_col <= width, "[rope] heads reach column {} but x has only {} columns ({})", last_col, width,
                a.x.describe());
  DIFFMOE_CHECK(a.seq_len > 0, "[rope] seq_len must be > 0, got {}", a.seq_len);
  DIFFMOE_CHECK(a.pos_offset >= 0, "[rope] pos_offset must be >= 0, got {}", a.pos_offset);
  DIFFMOE_CHECK(a.cos.rank() == 2 && a.cos.dim(1) == a.rope_dim / 2,
                "[rope] cos must be [max_pos, rope_dim/2 = {}], got {}", a.rope_dim / 2, a.cos.describe());
  check_shape(a.sin, a.cos.shape, kOp, "sin");
  check_dtype(a.cos, a.x.dtype, kOp, "cos");
  check_dtype(a.sin, a.x.dtype, kOp, "sin");
  // The largest position used is pos_offset + min(N, seq_len) − 1.
  const int64_t rows = a.x.dim(0);
  if (rows > 0) {
    const int64_t max_used = a.pos_offset + std::min(rows, a.seq_len) - 1;
    DIFFMOE_CHECK(max_used < a.cos.dim(0),
                  "[rope] position {} (pos_offset {} + seq_len {}) is beyond the table's max_pos {}", max_used,
                  a.pos_offset, a.seq_len, a.cos.dim(0));
  }
  return width;
}

template <class T>
void rope_impl(const RopeArgs& a, int64_t width) {
  T* x = a.x.ptr<T>();
  const T* cos_tab = a.cos.ptr<T>();
  const T* sin_tab = a.sin.ptr<T>();
  const int64_t rows = a.x.dim(0);
  const int64_t half = a.rope_dim / 2;
  // Rotation by −angle: sin changes sign, cos does not.
  const T sign = a.inverse ? T(-1) : T(1);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t pos = a.pos_offset + n % a.seq_len;
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
  const int64_t width = check_rope(a);
  dispatch_float(a.x.dtype, kOp, [&]<class T>() { rope_impl<T>(a, width); });
}

}  // namespace diffmoe
