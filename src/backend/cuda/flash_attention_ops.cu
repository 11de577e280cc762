// Fused flash-style causal differential attention in f32 (docs/model.md §2; docs/derivations.md §1.3-1.4): forward and
// backward without score matrices in device memory and without atomics (deterministic).
//
// Design
// - Tiles of kBM = 64 query rows by kBN = 64 keys, 256 threads as a 16×16 grid (ty, tx). Every
//   product is one shape (tile_fma): a thread owns rows 4·ty..4·ty+3 of the result and the strided
//   columns tx + 16·j, and walks the shared depth with one float4 of A (stored [depth][row], so the
//   16 threads of a half-warp read one address) and NJ scalars of B (stored either [col][depth]
//   with an odd row stride, or [depth][col]: both spread a half-warp over 16 banks). f32 FMA only
//   (no TF32: the f32 check against the CPU allows 1e-4).
// - A value group is a differential head (components 2g, 2g+1 sharing V_g = [v_2g ; v_2g+1], 2·d_v
//   wide) or a plain head (one component, V_g = v_g).
// - Forward, one CTA per (query tile, group, batch), heaviest tiles first: Q of both components is
//   staged once; for each key tile of the causal range K of both components and V_g are staged
//   together (one wait per tile), and each component keeps its own online softmax (m, l, acc)
//   over the shared V tile. out = acc0/l0 − λ·acc1/l1,
//   o2 = acc1/l1, lse_c = m_c + ln l_c (plain: out = acc0/l0).
// - Backward (FA2 without atomics): (1) a prep kernel, one warp per output row, writes
//   D_c = rowsum(dO_c ⊙ O_c) with dO_0 = dout, dO_1 = −λ·dout, O_0 = out + λ·o2, O_1 = o2, and the
//   row's Σ dout ⊙ o2 in double for dλ; (2) one CTA per (key tile, group, batch) owns its dK rows of
//   both components and its dV_g rows, recomputing P^T and dS^T for every query tile of the causal
//   range (both components add into the same dV registers); (3) one CTA per (query tile, group,
//   batch) owns its dQ rows of both components (dout·V^T computed once per key tile for both);
//   (4) dλ = −Σ of the row partials, one block in a fixed order.
// - Tile loads: each thread issues a batch of global loads before storing them (stage_tile); the
//   per-element loads under a bounds branch had serialised them (first version: 10.6 / 22.5 ms).
// Measured (H100, 2026-11-28; bench preset shape B 8, T 2048, 8 differential heads, d_qk 96, d_v 64,
// tests/ops/cuda_attention_timing.cpp): forward 6.0 ms, backward 16.0 ms; the simple kernels of
// attention_ops.cu 54.3 ms and 179.4 ms. About 20 TFLOP/s of f32 FMA in the forward: the next steps
// are float4 B operands (fewer shared-memory wavefronts per FMA) and double-buffered tiles.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/flash_attention.h"

