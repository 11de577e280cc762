// Tensor-core fused causal (differential) flash attention: bf16 operands, f32 accumulation
// (docs/model.md §2; docs/derivations.md §1.3-1.4). The same math as flash_attention_ops.cu (read its header first),
// on mma.sync.m16n8k16 bf16 instead of f32 FMA. Used by the CUDA backend under GemmPrecision::kBF16
// (tc_attention_ops.cu); this header includes only CUDA headers, so the standalone harness
// tools/kernel-dev/tc_attention_check.cu can include it too.
//
// Numerics: Q, K, V and dout are rounded to bf16 (round-to-nearest-even, tca_to_bf16_kernel and
// tca_bwd_prep_kernel) into scratch, unless Q, K, V come as bf16 already (the bf16 GEMM mode's
// saved activations: read in place, 16-byte aligned), then staged into shared memory with
// cp.async; P and dS are rounded to bf16 as the A operand of their products; scores, softmax
// statistics (m, l, lse), D and every accumulator stay f32. exp is exp2 of log2-scaled scores
// (z·log2 e).
//
// Design (FA2-style, one layout for every kernel: a warp owns 16 rows, the mma's M)
// - A value group is a differential head (components 2g, 2g+1 sharing V_g = [v_2g ; v_2g+1], W =
//   2·d_v wide) or a plain head (one component). A CTA serves one group: 4 warps per component,
//   so 256 threads (differential) or 128 (plain). Warps 0-3 work on component 0, warps 4-7 on
//   component 1, over the same shared K/V/Q/dO tiles (staged once for both).
// - Forward, CTA per (64-row query tile, group, batch), heaviest tiles first: the warp's Q rows
//   live in registers as A fragments; per 64-key tile (double-buffered cp.async)
//     S = Q·K_cᵀ (16×64 f32), online softmax (m, l) in log2 units, O_c = O_c·corr + P·V_g
//   At the end component 1's warps put O_1/l_1 in shared memory and write o2; component 0's warps
//   write out = O_0/l_0 − λ·O_1/l_1 and lse_c = m_c·ln2 + ln l_c.
// - Backward: (1) tca_bwd_prep_kernel, one warp per output row: dout → bf16, and
//   D_c = rowsum(dO_c ⊙ O_c) with dO_0 = dout, dO_1 = −λ·dout, O_0 = out + λ·o2, O_1 = o2, and the
//   row's Σ dout ⊙ o2 (double) for dλ. (2) dK/dV, CTA per (64-key tile, group, batch): a warp owns
//   16 keys of its component; per 64-query tile of the causal range (double-buffered)
//     Sᵀ = K_c·Q_cᵀ, dPᵀ = coef_c·V_g·doutᵀ, Pᵀ = exp(scale·Sᵀ − lse), dSᵀ = Pᵀ ⊙ (dPᵀ − D_c)
//     dV_g += (coef_c·Pᵀ)·dout,  dK_c += dSᵀ·Q_c   (dK scaled once at the end)
//   V_g·doutᵀ is the same for both components: the two warps owning the same keys each compute
//   half of its columns and swap halves (pair_exchange). The two components' dV_g partials are
//   added in a fixed order through shared memory.
//   (3) dQ, CTA per (64-query tile, group, batch): Q rows in registers; per key tile
//     S, dP = coef_c·dout·V_gᵀ, dS as above,  dQ_c += dS·K_c (scaled at the end).
//   (4) dλ = −Σ of the row partials, one block in a fixed order. No atomics: deterministic.
// - Causal masks only on the diagonal tiles. Rows past T are zero-filled by cp.async (src-size 0):
//   their scores are finite and their contributions vanish (zero dout rows give dP = D = 0, so
//   dS = 0 and P·dout = 0); their outputs are not written.
// - Shared rows are padded by 8 bf16 (16 bytes): every row stride is an odd multiple of 16 bytes
//   mod 128, so the 8 row addresses of an ldmatrix hit 8 different bank groups.
//
// Measured (H100 80GB HBM3, 2026-11-28; bench shape B 8, T 2048, 8 differential heads, d_qk 96,
// d_v 64; times include the f32→bf16 copies; per version in tools/kernel-dev/NOTES-attention.md):
//   v1  this layout                                   forward 0.753 ms, backward 2.116 ms
//   v2  dK/dV: the warp pair shares dout·V_gᵀ           forward 0.747 ms, backward 2.093 ms
//   v3  one FFMA + EX2 per score, mask on diagonal only  forward 0.708 ms, backward 1.982 ms
//   (f32 flash kernel 6.0 / 16.0 ms; cuDNN bf16 SDPA, one call, 0.58 / 1.87 ms). Forward kernel
//   alone 0.572 ms = 421 TFLOP/s on the causal-half FLOP count; 1 CTA of 8 warps per SM
//   (225-255 registers per thread): wgmma/TMA (FA3-style) is the next step, not mma.sync tuning.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace diffmoe::cuda::tca {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;                         // query rows (fwd, dq) or keys (dkv) per CTA and per step
constexpr int kWarpRows = 16;                     // rows per warp: the mma's M
constexpr int kWarpsPerComp = kTile / kWarpRows;  // 4
constexpr int kCompThreads = 32 * kWarpsPerComp;  // 128 threads per component
constexpr int kPad = 8;                           // bf16 per shared row of padding (16 bytes)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kTile % 16 == 0 && kWarpsPerComp * kWarpRows == kTile);

