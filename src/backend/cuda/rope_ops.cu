// RoPE on the GPU (docs/model.md §3): interleaved pairs (x[2i], x[2i+1]) of each addressed head rotated in
// place by pos·θ'_i from the cos/sin tables (YaRN folded in); inverse = true rotates by −angle
// (RoPE's backward). One thread per item of a row (elementwise.cuh: 32-bit item numbers, no 64-bit
// division per element): an item is two pairs (one float4, cos/sin as float2) when the row width,
// head stride, column offset and rope_dim/2 allow aligned pieces, else one pair. Each value is read
// before it is written, and no two threads share a pair, so in place is safe. f32 arithmetic, as
// the CPU's f32 path does it (the GPU may fuse the multiply-adds: last-bit differences). x may be
// bf16 (the bf16 GEMM mode's q, which its GEMM wrote in bf16): widened, rotated in f32, rounded once.
// Per-row positions (RopeArgs::positions) are checked on the device: a row with a position outside
// the table is skipped and reported at the next synchronize (device_issue.h).
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

struct RopeShape {
  int64_t width, head_stride, col_offset, half, seq_len, pos_offset, max_pos;
  int32_t items_per_head;  // pairs per head / pairs per item
  float sign;              // +1 forward, −1 inverse
};

// (x0 + i·x1)·e^{±i·angle}:  x0' = x0·c ∓ x1·s,  x1' = ±x0·s + x1·c   (s already carries the sign)
__device__ __forceinline__ void rotate(float& x0, float& x1, float c, float s) {
  const float r0 = x0 * c - x1 * s, r1 = x0 * s + x1 * c;
  x0 = r0;
  x1 = r1;
}

template <class T, bool kTwoPairs>  // T: float, or bf16
__global__ void __launch_bounds__(kThreads)
    rope_kernel(T* x, const float* cos_tab, const float* sin_tab, const int32_t* positions, RowItems ri, RopeShape sh,
                DeviceIssue* issue) {
  constexpr int kPairs = kTwoPairs ? 2 : 1;  // pairs per item
  for_each_row_item(ri, [&](int64_t n, int32_t item) {
    const int32_t h = item / sh.items_per_head;
    const int64_t i = int64_t{item - h * sh.items_per_head} * kPairs;  // first pair of the item
    int64_t pos = 0;
    if (positions != nullptr) {  // per-row positions (a serving step): a bad one is skipped and reported
      pos = positions[n];
      if (!index_ok(issue, IssueSite::kRopePositions, n, positions[n], sh.max_pos)) return;
    } else {
      pos = sh.pos_offset + mod_nonneg(n, sh.seq_len);
    }
    const float* c = cos_tab + pos * sh.half + i;
    const float* s = sin_tab + pos * sh.half + i;
    T* pair = x + n * sh.width + h * sh.head_stride + sh.col_offset + 2 * i;
    if constexpr (kTwoPairs) {
      float4 v = load4(pair);
      const float2 cv = *reinterpret_cast<const float2*>(c), sv = *reinterpret_cast<const float2*>(s);
      rotate(v.x, v.y, cv.x, sh.sign * sv.x);
      rotate(v.z, v.w, cv.y, sh.sign * sv.y);
      store4(pair, v);
    } else {
      float x0 = load1(pair), x1 = load1(pair + 1);
      rotate(x0, x1, c[0], sh.sign * s[0]);
      store1(pair, x0);
      store1(pair + 1, x1);
    }
  });
}

}  // namespace

void CudaBackend::rope(Context ctx, const RopeArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "rope");
  const int64_t width = validate_rope(a, Device::kCUDA);
  require_f32_or_bf16(a.x, "rope", "x");
  const bool bf16 = a.x.dtype == DType::kBF16;
  const int64_t rows = a.x.dim(0), half = a.rope_dim / 2;
  if (rows == 0) return;
  // Two pairs per item: float4 rows of x (every pair group starts on 16 bytes) and float2 table rows.
  const int64_t head_stride = a.n_heads > 1 ? a.head_stride : 0;  // unused with one head
  const bool x_aligned = bf16 ? vec_aligned(static_cast<const __nv_bfloat16*>(a.x.data)) : vec_aligned(f32(a.x));
  const bool two_pairs = half % 2 == 0 && vec_sizes({width, head_stride, a.col_offset}) && x_aligned &&
                         reinterpret_cast<uintptr_t>(a.cos.data) % 8 == 0 &&
                         reinterpret_cast<uintptr_t>(a.sin.data) % 8 == 0;
  const int64_t items_per_head = two_pairs ? half / 2 : half;
  DIFFMOE_CHECK(items_per_head <= INT32_MAX, "[rope] rope_dim {} is too large", a.rope_dim);
  const RowItems ri = row_items(rows, a.n_heads * items_per_head, "rope");
  const RopeShape sh{.width = width,
                     .head_stride = a.head_stride,
                     .col_offset = a.col_offset,
                     .half = half,
                     .seq_len = a.seq_len,
                     .pos_offset = a.pos_offset,
                     .max_pos = a.cos.dim(0),
                     .items_per_head = static_cast<int32_t>(items_per_head),
                     .sign = a.inverse ? -1.0f : 1.0f};
  const int32_t* positions = a.positions.defined() ? i32(a.positions) : nullptr;
  const auto launch = [&](auto* x) {
    using T = std::remove_pointer_t<decltype(x)>;
    if (two_pairs)
      rope_kernel<T, true>
          <<<row_items_grid(ri), kThreads, 0, stream(ctx)>>>(x, f32(a.cos), f32(a.sin), positions, ri, sh, issue());
    else
      rope_kernel<T, false>
          <<<row_items_grid(ri), kThreads, 0, stream(ctx)>>>(x, f32(a.cos), f32(a.sin), positions, ri, sh, issue());
    CUDA_CHECK_LAUNCH("rope");
  };
  if (bf16) launch(static_cast<__nv_bfloat16*>(a.x.data));
  else launch(f32(a.x));
}

}  // namespace diffmoe