namespace diffmoe::cuda {
namespace {

constexpr int kBM = 64;             // query rows per tile
constexpr int kBN = 64;             // keys per tile
constexpr int kFlashThreads = 256;  // 16 × 16 threads
constexpr int kGrid = 16;           // threads per tile side
constexpr int kRows = kBM / kGrid;  // result rows per thread (4: one float4 of A)
constexpr int kLdt = kBM + 4;       // row stride of [depth][row] buffers (float4-aligned)
static_assert(kBM == kBN, "the square tile lets one thread grid serve both loops");
static_assert(kRows == 4, "tile_fma reads A as one float4");
static_assert(kGrid * kGrid == kFlashThreads);
static_assert(kLdt % 4 == 0, "float4 reads of [depth][row] buffers");

struct FlashShape {
  int seq, heads, groups, comps, d_v;
  float scale;
  // Element offset of row (b, t, head h) in a [B, T, H, width] tensor.
  __device__ int64_t at(int b, int t, int h, int width) const {
    return ((static_cast<int64_t>(b) * seq + t) * heads + h) * width;
  }
  // Row (b, t, g) of a [B, T, G, W] tensor (out, o2, dout).
  __device__ int64_t group_row(int b, int t, int g) const { return (static_cast<int64_t>(b) * seq + t) * groups + g; }
  __device__ int64_t lse_at(int b, int h, int t) const { return (static_cast<int64_t>(b) * heads + h) * seq + t; }
};

// acc[i][j] += Σ_k A[k][4·ty + i] · B(k, tx + 16·j), B(k, n) = B[k·BK + n·BN_].
template <int NJ, int DEPTH, int LDA, int BK, int BN_>
__device__ __forceinline__ void tile_fma(float (&acc)[kRows][NJ], const float* A, const float* B) {
  const int ty = threadIdx.x / kGrid, tx = threadIdx.x % kGrid;
  const float* a_ptr = A + kRows * ty;
  const float* b_ptr = B + tx * BN_;
#pragma unroll 8
  for (int k = 0; k < DEPTH; ++k) {
    const float4 a = *reinterpret_cast<const float4*>(a_ptr + k * LDA);
    float b[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) b[j] = b_ptr[k * BK + kGrid * j * BN_];
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      acc[0][j] = fmaf(a.x, b[j], acc[0][j]);
      acc[1][j] = fmaf(a.y, b[j], acc[1][j]);
      acc[2][j] = fmaf(a.z, b[j], acc[2][j]);
      acc[3][j] = fmaf(a.w, b[j], acc[3][j]);
    }
  }
}

template <int R, int C>
__device__ __forceinline__ void zero(float (&x)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) x[i][j] = 0.0f;
}

// Reductions over the 16 threads (tx) that share a row: lanes differing in their low 4 bits.
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int o = kGrid / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = kGrid / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Copies rows [t0, t0 + 64) × WIDTH columns of a source into shared memory: src(t, col) reads,
// dst(r, col) names the destination; rows at or past T are zero. The per-thread trip count is a
// compile-time constant, and each batch of loads is issued before its stores, so the loads of a
// tile overlap instead of waiting one by one (a tile is 8-32 loads per thread).
template <int WIDTH, class Src, class Dst>
__device__ __forceinline__ void stage_tile(int t0, int seq, Src src, Dst dst) {
  constexpr int kPer = kBM * WIDTH / kFlashThreads;
  static_assert(kBM * WIDTH % kFlashThreads == 0, "whole rows per pass");
  constexpr int kBatch = kPer % 8 == 0 ? 8 : 4;
  static_assert(kPer % kBatch == 0);
#pragma unroll 1  // batches stay a loop: unrolled, their addresses were hoisted out of the tile loops (spills)
  for (int i0 = 0; i0 < kPer; i0 += kBatch) {
    float tmp[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + (i0 + i) * kFlashThreads, r = idx / WIDTH, col = idx % WIDTH;
      tmp[i] = t0 + r < seq ? src(t0 + r, col) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + (i0 + i) * kFlashThreads, r = idx / WIDTH, col = idx % WIDTH;
      dst(r, col) = tmp[i];
    }
  }
}

// Rows [t0, t0 + 64) of head h (WIDTH values each) into dst: transposed ([col][row], stride kLdt)
// or row-major (stride LD).
template <int WIDTH>
__device__ void stage_t(float* dst, const float* src, const FlashShape& sh, int b, int t0, int h) {
  stage_tile<WIDTH>(
      t0, sh.seq, [&](int t, int col) { return src[sh.at(b, t, h, WIDTH) + col]; },
      [&](int r, int col) -> float& { return dst[col * kLdt + r]; });
}
template <int WIDTH, int LD>
__device__ void stage_rows(float* dst, const float* src, const FlashShape& sh, int b, int t0, int h) {
  stage_tile<WIDTH>(
      t0, sh.seq, [&](int t, int col) { return src[sh.at(b, t, h, WIDTH) + col]; },
      [&](int r, int col) -> float& { return dst[r * LD + col]; });
}
// The value group's rows: V_g = heads first..first+comps−1 of v, contiguous (W = comps·d_v values),
// row-major (stride LD) or transposed (LD = 0: [col][row], stride kLdt).
template <int W, int LD>
__device__ void stage_v(float* dst, const float* v, const FlashShape& sh, int b, int t0, int first) {
  stage_tile<W>(
      t0, sh.seq, [&](int t, int col) { return v[sh.at(b, t, first, sh.d_v) + col]; },
      [&](int r, int col) -> float& { return LD == 0 ? dst[col * kLdt + r] : dst[r * LD + col]; });
}
// The group's dout rows (W values) into dst, row-major (stride LD) or transposed (LD = 0).
template <int W, int LD>
__device__ void stage_dout(float* dst, const float* dout, const FlashShape& sh, int b, int t0, int g) {
  stage_tile<W>(
      t0, sh.seq, [&](int t, int col) { return dout[sh.group_row(b, t, g) * W + col]; },
      [&](int r, int col) -> float& { return LD == 0 ? dst[col * kLdt + r] : dst[r * LD + col]; });
}