// Sizes of one call. Tensors as in op_args.h: q, k [B,T,H,d_qk], v [B,T,H,d_v], out/o2/dout
// [B,T,G,W], lse and D [B,H,T].
struct TcaShape {
  int batch, seq, heads, groups, comps, d_v;
  float scale;
  __host__ __device__ int64_t row(int b, int t, int h) const { return (static_cast<int64_t>(b) * seq + t) * heads + h; }
  __host__ __device__ int64_t group_row(int b, int t, int g) const {
    return (static_cast<int64_t>(b) * seq + t) * groups + g;
  }
  __host__ __device__ int64_t lse_at(int b, int h, int t) const {
    return (static_cast<int64_t>(b) * heads + h) * seq + t;
  }
};

struct TcaFwdArgs {
  float* out;
  float* o2;
  float* lse;  // o2 only when differential
  const bf16* q;
  const bf16* k;
  const bf16* v;        // bf16 q, k, v (copies, or the caller's)
  const float* lambda;  // [1], differential only
  TcaShape sh;
};
struct TcaBwdArgs {
  float* dq;
  float* dk;
  float* dv;
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* dout;
  const float* lse;
  const float* dvec;  // lse and D_c, both [B,H,T]
  const float* lambda;
  TcaShape sh;
  // When set, the gradient is written here in bf16 instead of f32 (the bf16 GEMM mode: dq feeds W_q's
  // GEMMs, dk and dv the MLA split's backward, which rounds dkv for W_kvb's GEMMs anyway).
  bf16* dq16 = nullptr;
  bf16* dk16 = nullptr;
  bf16* dv16 = nullptr;
  // Every gradient pointer is 8-byte (f32) or 4-byte (bf16) aligned: the two adjacent columns of an
  // accumulator pair go out in one float2 / bf16x2 store (the host checks; else one value a store).
  bool pair_stores = false;
};

// Stores the gradient values v0, v1 of columns at, at + 1 (at even): into g16 in bf16 when it is
// set, else into g in f32; as one 8- or 4-byte store when `pair` (aligned), else two.
__device__ __forceinline__ void store_grad_pair(float* g, bf16* g16, int64_t at, float v0, float v1, bool pair) {
  if (g16 != nullptr) {
    if (pair) {
      *reinterpret_cast<__nv_bfloat162*>(g16 + at) = __floats2bfloat162_rn(v0, v1);
    } else {
      g16[at] = __float2bfloat16_rn(v0);
      g16[at + 1] = __float2bfloat16_rn(v1);
    }
  } else if (pair) {
    *reinterpret_cast<float2*>(g + at) = make_float2(v0, v1);
  } else {
    g[at] = v0;
    g[at + 1] = v1;
  }
}

// ================================================================ PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global → shared, asynchronously; zero-filled when !valid (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// d (16×8 f32) += a (16×16 bf16, row) · b (16×8 bf16, col)
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 2^x in one MUFU.EX2 (flush-to-zero: exp2f adds denormal handling we do not need); 2^−∞ = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo: the lower column
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ================================================================ fragments
// Thread layout of m16n8k16 (lane = 4·gid + tig): C/D element e of an n8 tile sits at row
// gid + 8·(e / 2), column 2·tig + e % 2. A (16×16) regs: (gid, k 2tig..), (gid+8, 2tig..),
// (gid, 2tig+8..), (gid+8, 2tig+8..). B (16×8) regs: (k 2tig.., n gid), (k 2tig+8.., n gid).

