// RoPE on the GPU (spec §3): interleaved pairs (x[2i], x[2i+1]) of each addressed head rotated in
// place by pos·θ'_i from the cos/sin tables (YaRN folded in); inverse = true rotates by −angle
// (RoPE's backward). One thread per (row, head, pair); the pair's two values are read before they
// are written, and no two threads share a pair, so in place is safe. f32 arithmetic, as the CPU's
// f32 path does it (the GPU may fuse the multiply-adds: last-bit differences).
#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

__global__ void rope_kernel(float* x, const float* cos_tab, const float* sin_tab, int64_t rows, int64_t width,
                            int64_t n_heads, int64_t head_stride, int64_t col_offset, int64_t half, int64_t seq_len,
                            int64_t pos_offset, float sign) {
  const int64_t total = rows * n_heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = idx % half, h = (idx / half) % n_heads, n = idx / (half * n_heads);
    const int64_t pos = pos_offset + n % seq_len;
    const float c = cos_tab[pos * half + i];
    const float s = sign * sin_tab[pos * half + i];
    float* pair = x + n * width + h * head_stride + col_offset + 2 * i;
    const float x0 = pair[0], x1 = pair[1];
    // (x0 + i·x1)·e^{±i·angle}:  x0' = x0·c ∓ x1·s,  x1' = ±x0·s + x1·c
    pair[0] = x0 * c - x1 * s;
    pair[1] = x0 * s + x1 * c;
  }
}

}  // namespace

void CudaBackend::rope(Context ctx, const RopeArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "rope");
  const int64_t width = validate_rope(a, Device::kCUDA);
  require_f32(a.x, "rope");
  const int64_t rows = a.x.dim(0), half = a.rope_dim / 2;
  if (rows == 0) return;
  rope_kernel<<<grid_for(rows * a.n_heads * half), kThreads, 0, stream(ctx)>>>(
      f32(a.x), f32(a.cos), f32(a.sin), rows, width, a.n_heads, a.head_stride, a.col_offset, half, a.seq_len,
      a.pos_offset, a.inverse ? -1.0f : 1.0f);
  CUDA_CHECK_LAUNCH("rope");
}

}  // namespace diffmoe