// ================================================================ forward

template <int DQK, int W>
struct FwdSmem {
  static constexpr int kLdk = DQK + 1;             // odd: K rows read as [col][depth]
  static constexpr int kQt = 0;                    // Q^T of both components [2][DQK][kLdt]
  static constexpr int kK = kQt + 2 * DQK * kLdt;  // K tiles of both components [2][kBN][kLdk]
  static constexpr int kV = kK + 2 * kBN * kLdk;   // V_g tile [kBN][W]
  static constexpr int kPt = kV + kBN * W;         // P^T [kBN][kLdt]
  static constexpr int kFloats = kPt + kBN * kLdt;
};

template <int DQK, int W>
__global__ void __launch_bounds__(kFlashThreads, 1)
    flash_attention_fwd_kernel(float* out, float* o2, float* lse, const float* q, const float* k, const float* v,
                               const float* lambda, FlashShape sh) {
  using L = FwdSmem<DQK, W>;
  constexpr int NW = W / kGrid;
  extern __shared__ __align__(16) float smem[];
  float* qt_s = smem + L::kQt;
  float* k_s = smem + L::kK;
  float* v_s = smem + L::kV;
  float* pt_s = smem + L::kPt;
  const int ty = threadIdx.x / kGrid, tx = threadIdx.x % kGrid;
  const int n_qt = (sh.seq + kBM - 1) / kBM;
  const int qt = n_qt - 1 - static_cast<int>(blockIdx.x);  // longest causal ranges first
  const int g = blockIdx.y, b = blockIdx.z, q0 = qt * kBM, first = sh.comps * g;
  const bool diff = sh.comps == 2;
  const float lam = diff ? lambda[0] : 0.0f;

  for (int c = 0; c < sh.comps; ++c) stage_t<DQK>(qt_s + c * DQK * kLdt, q, sh, b, q0, first + c);
  float acc[2][kRows][NW], m[2][kRows], l[2][kRows];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    zero(acc[c]);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      m[c][i] = -INFINITY;
      l[c][i] = 0.0f;
    }
  }
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kBN;
    __syncthreads();  // the previous tile's readers of k_s, v_s are done
    for (int c = 0; c < sh.comps; ++c) stage_rows<DQK, L::kLdk>(k_s + c * kBN * L::kLdk, k, sh, b, k0, first + c);
    stage_v<W, W>(v_s, v, sh, b, k0, first);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (c >= sh.comps) break;
      float z[kRows][kRows];
      zero(z);
      tile_fma<kRows, DQK, kLdt, 1, L::kLdk>(z, qt_s + c * DQK * kLdt, k_s + c * kBN * L::kLdk);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int t = q0 + kRows * ty + i;
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const int s = k0 + tx + kGrid * j;
          z[i][j] = (s <= t && s < sh.seq) ? sh.scale * z[i][j] : -INFINITY;
          mx = fmaxf(mx, z[i][j]);
        }
        // Key 0 sits in the first tile for every row, so m is finite from there on.
        const float m_new = fmaxf(m[c][i], row_max(mx));
        const float corr = m[c][i] == -INFINITY ? 0.0f : expf(m[c][i] - m_new);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const float p = z[i][j] == -INFINITY ? 0.0f : expf(z[i][j] - m_new);
          pt_s[(tx + kGrid * j) * kLdt + kRows * ty + i] = p;
          sum += p;
        }
        l[c][i] = l[c][i] * corr + row_sum(sum);
        m[c][i] = m_new;