// A fragment of a 16×16 block of a row-major [m][k] shared tile (base at its first element).
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const bf16* base, int ld) {
  const int l = threadIdx.x % 32;
  ldmatrix_x4(a, base + (l & 15) * ld + (l >> 4) * 8);
}
// B fragments of two n8 tiles (n 0-7 → b[0..1], n 8-15 → b[2..3]) over k16, from a tile stored
// [n][k] (e.g. K rows for Q·Kᵀ).
__device__ __forceinline__ void ldsm_b_nk(uint32_t (&b)[4], const bf16* base, int ld) {
  const int l = threadIdx.x % 32;
  ldmatrix_x4(b, base + ((l & 7) + ((l >> 4) << 3)) * ld + ((l >> 3) & 1) * 8);
}
// The same from a tile stored [k][n] (e.g. V rows for P·V): ldmatrix.trans.
__device__ __forceinline__ void ldsm_b_kn(uint32_t (&b)[4], const bf16* base, int ld) {
  const int l = threadIdx.x % 32;
  ldmatrix_x4_trans(b, base + ((l & 7) + (((l >> 3) & 1) << 3)) * ld + (l >> 4) * 8);
}
// C (16×N f32, N/8 tiles) → the A fragment of its columns 16j..16j+15, rounded to bf16.
template <int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[NT][4], int j) {
  a[0] = pack_bf16(c[2 * j][0], c[2 * j][1]);
  a[1] = pack_bf16(c[2 * j][2], c[2 * j][3]);
  a[2] = pack_bf16(c[2 * j + 1][0], c[2 * j + 1][1]);
  a[3] = pack_bf16(c[2 * j + 1][2], c[2 * j + 1][3]);
}
// acc (16×N) += A (16×K, A fragments from `a_frag(kk, a)`) · B (K×N, from shared via `b_frag(kk, n2, b)`).
template <int K, int N, class AFrag, class BFrag>
__device__ __forceinline__ void warp_gemm(float (&acc)[N / 8][4], AFrag a_frag, BFrag b_frag) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    a_frag(kk, a);
#pragma unroll
    for (int n2 = 0; n2 < N / 16; ++n2) {
      uint32_t b[4];
      b_frag(kk, n2, b);
      mma_bf16(acc[2 * n2], a, b[0], b[1]);
      mma_bf16(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}
template <int NT>
__device__ __forceinline__ void zero_acc(float (&c)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}

// The warp pair (component 0, wr), (component 1, wr) shares one product (dout·V_gᵀ, the same for
// both components): each warp computed the n8 tiles [c·NS/2, (c+1)·NS/2) of it into `half`; they
// swap halves through `xch` (f32, per pair [2][16][kXchLd]) behind a 64-thread named barrier.
constexpr int kXchLd = kTile / 2 + 4;  // 4 words of padding per row
constexpr int kXchFloats = kWarpsPerComp * 2 * kWarpRows * kXchLd;
template <int NS>
__device__ __forceinline__ void pair_exchange(float (&full)[NS][4], const float (&half)[NS / 2][4], float* xch, int c,
                                              int wr) {
  constexpr int NH = NS / 2;
  const int lane = threadIdx.x % 32;
  float* mine = xch + (wr * 2 + c) * kWarpRows * kXchLd;
  const float* other = xch + (wr * 2 + 1 - c) * kWarpRows * kXchLd;
#pragma unroll
  for (int n = 0; n < NH; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(mine + (lane / 4 + 8 * h) * kXchLd + n * 8 + 2 * (lane % 4)) =
          make_float2(half[n][2 * h], half[n][2 * h + 1]);
  asm volatile("bar.sync %0, %1;\n" ::"r"(1 + wr), "r"(64) : "memory");
#pragma unroll
  for (int n = 0; n < NH; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 o = *reinterpret_cast<const float2*>(other + (lane / 4 + 8 * h) * kXchLd + n * 8 + 2 * (lane % 4));
      // c is warp-uniform; both branches index registers at compile time
      full[n][2 * h] = c == 0 ? half[n][2 * h] : o.x;
      full[n][2 * h + 1] = c == 0 ? half[n][2 * h + 1] : o.y;
      full[NH + n][2 * h] = c == 0 ? o.x : half[n][2 * h];
      full[NH + n][2 * h + 1] = c == 0 ? o.y : half[n][2 * h + 1];
    }
}

// Rows [row0, row0 + ROWS) × COLS bf16 of a strided source (row t at src + t·stride) into a shared
// tile with row stride COLS + kPad; rows at or past seq are zero-filled. NT threads take part.
template <int ROWS, int COLS, int NT>
__device__ __forceinline__ void cp_tile(bf16* dst, const bf16* src, int64_t stride, int row0, int seq) {
  constexpr int kChunks = COLS / 8, kTotal = ROWS * kChunks, kLd = COLS + kPad;
  static_assert(COLS % 8 == 0, "16-byte chunks");
#pragma unroll
  for (int j = 0; j < (kTotal + NT - 1) / NT; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * NT;
    if (kTotal % NT != 0 && i >= kTotal) break;
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool ok = row0 + r < seq;
    cp_async16(dst + r * kLd + c, src + (ok ? static_cast<int64_t>(row0 + r) * stride : 0) + c, ok);
  }
}

// ================================================================ forward

template <int DQK, int W, int COMPS>
struct FwdLayout {  // bf16 element offsets in shared memory
  static constexpr int kThreads = kCompThreads * COMPS;
  static constexpr int kLdq = DQK + kPad, kLdv = W + kPad;
  static constexpr int kQ = 0;                              // Q [COMPS][64][kLdq]
  static constexpr int kK = kQ + COMPS * kTile * kLdq;      // K [2 stages][COMPS][64][kLdq]
  static constexpr int kV = kK + 2 * COMPS * kTile * kLdq;  // V_g [2 stages][64][kLdv]
  static constexpr int kElems = kV + 2 * kTile * kLdv;
  static constexpr int kLdx = W + 4;  // f32 exchange O_1 [64][kLdx], over K/V
  static constexpr size_t kBytes = static_cast<size_t>(kElems) * sizeof(bf16);
  static_assert(kTile * kLdx * sizeof(float) <= (kElems - kK) * sizeof(bf16));
};

template <int DQK, int W, int COMPS>
__global__ void __launch_bounds__(kCompThreads* COMPS) tca_fwd_kernel(const TcaFwdArgs a) {
  using L = FwdLayout<DQK, W, COMPS>;
  constexpr int NS = kTile / 8, NO = W / 8;  // n8 tiles of S and of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  const TcaShape& sh = a.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = warp / kWarpsPerComp, wr = warp % kWarpsPerComp;
  const int n_tiles = (sh.seq + kTile - 1) / kTile;
  const int qt = n_tiles - 1 - static_cast<int>(blockIdx.x);  // longest causal ranges first
  const int g = blockIdx.y, b = blockIdx.z, q0 = qt * kTile, first = COMPS * g;
  const int64_t qk_stride = static_cast<int64_t>(sh.heads) * DQK, v_stride = static_cast<int64_t>(sh.heads) * sh.d_v;
  const bf16* v_g = a.v + sh.row(b, 0, first) * sh.d_v;

  auto load_kv = [&](int kt, int stage) {
#pragma unroll
    for (int cc = 0; cc < COMPS; ++cc)
      cp_tile<kTile, DQK, L::kThreads>(smem + L::kK + (stage * COMPS + cc) * kTile * L::kLdq,
                                       a.k + sh.row(b, 0, first + cc) * DQK, qk_stride, kt * kTile, sh.seq);
    cp_tile<kTile, W, L::kThreads>(smem + L::kV + stage * kTile * L::kLdv, v_g, v_stride, kt * kTile, sh.seq);
  };
#pragma unroll
  for (int cc = 0; cc < COMPS; ++cc)
    cp_tile<kTile, DQK, L::kThreads>(smem + L::kQ + cc * kTile * L::kLdq, a.q + sh.row(b, 0, first + cc) * DQK,
                                     qk_stride, q0, sh.seq);
  load_kv(0, 0);
  cp_async_commit();

  uint32_t qf[DQK / 16][4];  // this warp's 16 Q rows as A fragments
  float o[NO][4];
  zero_acc(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows gid, gid + 8 (l: this thread's columns)
  const float sl2 = sh.scale * kLog2e;
  const int row0 = q0 + wr * kWarpRows + lane / 4;  // rows row0, row0 + 8

#pragma unroll 1  // unrolled, the tile loop grew the kernel to tens of thousands of instructions
  for (int kt = 0; kt <= qt; ++kt) {
    cp_async_wait_all();
    __syncthreads();  // tile kt is visible, and every warp is done with tile kt − 1's stage
    if (kt == 0) {
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk)
        ldsm_a(qf[kk], smem + L::kQ + (c * kTile + wr * kWarpRows) * L::kLdq + kk * 16, L::kLdq);
    }
    if (kt < qt) load_kv(kt + 1, (kt + 1) & 1);
    cp_async_commit();
    const bf16* ks = smem + L::kK + (((kt & 1) * COMPS) + c) * kTile * L::kLdq;
    const bf16* vs = smem + L::kV + (kt & 1) * kTile * L::kLdv;

    // S = Q·K_cᵀ
    float s[NS][4];
    zero_acc(s);
    warp_gemm<DQK, kTile>(
        s,
        [&](int kk, uint32_t(&f)[4]) {
          f[0] = qf[kk][0];
          f[1] = qf[kk][1];
          f[2] = qf[kk][2];
          f[3] = qf[kk][3];
        },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_nk(f, ks + n2 * 16 * L::kLdq + kk * 16, L::kLdq); });

    // online softmax in log2 units: m = max of z = scale·log2e·S, p = 2^(z − m) (one FFMA + EX2);
    // keys above the diagonal are −∞, on the diagonal tile only
    if (kt == qt) {
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (kt * kTile + n * 8 + 2 * (lane % 4) + (e & 1) > row0 + 8 * (e >> 1)) s[n][e] = -INFINITY;
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
    float corr[2], neg_m[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h] * sl2);  // finite: key 0 is in every row's first tile
      corr[h] = fast_exp2(m[h] - m_new);             // m = −∞ on the first tile: 0
      m[h] = m_new;
      neg_m[h] = -m_new;
      l[h] *= corr[h];
    }
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(fmaf(s[n][e], sl2, neg_m[e >> 1]));
        s[n][e] = p;
        l[e >> 1] += p;
      }
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }
    // O_c += P·V_g (P rounded to bf16)
    warp_gemm<kTile, W>(
        o, [&](int kk, uint32_t(&f)[4]) { acc_to_a(f, s, kk); },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_kn(f, vs + kk * 16 * L::kLdv + n2 * 16, L::kLdv); });
  }

  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    inv[h] = 1.0f / l[h];
    const int row = row0 + 8 * h;
    if (lane % 4 == 0 && row < sh.seq) a.lse[sh.lse_at(b, first + c, row)] = m[h] * kLn2 + logf(l[h]);
  }
  __syncthreads();  // every warp is done with the K/V stages (no copies are in flight)
  float* xo = reinterpret_cast<float*>(smem + L::kK);  // O_1 [64][kLdx]
  if (COMPS == 2 && c == 1) {
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wr * kWarpRows + lane / 4 + 8 * (e >> 1), col = n * 8 + 2 * (lane % 4) + (e & 1);
        const float y = o[n][e] * inv[e >> 1];
        xo[r * L::kLdx + col] = y;
        if (q0 + r < sh.seq) a.o2[sh.group_row(b, q0 + r, g) * W + col] = y;
      }
  }
  __syncthreads();
  if (c == 0) {
    const float lam = COMPS == 2 ? a.lambda[0] : 0.0f;
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wr * kWarpRows + lane / 4 + 8 * (e >> 1), col = n * 8 + 2 * (lane % 4) + (e & 1);
        float y = o[n][e] * inv[e >> 1];
        if (COMPS == 2) y -= lam * xo[r * L::kLdx + col];
        if (q0 + r < sh.seq) a.out[sh.group_row(b, q0 + r, g) * W + col] = y;
      }
  }
}

// ================================================================ backward: prep, dλ, conversion

// Elementwise round-to-nearest-even f32 → bf16 (vec4: src 16-byte aligned and n % 4 == 0).
__global__ void tca_to_bf16_kernel(bf16* dst, const float* src, int64_t n, bool vec4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec4) {
    for (; i < n / 4; i += stride) {
      const float4 x = reinterpret_cast<const float4*>(src)[i];
      uint2 y;
      y.x = pack_bf16(x.x, x.y);
      y.y = pack_bf16(x.z, x.w);
      reinterpret_cast<uint2*>(dst)[i] = y;
    }
  } else {
    for (; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
  }
}

// One warp per output row (b, t, g): dout → bf16 (dout16, same layout), D_c into dvec [B,H,T],
// and the row's Σ dout ⊙ o2 in double into dl_part [B·T·G] (differential only).
__global__ void tca_bwd_prep_kernel(bf16* dout16, float* dvec, double* dl_part, const float* dout, const float* out,
                                    const float* o2, const float* lambda, TcaShape sh, int width) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int b = blockIdx.y;
  if (row >= static_cast<int64_t>(sh.seq) * sh.groups) return;
  const int t = static_cast<int>(row / sh.groups), g = static_cast<int>(row % sh.groups);
  const int64_t base = sh.group_row(b, t, g) * width;
  const bool diff = sh.comps == 2;
  const float lam = diff ? lambda[0] : 0.0f;
  float d0 = 0.0f, d1 = 0.0f;
  double dl = 0.0;
  for (int i = lane; i < width; i += 32) {
    const float d = dout[base + i];
    dout16[base + i] = __float2bfloat16_rn(d);
    if (diff) {
      const float y2 = o2[base + i];
      d0 += d * (out[base + i] + lam * y2);
      d1 += d * y2;
      dl += static_cast<double>(d) * y2;
    } else {
      d0 += d * out[base + i];
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    d0 += __shfl_xor_sync(0xffffffffu, d0, o);
    d1 += __shfl_xor_sync(0xffffffffu, d1, o);
    dl += __shfl_xor_sync(0xffffffffu, dl, o);
  }
  if (lane != 0) return;
  const int first = sh.comps * g;
  dvec[sh.lse_at(b, first, t)] = d0;
  if (diff) {
    dvec[sh.lse_at(b, first + 1, t)] = -lam * d1;
    dl_part[sh.group_row(b, t, g)] = dl;
  }
}