#pragma unroll
        for (int j = 0; j < NW; ++j) acc[c][i][j] *= corr;
      }
      __syncthreads();
      tile_fma<NW, kBN, kLdt, W, 1>(acc[c], pt_s, v_s);
      __syncthreads();  // pt_s is rewritten next
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int t = q0 + kRows * ty + i;
    if (t >= sh.seq) continue;
    const int64_t row = sh.group_row(b, t, g) * W;
    const float inv0 = 1.0f / l[0][i], inv1 = diff ? 1.0f / l[1][i] : 0.0f;
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      const int col = tx + kGrid * j;
      const float a0 = acc[0][i][j] * inv0;
      if (diff) {
        const float a1 = acc[1][i][j] * inv1;
        o2[row + col] = a1;
        out[row + col] = a0 - lam * a1;
      } else {
        out[row + col] = a0;
      }
    }
    if (tx == 0) {
      lse[sh.lse_at(b, first, t)] = m[0][i] + logf(l[0][i]);
      if (diff) lse[sh.lse_at(b, first + 1, t)] = m[1][i] + logf(l[1][i]);
    }
  }
}

// ================================================================ backward

// One warp per output row (b, t, g): D_c (see the design note) into dvec [B, H, T]; the row's
// Σ dout ⊙ o2 in double into dl_part [B·T·G] (differential only).
__global__ void flash_attention_bwd_prep_kernel(float* dvec, double* dl_part, const float* dout, const float* out,
                                                const float* o2, const float* lambda, FlashShape sh, int width) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int b = blockIdx.y;
  if (row >= static_cast<int64_t>(sh.seq) * sh.groups) return;
  const int t = static_cast<int>(row / sh.groups), g = static_cast<int>(row % sh.groups);
  const int64_t base = sh.group_row(b, t, g) * width;
  const bool diff = sh.comps == 2;
  const float lam = diff ? lambda[0] : 0.0f;
  float d0 = 0.0f, d1 = 0.0f;
  double dl = 0.0;
  for (int i = lane; i < width; i += kWarp) {
    const float d = dout[base + i];
    if (diff) {
      const float y2 = o2[base + i];
      d0 += d * (out[base + i] + lam * y2);
      d1 += d * y2;
      dl += static_cast<double>(d) * y2;
    } else {
      d0 += d * out[base + i];
    }
  }
  d0 = warp_sum(d0);
  d1 = warp_sum(d1);
  dl = warp_sum(dl);
  if (lane != 0) return;
  const int first = sh.comps * g;
  dvec[sh.lse_at(b, first, t)] = d0;
  if (diff) {
    dvec[sh.lse_at(b, first + 1, t)] = -lam * d1;
    dl_part[sh.group_row(b, t, g)] = dl;
  }
}

// dlambda[0] = −Σ dl_part (overwritten): one block, fixed order (deterministic).
__global__ void flash_dlambda_kernel(float* dlambda, const double* dl_part, int64_t n) {
  __shared__ double red[kWarp];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += dl_part[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) dlambda[0] = static_cast<float>(-s);
}

template <int DQK, int W>
struct DkvSmem {
  static constexpr int kLdq = DQK + 1, kLdo = W + 1;  // odd: rows read as [col][depth]
  static constexpr int kKt = 0;                       // K^T [DQK][kLdt]
  static constexpr int kVt = kKt + DQK * kLdt;        // V_g^T [W][kLdt]
  static constexpr int kQ = kVt + W * kLdt;           // Q tile [kBM][kLdq]
  static constexpr int kDo = kQ + kBM * kLdq;         // dout tile [kBM][kLdo]
  static constexpr int kP = kDo + kBM * kLdo;         // coef·P [kBM][kLdt] (query-major)
  static constexpr int kDs = kP + kBM * kLdt;         // scale·dS [kBM][kLdt]
  static constexpr int kLse = kDs + kBM * kLdt;       // [kBM]
  static constexpr int kD = kLse + kBM;               // [kBM]
  static constexpr int kFloats = kD + kBM;
};