constexpr int kDlambdaThreads = 1024;
// dlambda[0] = −Σ dl_part (overwritten): one block, fixed order (deterministic).
__global__ void __launch_bounds__(kDlambdaThreads)
    tca_dlambda_kernel(float* dlambda, const double* dl_part, int64_t n) {
  __shared__ double red[kDlambdaThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kDlambdaThreads) s += dl_part[i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x >= 32) return;
  s = red[threadIdx.x];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x == 0) dlambda[0] = static_cast<float>(-s);
}

// ================================================================ backward: dK, dV

template <int DQK, int W, int COMPS>
struct DkvLayout {  // bf16 element offsets, then f32 statistics
  static constexpr int kThreads = kCompThreads * COMPS;
  static constexpr int kLdq = DQK + kPad, kLdv = W + kPad;
  static constexpr int kK = 0;                               // K [COMPS][64][kLdq] (this CTA's keys)
  static constexpr int kV = kK + COMPS * kTile * kLdq;       // V_g [64][kLdv]
  static constexpr int kQ = kV + kTile * kLdv;               // Q [2 stages][COMPS][64][kLdq]
  static constexpr int kDo = kQ + 2 * COMPS * kTile * kLdq;  // dout [2 stages][64][kLdv]
  static constexpr int kElems = kDo + 2 * kTile * kLdv;
  static constexpr int kStatFloats = 2 * 2 * COMPS * kTile;  // lse, D [2 stages][COMPS][64] each
  static constexpr int kXch = kStatFloats;                   // pair_exchange buffer (differential)
  static constexpr int kFloats = kXch + (COMPS == 2 ? kXchFloats : 0);
  static constexpr int kLdx = W + 4;  // f32 exchange dV_1 [64][kLdx], over Q/dO
  static constexpr size_t kBytes = static_cast<size_t>(kElems) * sizeof(bf16) + kFloats * sizeof(float);
  static_assert(kElems % 8 == 0, "the statistics start 16-byte aligned");
  static_assert(kTile * kLdx * sizeof(float) <= (kElems - kQ) * sizeof(bf16));
};