// Per key tile: dK_c = scale·Σ_q dS_c^T Q_c, dV_g = Σ_c Σ_q P_c^T dO_c (rows owned, overwritten).
template <int DQK, int W>
__global__ void __launch_bounds__(kFlashThreads, 1)
    flash_attention_bwd_dkv_kernel(float* dk, float* dv, const float* dout, const float* q, const float* k,
                                   const float* v, const float* lse, const float* dvec, const float* lambda,
                                   FlashShape sh) {
  using L = DkvSmem<DQK, W>;
  constexpr int NW = W / kGrid, ND = DQK / kGrid;
  extern __shared__ __align__(16) float smem[];
  float* kt_s = smem + L::kKt;
  float* vt_s = smem + L::kVt;
  float* q_s = smem + L::kQ;
  float* do_s = smem + L::kDo;
  float* p_s = smem + L::kP;
  float* ds_s = smem + L::kDs;
  float* lse_s = smem + L::kLse;
  float* d_s = smem + L::kD;
  const int ty = threadIdx.x / kGrid, tx = threadIdx.x % kGrid;
  const int n_qt = (sh.seq + kBM - 1) / kBM;
  const int kt = blockIdx.x;  // key tile 0 has the longest causal range: first
  const int g = blockIdx.y, b = blockIdx.z, k0 = kt * kBN, first = sh.comps * g;
  const float lam = sh.comps == 2 ? lambda[0] : 0.0f;

  stage_v<W, 0>(vt_s, v, sh, b, k0, first);
  float dv_acc[kRows][NW];
  zero(dv_acc);
  for (int c = 0; c < sh.comps; ++c) {
    const float coef = c == 0 ? 1.0f : -lam;
    stage_t<DQK>(kt_s, k, sh, b, k0, first + c);
    float dk_acc[kRows][ND];
    zero(dk_acc);
    for (int qt = kt; qt < n_qt; ++qt) {
      const int q0 = qt * kBM;
      __syncthreads();  // the previous tile's readers are done
      stage_rows<DQK, L::kLdq>(q_s, q, sh, b, q0, first + c);
      stage_dout<W, L::kLdo>(do_s, dout, sh, b, q0, g);
      if (threadIdx.x < kBM) {
        const int t = q0 + threadIdx.x;
        lse_s[threadIdx.x] = t < sh.seq ? lse[sh.lse_at(b, first + c, t)] : 0.0f;
        d_s[threadIdx.x] = t < sh.seq ? dvec[sh.lse_at(b, first + c, t)] : 0.0f;
      }
      __syncthreads();
      float st[kRows][kRows], dpt[kRows][kRows];  // S^T, (dO·V^T)^T: [key][query]
      zero(st);
      zero(dpt);
      tile_fma<kRows, DQK, kLdt, 1, L::kLdq>(st, kt_s, q_s);
      tile_fma<kRows, W, kLdt, 1, L::kLdo>(dpt, vt_s, do_s);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int s = k0 + kRows * ty + i;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const int qr = tx + kGrid * j, t = q0 + qr;
          const bool valid = s <= t && t < sh.seq;
          const float p = valid ? expf(sh.scale * st[i][j] - lse_s[qr]) : 0.0f;
          const float ds = p * (coef * dpt[i][j] - d_s[qr]);
          p_s[qr * kLdt + kRows * ty + i] = coef * p;
          ds_s[qr * kLdt + kRows * ty + i] = sh.scale * ds;
        }
      }
      __syncthreads();
      tile_fma<NW, kBM, kLdt, L::kLdo, 1>(dv_acc, p_s, do_s);
      tile_fma<ND, kBM, kLdt, L::kLdq, 1>(dk_acc, ds_s, q_s);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int s = k0 + kRows * ty + i;
      if (s >= sh.seq) continue;
#pragma unroll
      for (int j = 0; j < ND; ++j) dk[sh.at(b, s, first + c, DQK) + tx + kGrid * j] = dk_acc[i][j];
    }
    __syncthreads();  // kt_s is restaged for the next component
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int s = k0 + kRows * ty + i;
    if (s >= sh.seq) continue;
#pragma unroll
    for (int j = 0; j < NW; ++j) dv[sh.at(b, s, first, sh.d_v) + tx + kGrid * j] = dv_acc[i][j];
  }
}

template <int DQK, int W>
struct DqSmem {
  static constexpr int kLdk = DQK + 1, kLdv = W + 1;
  static constexpr int kQt = 0;                      // Q^T of both components [2][DQK][kLdt]
  static constexpr int kDot = kQt + 2 * DQK * kLdt;  // dout^T [W][kLdt]
  static constexpr int kK = kDot + W * kLdt;         // K tiles of both components [2][kBN][kLdk]
  static constexpr int kV = kK + 2 * kBN * kLdk;     // V_g tile [kBN][kLdv]
  static constexpr int kDst = kV + kBN * kLdv;       // scale·dS^T [kBN][kLdt]
  static constexpr int kLse = kDst + kBN * kLdt;     // [2][kBM]
  static constexpr int kD = kLse + 2 * kBM;          // [2][kBM]
  static constexpr int kFloats = kD + 2 * kBM;
};

// Per query tile: dQ_c = scale·Σ_s dS_c K_c (rows owned, overwritten), both components per key
// tile: dout·V^T is the same for both (dP_c = coef_c·dout·V^T), computed once.
template <int DQK, int W>
__global__ void __launch_bounds__(kFlashThreads, 1)
    flash_attention_bwd_dq_kernel(float* dq, const float* dout, const float* q, const float* k, const float* v,
                                  const float* lse, const float* dvec, const float* lambda, FlashShape sh) {
  using L = DqSmem<DQK, W>;
  constexpr int ND = DQK / kGrid;
  extern __shared__ __align__(16) float smem[];
  float* qt_s = smem + L::kQt;
  float* dot_s = smem + L::kDot;
  float* k_s = smem + L::kK;
  float* v_s = smem + L::kV;
  float* dst_s = smem + L::kDst;
  float* lse_s = smem + L::kLse;
  float* d_s = smem + L::kD;
  const int ty = threadIdx.x / kGrid, tx = threadIdx.x % kGrid;
  const int n_qt = (sh.seq + kBM - 1) / kBM;
  const int qt = n_qt - 1 - static_cast<int>(blockIdx.x);
  const int g = blockIdx.y, b = blockIdx.z, q0 = qt * kBM, first = sh.comps * g;
  const float lam = sh.comps == 2 ? lambda[0] : 0.0f;

  stage_dout<W, 0>(dot_s, dout, sh, b, q0, g);
  for (int c = 0; c < sh.comps; ++c) {
    stage_t<DQK>(qt_s + c * DQK * kLdt, q, sh, b, q0, first + c);
    if (threadIdx.x < kBM) {
      const int t = q0 + threadIdx.x;
      lse_s[c * kBM + threadIdx.x] = t < sh.seq ? lse[sh.lse_at(b, first + c, t)] : 0.0f;
      d_s[c * kBM + threadIdx.x] = t < sh.seq ? dvec[sh.lse_at(b, first + c, t)] : 0.0f;
    }
  }
  float dq_acc[2][kRows][ND];
  zero(dq_acc[0]);
  zero(dq_acc[1]);
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kBN;
    __syncthreads();  // the previous tile's readers of k_s, v_s, dst_s are done
    for (int c = 0; c < sh.comps; ++c) stage_rows<DQK, L::kLdk>(k_s + c * kBN * L::kLdk, k, sh, b, k0, first + c);
    stage_v<W, L::kLdv>(v_s, v, sh, b, k0, first);
    __syncthreads();
    float dp[kRows][kRows];  // dout·V^T: [query][key]
    zero(dp);
    tile_fma<kRows, W, kLdt, 1, L::kLdv>(dp, dot_s, v_s);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (c >= sh.comps) break;
      const float coef = c == 0 ? 1.0f : -lam;
      const float* k_c = k_s + c * kBN * L::kLdk;
      float z[kRows][kRows];  // S: [query][key]
      zero(z);
      tile_fma<kRows, DQK, kLdt, 1, L::kLdk>(z, qt_s + c * DQK * kLdt, k_c);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int qr = kRows * ty + i, t = q0 + qr;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const int s = k0 + tx + kGrid * j;
          const bool valid = s <= t && t < sh.seq;
          const float p = valid ? expf(sh.scale * z[i][j] - lse_s[c * kBM + qr]) : 0.0f;
          dst_s[(tx + kGrid * j) * kLdt + qr] = sh.scale * p * (coef * dp[i][j] - d_s[c * kBM + qr]);
        }
      }
      __syncthreads();
      tile_fma<ND, kBN, kLdt, L::kLdk, 1>(dq_acc[c], dst_s, k_c);
      if (c == 0 && sh.comps == 2) __syncthreads();  // dst_s is rewritten for component 1
    }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    if (c >= sh.comps) break;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int t = q0 + kRows * ty + i;
      if (t >= sh.seq) continue;