template <int DQK, int W, int COMPS>
__global__ void __launch_bounds__(kCompThreads* COMPS) tca_bwd_dkv_kernel(const TcaBwdArgs a) {
  using L = DkvLayout<DQK, W, COMPS>;
  constexpr int NS = kTile / 8, NV = W / 8, NK = DQK / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  float* stats = reinterpret_cast<float*>(smem_raw + static_cast<size_t>(L::kElems) * sizeof(bf16));
  const TcaShape& sh = a.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = warp / kWarpsPerComp, wr = warp % kWarpsPerComp;
  const int n_tiles = (sh.seq + kTile - 1) / kTile;
  const int kt = blockIdx.x;  // key tile 0 has the longest causal range: first
  const int g = blockIdx.y, b = blockIdx.z, k0 = kt * kTile, first = COMPS * g;
  const int64_t qk_stride = static_cast<int64_t>(sh.heads) * DQK, v_stride = static_cast<int64_t>(sh.heads) * sh.d_v;
  const int64_t do_stride = static_cast<int64_t>(sh.groups) * W;
  const float lam = COMPS == 2 ? a.lambda[0] : 0.0f;
  const float coef = c == 0 ? 1.0f : -lam;

  // Query tile qt into a stage: Q of both components, dout rows, lse and D (zero past T).
  auto load_q = [&](int qt, int stage) {
    const int t0 = qt * kTile;
#pragma unroll
    for (int cc = 0; cc < COMPS; ++cc)
      cp_tile<kTile, DQK, L::kThreads>(smem + L::kQ + (stage * COMPS + cc) * kTile * L::kLdq,
                                       a.q + sh.row(b, 0, first + cc) * DQK, qk_stride, t0, sh.seq);
    cp_tile<kTile, W, L::kThreads>(smem + L::kDo + stage * kTile * L::kLdv, a.dout + sh.group_row(b, 0, g) * W,
                                   do_stride, t0, sh.seq);
    for (int i = threadIdx.x; i < 2 * COMPS * kTile; i += L::kThreads) {
      const int which = i / (COMPS * kTile), cc = (i / kTile) % COMPS, r = i % kTile;  // which: 0 lse, 1 D
      const bool ok = t0 + r < sh.seq;
      const float* src = (which == 0 ? a.lse : a.dvec) + sh.lse_at(b, first + cc, ok ? t0 + r : 0);
      cp_async4(stats + ((which * 2 + stage) * COMPS + cc) * kTile + r, src, ok);
    }
  };
#pragma unroll
  for (int cc = 0; cc < COMPS; ++cc)
    cp_tile<kTile, DQK, L::kThreads>(smem + L::kK + cc * kTile * L::kLdq, a.k + sh.row(b, 0, first + cc) * DQK,
                                     qk_stride, k0, sh.seq);
  cp_tile<kTile, W, L::kThreads>(smem + L::kV, a.v + sh.row(b, 0, first) * sh.d_v, v_stride, k0, sh.seq);
  load_q(kt, 0);
  cp_async_commit();

  float dv[NV][4], dk[NK][4];
  zero_acc(dv);
  zero_acc(dk);
  const float sl2 = sh.scale * kLog2e;
  const int key0 = k0 + wr * kWarpRows + lane / 4;  // keys key0, key0 + 8
  const bf16* ks = smem + L::kK + (c * kTile + wr * kWarpRows) * L::kLdq;
  const bf16* vs = smem + L::kV + wr * kWarpRows * L::kLdv;

#pragma unroll 1
  for (int qt = kt, it = 0; qt < n_tiles; ++qt, ++it) {
    cp_async_wait_all();
    __syncthreads();
    if (qt + 1 < n_tiles) load_q(qt + 1, (it + 1) & 1);
    cp_async_commit();
    const int stage = it & 1, q0 = qt * kTile;
    const bf16* qs = smem + L::kQ + (stage * COMPS + c) * kTile * L::kLdq;
    const bf16* dos = smem + L::kDo + stage * kTile * L::kLdv;
    const float* lse_s = stats + (stage * COMPS + c) * kTile;
    const float* d_s = stats + ((2 + stage) * COMPS + c) * kTile;

    // Sᵀ = K_c·Q_cᵀ and doutᵀ-product V_g·doutᵀ: [16 keys][64 queries]
    float st[NS][4], dpt[NS][4];
    zero_acc(st);
    warp_gemm<DQK, kTile>(
        st, [&](int kk, uint32_t(&f)[4]) { ldsm_a(f, ks + kk * 16, L::kLdq); },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_nk(f, qs + n2 * 16 * L::kLdq + kk * 16, L::kLdq); });
    if (COMPS == 2) {  // V_g·doutᵀ is the same for both components: each warp of the pair does half
      float half[NS / 2][4];
      zero_acc(half);
      const bf16* dos_c = dos + c * (kTile / 2) * L::kLdv;
      warp_gemm<W, kTile / 2>(
          half, [&](int kk, uint32_t(&f)[4]) { ldsm_a(f, vs + kk * 16, L::kLdv); },
          [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_nk(f, dos_c + n2 * 16 * L::kLdv + kk * 16, L::kLdv); });
      pair_exchange(dpt, half, stats + L::kXch, c, wr);
    } else {
      zero_acc(dpt);
      warp_gemm<W, kTile>(
          dpt, [&](int kk, uint32_t(&f)[4]) { ldsm_a(f, vs + kk * 16, L::kLdv); },
          [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_nk(f, dos + n2 * 16 * L::kLdv + kk * 16, L::kLdv); });
    }

    // Pᵀ = exp(scale·Sᵀ − lse), dSᵀ = Pᵀ ⊙ (coef·V·doutᵀ − D); st ← coef·Pᵀ, dpt ← dSᵀ
    if (qt == kt) {  // the diagonal tile: queries before a key do not see it
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + 8 * (e >> 1) > q0 + n * 8 + 2 * (lane % 4) + (e & 1)) st[n][e] = -INFINITY;
    }
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      const int qc = n * 8 + 2 * (lane % 4);
      const float neg_lse2[2] = {-lse_s[qc] * kLog2e, -lse_s[qc + 1] * kLog2e};
      const float dd[2] = {d_s[qc], d_s[qc + 1]};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(fmaf(st[n][e], sl2, neg_lse2[e & 1]));
        dpt[n][e] = p * fmaf(coef, dpt[n][e], -dd[e & 1]);
        st[n][e] = coef * p;
      }
    }
    // dV_g += (coef·Pᵀ)·dout,  dK_c += dSᵀ·Q_c
    warp_gemm<kTile, W>(
        dv, [&](int kk, uint32_t(&f)[4]) { acc_to_a(f, st, kk); },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_kn(f, dos + kk * 16 * L::kLdv + n2 * 16, L::kLdv); });
    warp_gemm<kTile, DQK>(
        dk, [&](int kk, uint32_t(&f)[4]) { acc_to_a(f, dpt, kk); },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_kn(f, qs + kk * 16 * L::kLdq + n2 * 16, L::kLdq); });
  }

  // Accumulator pair (2h, 2h + 1) of n8 tile n: key key0 + 8h, columns col, col + 1.
#pragma unroll
  for (int n = 0; n < NK; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = key0 + 8 * h, col = n * 8 + 2 * (lane % 4);
      if (key >= sh.seq) continue;
      store_grad_pair(a.dk, a.dk16, sh.row(b, key, first + c) * DQK + col, sh.scale * dk[n][2 * h],
                      sh.scale * dk[n][2 * h + 1], a.pair_stores);
    }
  __syncthreads();  // every warp is done with the Q/dO stages (no copies are in flight)
  float* xv = reinterpret_cast<float*>(smem + L::kQ);  // component 1's dV_g partial [64][kLdx]
  if (COMPS == 2 && c == 1) {
#pragma unroll
    for (int n = 0; n < NV; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        xv[(wr * kWarpRows + lane / 4 + 8 * (e >> 1)) * L::kLdx + n * 8 + 2 * (lane % 4) + (e & 1)] = dv[n][e];
  }
  __syncthreads();
  if (c == 0) {
#pragma unroll
    for (int n = 0; n < NV; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wr * kWarpRows + lane / 4 + 8 * h, col = n * 8 + 2 * (lane % 4);
        float y0 = dv[n][2 * h], y1 = dv[n][2 * h + 1];
        if (COMPS == 2) {
          y0 += xv[r * L::kLdx + col];
          y1 += xv[r * L::kLdx + col + 1];
        }
        if (k0 + r >= sh.seq) continue;
        store_grad_pair(a.dv, a.dv16, sh.row(b, k0 + r, first) * sh.d_v + col, y0, y1, a.pair_stores);
      }
  }
}