#pragma unroll
      for (int j = 0; j < ND; ++j) dq[sh.at(b, t, first + c, DQK) + tx + kGrid * j] = dq_acc[c][i][j];
    }
  }
}

// ================================================================ dispatch

struct FlashKernels {
  const void* fwd;
  const void* dkv;
  const void* dq;
  int fwd_floats, dkv_floats, dq_floats;
};

template <int DQK, int W>
FlashKernels kernels_for() {
  return {reinterpret_cast<const void*>(&flash_attention_fwd_kernel<DQK, W>),
          reinterpret_cast<const void*>(&flash_attention_bwd_dkv_kernel<DQK, W>),
          reinterpret_cast<const void*>(&flash_attention_bwd_dq_kernel<DQK, W>),
          FwdSmem<DQK, W>::kFloats,
          DkvSmem<DQK, W>::kFloats,
          DqSmem<DQK, W>::kFloats};
}

// The one place that maps a shape to its instantiation (dqk, width) → kernels; false if none.
template <int DQK>
bool pick_width(int64_t width, FlashKernels* k) {
  switch (width) {
    case 32: *k = kernels_for<DQK, 32>(); return true;
    case 64: *k = kernels_for<DQK, 64>(); return true;
    case 128: *k = kernels_for<DQK, 128>(); return true;
    default: return false;
  }
}
bool pick(const AttnDims& d, FlashKernels* k) {
  const int64_t width = d.comps * d.d_v;
  switch (d.d_qk) {
    case 32: return pick_width<32>(width, k);
    case 48: return pick_width<48>(width, k);
    case 96: return pick_width<96>(width, k);
    case 128: return pick_width<128>(width, k);
    default: return false;
  }
}

FlashShape flash_shape(const AttnDims& d, double scale) {
  return {static_cast<int>(d.seq),   static_cast<int>(d.heads), static_cast<int>(d.groups),
          static_cast<int>(d.comps), static_cast<int>(d.d_v),   static_cast<float>(scale)};
}

// Raises the kernel's dynamic shared-memory limit (all instantiations stay under the H100's 227 KB).
size_t smem_for(CudaBackend& be, const void* kernel, int floats, std::string_view op) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  DIFFMOE_CHECK(bytes <= be.max_shared_bytes(),
                "[{}] the flash kernel needs {} bytes of shared memory, the device allows {}", op, bytes,
                be.max_shared_bytes());
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

dim3 flash_grid(const AttnDims& d) {
  return dim3(static_cast<unsigned>((d.seq + kBM - 1) / kBM), static_cast<unsigned>(d.groups),
              static_cast<unsigned>(d.batch));
}

}  // namespace

bool flash_attention_covers(const AttnDims& d) {
  FlashKernels k{};
  return d.seq <= INT32_MAX / 2 && d.groups <= 65535 && d.batch <= 65535 && pick(d, &k);
}