// ================================================================ backward: dQ

template <int DQK, int W, int COMPS>
struct DqLayout {
  static constexpr int kThreads = kCompThreads * COMPS;
  static constexpr int kLdq = DQK + kPad, kLdv = W + kPad;
  static constexpr int kQ = 0;                              // Q [COMPS][64][kLdq] (this CTA's queries)
  static constexpr int kDo = kQ + COMPS * kTile * kLdq;     // dout [64][kLdv]
  static constexpr int kK = kDo + kTile * kLdv;             // K [2 stages][COMPS][64][kLdq]
  static constexpr int kV = kK + 2 * COMPS * kTile * kLdq;  // V_g [2 stages][64][kLdv]
  static constexpr int kElems = kV + 2 * kTile * kLdv;
  static constexpr size_t kBytes = static_cast<size_t>(kElems) * sizeof(bf16);
};

template <int DQK, int W, int COMPS>
__global__ void __launch_bounds__(kCompThreads* COMPS) tca_bwd_dq_kernel(const TcaBwdArgs a) {
  using L = DqLayout<DQK, W, COMPS>;
  constexpr int NS = kTile / 8, NK = DQK / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  const TcaShape& sh = a.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = warp / kWarpsPerComp, wr = warp % kWarpsPerComp;
  const int n_tiles = (sh.seq + kTile - 1) / kTile;
  const int qt = n_tiles - 1 - static_cast<int>(blockIdx.x);
  const int g = blockIdx.y, b = blockIdx.z, q0 = qt * kTile, first = COMPS * g;
  const int64_t qk_stride = static_cast<int64_t>(sh.heads) * DQK, v_stride = static_cast<int64_t>(sh.heads) * sh.d_v;
  const bf16* v_g = a.v + sh.row(b, 0, first) * sh.d_v;
  const float lam = COMPS == 2 ? a.lambda[0] : 0.0f;
  const float coef = c == 0 ? 1.0f : -lam;

  auto load_kv = [&](int kt, int stage) {
#pragma unroll
    for (int cc = 0; cc < COMPS; ++cc)
      cp_tile<kTile, DQK, L::kThreads>(smem + L::kK + (stage * COMPS + cc) * kTile * L::kLdq,
                                       a.k + sh.row(b, 0, first + cc) * DQK, qk_stride, kt * kTile, sh.seq);
    cp_tile<kTile, W, L::kThreads>(smem + L::kV + stage * kTile * L::kLdv, v_g, v_stride, kt * kTile, sh.seq);
  };
#pragma unroll
  for (int cc = 0; cc < COMPS; ++cc)
    cp_tile<kTile, DQK, L::kThreads>(smem + L::kQ + cc * kTile * L::kLdq, a.q + sh.row(b, 0, first + cc) * DQK,
                                     qk_stride, q0, sh.seq);
  cp_tile<kTile, W, L::kThreads>(smem + L::kDo, a.dout + sh.group_row(b, 0, g) * W, static_cast<int64_t>(sh.groups) * W,
                                 q0, sh.seq);
  load_kv(0, 0);
  cp_async_commit();

  const int row0 = q0 + wr * kWarpRows + lane / 4;  // rows row0, row0 + 8
  float lse2[2], dd[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    lse2[h] = row < sh.seq ? a.lse[sh.lse_at(b, first + c, row)] * kLog2e : 0.0f;
    dd[h] = row < sh.seq ? a.dvec[sh.lse_at(b, first + c, row)] : 0.0f;
  }
  uint32_t qf[DQK / 16][4];  // this warp's Q_c rows as A fragments (dout's are read from shared each tile)
  float dq[NK][4];
  zero_acc(dq);
  const float sl2 = sh.scale * kLog2e;

#pragma unroll 1
  for (int kt = 0; kt <= qt; ++kt) {
    cp_async_wait_all();
    __syncthreads();
    if (kt == 0) {
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk)
        ldsm_a(qf[kk], smem + L::kQ + (c * kTile + wr * kWarpRows) * L::kLdq + kk * 16, L::kLdq);
    }
    if (kt < qt) load_kv(kt + 1, (kt + 1) & 1);
    cp_async_commit();
    const bf16* ks = smem + L::kK + (((kt & 1) * COMPS) + c) * kTile * L::kLdq;
    const bf16* vs = smem + L::kV + (kt & 1) * kTile * L::kLdv;
    const bf16* dos = smem + L::kDo + wr * kWarpRows * L::kLdv;

    // S = Q_c·K_cᵀ, dout·V_gᵀ: [16 queries][64 keys]
    // Both components compute dout·V_gᵀ for their rows: sharing it through shared memory as the
    // dK/dV kernel does measured 2 % slower here (v2 in tools/kernel-dev/NOTES-attention.md).
    float s[NS][4], dp[NS][4];
    zero_acc(s);
    zero_acc(dp);
    warp_gemm<DQK, kTile>(
        s,
        [&](int kk, uint32_t(&f)[4]) {
          f[0] = qf[kk][0];
          f[1] = qf[kk][1];
          f[2] = qf[kk][2];
          f[3] = qf[kk][3];
        },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_nk(f, ks + n2 * 16 * L::kLdq + kk * 16, L::kLdq); });
    warp_gemm<W, kTile>(
        dp, [&](int kk, uint32_t(&f)[4]) { ldsm_a(f, dos + kk * 16, L::kLdv); },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_nk(f, vs + n2 * 16 * L::kLdv + kk * 16, L::kLdv); });

    // dS = P ⊙ (coef·dout·Vᵀ − D), P = exp(scale·S − lse)
    if (kt == qt) {  // the diagonal tile: keys after a query are not seen
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (kt * kTile + n * 8 + 2 * (lane % 4) + (e & 1) > row0 + 8 * (e >> 1)) s[n][e] = -INFINITY;
    }
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(fmaf(s[n][e], sl2, -lse2[e >> 1]));
        dp[n][e] = p * fmaf(coef, dp[n][e], -dd[e >> 1]);
      }
    // dQ_c += dS·K_c
    warp_gemm<kTile, DQK>(
        dq, [&](int kk, uint32_t(&f)[4]) { acc_to_a(f, dp, kk); },
        [&](int kk, int n2, uint32_t(&f)[4]) { ldsm_b_kn(f, ks + kk * 16 * L::kLdq + n2 * 16, L::kLdq); });
  }

#pragma unroll
  for (int n = 0; n < NK; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h, col = n * 8 + 2 * (lane % 4);
      if (row >= sh.seq) continue;
      store_grad_pair(a.dq, a.dq16, sh.row(b, row, first + c) * DQK + col, sh.scale * dq[n][2 * h],
                      sh.scale * dq[n][2 * h + 1], a.pair_stores);
    }
}

// ================================================================ launchers and the one dispatch

template <class Kernel>
inline cudaError_t launch_tiled(Kernel kernel, size_t smem, int threads, const TcaShape& sh, cudaStream_t s,
                                const void* args) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((sh.seq + kTile - 1) / kTile), static_cast<unsigned>(sh.groups),
                  static_cast<unsigned>(sh.batch));
  void* argv[] = {const_cast<void*>(args)};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(threads), argv, smem, s);
}

template <int DQK, int W, int COMPS>
cudaError_t launch_fwd(const TcaFwdArgs& a, cudaStream_t s) {
  using L = FwdLayout<DQK, W, COMPS>;
  return launch_tiled(tca_fwd_kernel<DQK, W, COMPS>, L::kBytes, L::kThreads, a.sh, s, &a);
}
template <int DQK, int W, int COMPS>
cudaError_t launch_dkv(const TcaBwdArgs& a, cudaStream_t s) {
  using L = DkvLayout<DQK, W, COMPS>;
  return launch_tiled(tca_bwd_dkv_kernel<DQK, W, COMPS>, L::kBytes, L::kThreads, a.sh, s, &a);
}
template <int DQK, int W, int COMPS>
cudaError_t launch_dq(const TcaBwdArgs& a, cudaStream_t s) {
  using L = DqLayout<DQK, W, COMPS>;
  return launch_tiled(tca_bwd_dq_kernel<DQK, W, COMPS>, L::kBytes, L::kThreads, a.sh, s, &a);
}

struct TcaKernels {
  cudaError_t (*fwd)(const TcaFwdArgs&, cudaStream_t);
  cudaError_t (*dkv)(const TcaBwdArgs&, cudaStream_t);
  cudaError_t (*dq)(const TcaBwdArgs&, cudaStream_t);
};
template <int DQK, int W, int COMPS>
TcaKernels kernels_for() {
  return {&launch_fwd<DQK, W, COMPS>, &launch_dkv<DQK, W, COMPS>, &launch_dq<DQK, W, COMPS>};
}
template <int DQK, int COMPS>
bool pick_width(int width, TcaKernels* k) {
  switch (width) {
    case 32: *k = kernels_for<DQK, 32, COMPS>(); return true;
    case 64: *k = kernels_for<DQK, 64, COMPS>(); return true;
    case 128: *k = kernels_for<DQK, 128, COMPS>(); return true;
    default: return false;
  }
}
template <int COMPS>
bool pick_dqk(int d_qk, int width, TcaKernels* k) {
  switch (d_qk) {
    case 32: return pick_width<32, COMPS>(width, k);
    case 48: return pick_width<48, COMPS>(width, k);
    case 64: return pick_width<64, COMPS>(width, k);
    case 96: return pick_width<96, COMPS>(width, k);
    case 128: return pick_width<128, COMPS>(width, k);
    default: return false;
  }
}
// The one place that maps a shape to its instantiation: d_qk ∈ {32, 48, 64, 96, 128}, value-group
// width W = comps·d_v ∈ {32, 64, 128}, comps ∈ {1, 2}; false if not covered.
inline bool tca_pick(int d_qk, int width, int comps, TcaKernels* k) {
  if (comps == 1) return pick_dqk<1>(d_qk, width, k);
  if (comps == 2) return pick_dqk<2>(d_qk, width, k);
  return false;
}

// Scratch carved by the caller: bf16 copies of q, k, v (unless qkv_copies is false: the caller's
// q, k, v are bf16 already and read in place; then q = k = v = 0 and no bytes), dout, D [B,H,T]
// f32, dλ partials [B·T·G] f64, each 256-byte aligned.
struct TcaScratchLayout {
  size_t q, k, v, dout, dvec, dl_part, bytes;
};
inline TcaScratchLayout tca_scratch_layout(const TcaShape& sh, int d_qk, bool backward, bool qkv_copies = true) {
  const auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t rows = static_cast<size_t>(sh.batch) * sh.seq * sh.heads;
  const size_t grows = static_cast<size_t>(sh.batch) * sh.seq * sh.groups;
  TcaScratchLayout l{};
  if (qkv_copies) {
    l.q = 0;
    l.k = l.q + up(rows * d_qk * sizeof(bf16));
    l.v = l.k + up(rows * d_qk * sizeof(bf16));
    l.bytes = l.v + up(rows * sh.d_v * sizeof(bf16));
  }
  if (backward) {
    l.dout = l.bytes;
    l.dvec = l.dout + up(rows * sh.d_v * sizeof(bf16));
    l.dl_part = l.dvec + up(rows * sizeof(float));
    l.bytes = l.dl_part + up(grows * sizeof(double));
  }
  return l;
}

}  // namespace diffmoe::cuda::tca