void flash_attention_fwd(CudaBackend& be, cudaStream_t s, const AttentionFwdArgs& a, const AttnDims& d) {
  FlashKernels k{};
  DIFFMOE_CHECK(pick(d, &k), "[attention_fwd] the flash kernel does not cover d_qk = {}, width = {}", d.d_qk,
                d.comps * d.d_v);
  const size_t smem = smem_for(be, k.fwd, k.fwd_floats, "attention_fwd");
  const FlashShape sh = flash_shape(d, a.scale);
  float* out = f32(a.out);
  float* o2 = a.differential ? f32(a.o2) : nullptr;
  float* lse = f32(a.lse);
  const float* q = f32(a.q);
  const float* kk = f32(a.k);
  const float* v = f32(a.v);
  const float* lambda = a.differential ? f32(a.lambda) : nullptr;
  FlashShape sh_arg = sh;
  void* args[] = {&out, &o2, &lse, &q, &kk, &v, &lambda, &sh_arg};
  CUDA_CHECK(cudaLaunchKernel(k.fwd, flash_grid(d), dim3(kFlashThreads), args, smem, s));
  CUDA_CHECK_LAUNCH("attention_fwd");
}

void flash_attention_bwd(CudaBackend& be, cudaStream_t s, const AttentionBwdArgs& a, const AttnDims& d) {
  FlashKernels k{};
  DIFFMOE_CHECK(pick(d, &k), "[attention_bwd] the flash kernel does not cover d_qk = {}, width = {}", d.d_qk,
                d.comps * d.d_v);
  const FlashShape sh = flash_shape(d, a.scale);
  const int64_t n_rows = d.batch * d.seq * d.groups;
  // Scratch: D [B, H, T] floats, then the dλ row partials [B·T·G] doubles.
  const size_t dvec_bytes = align256(static_cast<size_t>(d.batch * d.heads * d.seq) * sizeof(float));
  char* scratch = static_cast<char*>(be.scratch(dvec_bytes + static_cast<size_t>(n_rows) * sizeof(double)));
  float* dvec = reinterpret_cast<float*>(scratch);
  double* dl_part = reinterpret_cast<double*>(scratch + dvec_bytes);
  const float* lambda = a.differential ? f32(a.lambda) : nullptr;
  const int width = static_cast<int>(d.comps * d.d_v);
  constexpr int kPrepThreads = 256, kRowsPerBlock = kPrepThreads / kWarp;
  const dim3 prep_grid(static_cast<unsigned>((d.seq * d.groups + kRowsPerBlock - 1) / kRowsPerBlock),
                       static_cast<unsigned>(d.batch));
  flash_attention_bwd_prep_kernel<<<prep_grid, kPrepThreads, 0, s>>>(
      dvec, dl_part, f32(a.dout), f32(a.out), a.differential ? f32(a.o2) : nullptr, lambda, sh, width);
  CUDA_CHECK_LAUNCH("attention_bwd");

  float* dq = f32(a.dq);
  float* dk = f32(a.dk);
  float* dv = f32(a.dv);
  const float* dout = f32(a.dout);
  const float* q = f32(a.q);
  const float* kk = f32(a.k);
  const float* v = f32(a.v);
  const float* lse = f32(a.lse);
  const float* dvec_c = dvec;
  FlashShape sh_arg = sh;
  {
    const size_t smem = smem_for(be, k.dkv, k.dkv_floats, "attention_bwd");
    void* args[] = {&dk, &dv, &dout, &q, &kk, &v, &lse, &dvec_c, &lambda, &sh_arg};
    CUDA_CHECK(cudaLaunchKernel(k.dkv, flash_grid(d), dim3(kFlashThreads), args, smem, s));
    CUDA_CHECK_LAUNCH("attention_bwd");
  }
  {
    const size_t smem = smem_for(be, k.dq, k.dq_floats, "attention_bwd");
    void* args[] = {&dq, &dout, &q, &kk, &v, &lse, &dvec_c, &lambda, &sh_arg};
    CUDA_CHECK(cudaLaunchKernel(k.dq, flash_grid(d), dim3(kFlashThreads), args, smem, s));
    CUDA_CHECK_LAUNCH("attention_bwd");
  }
  if (a.differential) {
    flash_dlambda_kernel<<<1, 1024, 0, s>>>(f32(a.dlambda), dl_part, n_rows);
    CUDA_CHECK_LAUNCH("attention_bwd");
  }
}

}  // namespace diffmoe::cuda
