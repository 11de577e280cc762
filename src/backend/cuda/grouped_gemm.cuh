// Grouped GEMM for the MoE experts on bf16 tensor cores, scheduled on the device: the group
// offsets [G+1] are read by the kernel, never by the host, so the op needs no stream sync.
// This file: the mma.sync kernel (every layout, any sm_80+ GPU; 230-290 TFLOP/s at the bench shapes
// R = 65,536, G = 64) and what the Hopper kernel (grouped_gemm_tma.cuh: TMA + wgmma, 410-540) shares
// with it: the params, the offsets checks and the bf16 operand copies. tools/kernel-dev/
// NOTES-grouped-gemm.md has the versions and measurements.
//
// Three layouts, one kernel template (C is f32 row-major, A and B bf16 row-major, f32 accumulate):
//   kFwd   C[rows_g]  = alpha·A[rows_g]·B[g]ᵀ + beta·C[rows_g]   A [R,k], B [G,n,k]  (trans_b)
//   kDgrad C[rows_g]  = alpha·A[rows_g]·B[g]  + beta·C[rows_g]   A [R,k], B [G,k,n]
//   kWgrad C[g]       = alpha·A[rows_g]ᵀ·B[rows_g] + beta·C[g]   A [R,m], B [R,n], C [G,m,n]
// fwd/dgrad take an optional second term, C = alpha·(A·op(B) + A2·op(B2)) + beta·C (params a2, b2,
// k2): launch_grouped_gemm runs it as a second launch with beta = 1; the TMA kernel fuses it.
// Operands are bf16 copies whose rows are padded to a multiple of 8 elements with zeros (the
// f32 → bf16 conversion below writes them that way), so every 16-byte chunk a CTA copies is either
// wholly inside a padded row or wholly outside the tile: loads predicate per chunk, never per element.
//
// Design (mma.sync, the Ampere-style path that also runs on Hopper):
// - Block tile kBM×kBN×kBK, kWarpsM×kWarpsN warps, each a (kBM/kWarpsM)×(kBN/kWarpsN) warp tile of
//   m16n8k16 bf16 MMAs with f32 accumulators in registers.
// - Global → shared by cp.async (16 bytes, zero-filled when out of range) into a kStages-deep ring.
// - Shared tiles keep the global layout: "K-contiguous" [rows][kBK] (A in fwd/dgrad, B in fwd) or
//   "MN-contiguous" [kBK][cols] (B in dgrad, A and B in wgrad, where the reduction runs over rows).
//   Fragments come from ldmatrix on K-contiguous tiles and from ldmatrix.trans on MN-contiguous
//   ones. Each smem row is padded by 16 bytes: the 8 row addresses of one 8×8 ldmatrix then fall
//   into 8 different 16-byte bank groups (row strides 80 B and 272 B are odd multiples of 16 B).
// - Scheduling, fwd/dgrad: a 1-D grid of (ceil(R/kBM) + G) × n-tiles CTAs, an upper bound of the
//   sum over groups of ceil(rows_g/kBM) m-tiles; n-tiles run fastest, so CTAs sharing an A tile run
//   together. Warp 0 of each CTA prefix-sums the m-tile counts of the groups (32 at a time, by warp
//   shuffles) to find its (group, m-tile) and the CTA exits if it has none.
//   wgrad: grid (m-tiles·n-tiles, G); each CTA reduces over its group's rows in kBK steps.
// - Bad offsets (offsets[0] ≠ 0, negative, decreasing, offsets[G] > R): CTA 0 records the first bad
//   index in a GroupedGemmIssue (the layout of diffmoe's DeviceIssue), and every CTA skips a group
//   whose bounds are bad instead of reading outside the operands.
// - Epilogue straight from the accumulators: alpha·acc + beta·C (C not read when beta = 0), float2
//   stores when n is even, rows ≥ the group's end and columns ≥ n not written.
//
// Includes only CUDA headers: tools/kernel-dev/grouped_gemm_check.cu compiles it standalone.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace diffmoe::cuda::gg {

using bf16 = __nv_bfloat16;

enum class GroupedLayout { kFwd, kDgrad, kWgrad };

// Same layout as diffmoe::DeviceIssue (device_issue.h; gemm_ops.cu static_asserts it).
struct GroupedGemmIssue {
  int32_t flag;  // 0 = nothing recorded; set once by atomicCAS
  int32_t site;
  int64_t index, value, limit;
};

struct GroupedGemmParams {
  const bf16* a = nullptr;           // fwd/dgrad: [R, lda]; wgrad: [R, lda]      (lda ≥ k resp. m, multiple of 8)
  const bf16* b = nullptr;           // fwd: [G, n, ldb]; dgrad: [G, k, ldb]; wgrad: [R, ldb]
  float* c = nullptr;                // fwd/dgrad: [R, n]; wgrad: [G, m, n]
  const int32_t* offsets = nullptr;  // [G+1]
  int rows = 0, groups = 0;          // R, G
  int m = 0, n = 0, k = 0;           // fwd/dgrad: n, k (m unused); wgrad: m, n (k = the group's rows)
  int lda = 0, ldb = 0;              // padded leading dimensions, multiples of 8 elements
  float alpha = 1.0f, beta = 0.0f;
  GroupedGemmIssue* issue = nullptr;  // may be null (then bad offsets are only skipped)
  int32_t issue_site = 0;
  // An optional second term, fwd/dgrad only: C = alpha·(A·op(B) + A2·op(B2)) + beta·C with A2
  // [R, lda2], B2 [G, n, ldb2] (fwd) or [G, k2, ldb2] (dgrad), the same padding rules. k2 = 0: none.
  const bf16* a2 = nullptr;
  const bf16* b2 = nullptr;
  int k2 = 0, lda2 = 0, ldb2 = 0;
  // An optional bf16 output, fwd/dgrad with beta = 0 only: when set, C = alpha·(…) is written here
  // ([R, n], each value rounded to nearest even, pairs in 4-byte stores where n is even) and c is
  // not used. The bf16 GEMM mode's expert activations that only element-wise ops read (docs/model.md §7).
  bf16* c16 = nullptr;
};

// Rows rounded up to the padded leading dimension of a bf16 operand copy.
__host__ __device__ constexpr int64_t pad8(int64_t x) { return (x + 7) / 8 * 8; }

// ---------------------------------------------------------------- tile configuration

template <int BM, int BN, int BK, int kStages_, int kWarpsM_, int kWarpsN_, int kMinBlocks_>
struct TileConfig {
  static constexpr int kBM = BM, kBN = BN, kBK = BK, kStages = kStages_;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kBM / kWarpsM, kWarpN = kBN / kWarpsN;  // warp tile
  static constexpr int kMFrags = kWarpM / 16, kNFrags = kWarpN / 8;     // m16 × n8 MMAs per k16 step
  static constexpr int kPad = 8;                                        // bf16 elements (16 bytes) after every smem row
  static_assert(kBK % 16 == 0 && kWarpM % 16 == 0 && kWarpN % 16 == 0, "MMA and ldmatrix.x4 granularity");
  static_assert(kStages >= 2, "cp.async pipeline");
};

// The kernels' default: 128×128×64, 3 stages, 8 warps of 64×32, 2 CTAs per SM (108 KB smem each).
// Measured on H100 at the bench shapes (tools/kernel-dev/NOTES-grouped-gemm.md): up to 16% faster
// than 128×128×32 in 4 stages (half the barriers per k) on fwd/dgrad, within ±4% of 4 warps of
// 64×64 and of 128×256×64 (one CTA per SM) elsewhere.
using DefaultTiles = TileConfig<128, 128, 64, 3, 2, 4, 2>;

// One operand's shared tile: K-contiguous [kMN][kBK + pad] or MN-contiguous [kBK][kMN + pad].
template <class Cfg, int kMN, bool kKContig>
struct SmemTile {
  static constexpr int kRows = kKContig ? kMN : Cfg::kBK;  // global rows it covers
  static constexpr int kCols = kKContig ? Cfg::kBK : kMN;  // contiguous elements per row
  static constexpr int kStride = kCols + Cfg::kPad;        // elements between smem rows
  static constexpr int kElems = kRows * kStride;
  static constexpr int kChunksPerRow = kCols / 8;  // 16-byte cp.async chunks
  static constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kCols % 8 == 0 && (kStride * 2) % 16 == 0, "16-byte chunks and ldmatrix rows");
  static_assert(kChunks % Cfg::kThreads == 0, "every thread copies the same number of chunks");
};

template <class Cfg, GroupedLayout L>
struct LayoutTiles {
  static constexpr bool kAKContig = L != GroupedLayout::kWgrad;  // A: [rows][k] unless wgrad
  static constexpr bool kBKContig = L == GroupedLayout::kFwd;    // B: [n][k] only in fwd
  using A = SmemTile<Cfg, Cfg::kBM, kAKContig>;
  using B = SmemTile<Cfg, Cfg::kBN, kBKContig>;
  static constexpr int kStageElems = A::kElems + B::kElems;
  static constexpr size_t kSmemBytes = size_t{kStageElems} * Cfg::kStages * sizeof(bf16);
};

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global → shared; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// d += a·b, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------- offsets

// Rows of group g, or −1 when its bounds are bad (the group is then skipped).
__device__ __forceinline__ int group_rows(const GroupedGemmParams& p, int g, int* lo_out) {
  const int lo = __ldg(p.offsets + g), hi = __ldg(p.offsets + g + 1);
  *lo_out = lo;
  const bool ok = lo >= 0 && hi >= lo && hi <= p.rows && (g != 0 || lo == 0);
  return ok ? hi - lo : -1;
}

// One thread: records the first offset breaking 0 = offsets[0] ≤ offsets[1] ≤ … ≤ offsets[G] ≤ R
// (index, value; limit = R).
__device__ inline void report_bad_offsets(const GroupedGemmParams& p) {
  if (p.issue == nullptr) return;
  int prev = 0;
  for (int i = 0; i <= p.groups; ++i) {
    const int v = __ldg(p.offsets + i);
    const bool ok = (i == 0) ? v == 0 : (v >= prev && v <= p.rows);
    if (!ok) {
      if (atomicCAS(&p.issue->flag, 0, 1) == 0) {
        p.issue->site = p.issue_site;
        p.issue->index = i;
        p.issue->value = v;
        p.issue->limit = p.rows;
      }
      return;
    }
    prev = v;
  }
}

// One warp over groups g0 … g0+31 (lane = g − g0): *tiles = the lane's group's m-tile count
// (ceil(rows_g / kBM); 0 for a bad or missing group), *lo = its first row; returns the inclusive
// prefix of the counts over the 32 lanes (by shuffles).
template <int kBM>
__device__ __forceinline__ int m_tiles_inclusive(const GroupedGemmParams& p, int g0, int lane, int* tiles, int* lo) {
  const int g = g0 + lane;
  int rows = -1;
  *lo = 0;
  if (g < p.groups) rows = group_rows(p, g, lo);
  *tiles = rows > 0 ? (rows + kBM - 1) / kBM : 0;
  int incl = *tiles;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  return incl;
}

// One warp: the group and m-tile of m-tile number `slot` over all groups (each group has
// ceil(rows_g / kBM) of them; bad groups none): s_tile = {group or −1, first row of the group,
// m-tile within the group}. An exclusive prefix over the groups, 32 per step.
template <int kBM>
__device__ inline void find_m_tile(const GroupedGemmParams& p, int slot, int* s_tile, int lane) {
  if (lane == 0) s_tile[0] = -1;
  __syncwarp();
  int base = 0;
  for (int g0 = 0; g0 < p.groups; g0 += 32) {
    int tiles, lo;
    const int incl = m_tiles_inclusive<kBM>(p, g0, lane, &tiles, &lo);
    const int excl = incl - tiles;
    const bool mine = slot >= base + excl && slot < base + incl;
    if (__ballot_sync(0xffffffffu, mine) != 0) {  // warp-uniform
      if (mine) {
        s_tile[0] = g0 + lane;
        s_tile[1] = lo;
        s_tile[2] = slot - base - excl;
      }
      return;
    }
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
}

// ---------------------------------------------------------------- tile copies

// One stage of one operand: the global block at (row0, col0) of a row-major matrix with leading
// dimension ld into the smem tile; rows ≥ row_end and chunks starting at col ≥ col_end (a multiple
// of 8: the padded width) become zeros.
template <class Tile, int kThreads>
__device__ __forceinline__ void load_tile(bf16* smem, const bf16* src, int64_t ld, int row0, int col0, int row_end,
                                          int col_end, int tid) {
#pragma unroll
  for (int i = 0; i < Tile::kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / Tile::kChunksPerRow, c = (idx % Tile::kChunksPerRow) * 8;
    const int gr = row0 + r, gc = col0 + c;
    const bool pred = gr < row_end && gc < col_end;
    const bf16* g = pred ? src + static_cast<int64_t>(gr) * ld + gc : src;
    cp_async_16(smem_addr(smem + r * Tile::kStride + c), g, pred);
  }
}

// A fragment (16×16 at (m, kk) of op(A)) from the A tile: ldmatrix for [m][k] tiles, .trans for
// [k][m]. Register i of lane l: matrix i = (rows +8·(i&1), k +8·(i>>1)), the mma's a0..a3.
template <class Tile, bool kKContig>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const bf16* tile, int m, int kk, int lane) {
  if constexpr (kKContig) {
    const int row = m + (lane % 8) + ((lane / 8) % 2) * 8, col = kk + (lane / 16) * 8;
    ldmatrix_x4(a, smem_addr(tile + row * Tile::kStride + col));
  } else {
    const int krow = kk + (lane % 8) + (lane / 16) * 8, col = m + ((lane / 8) % 2) * 8;
    ldmatrix_x4_trans(a, smem_addr(tile + krow * Tile::kStride + col));
  }
}

// B fragments of two n8 blocks (16 columns at n, 16 k at kk): b[0], b[1] for columns n..n+7,
// b[2], b[3] for n+8..n+15. ldmatrix for [n][k] tiles, .trans for [k][n].
template <class Tile, bool kKContig>
__device__ __forceinline__ void load_b_frag(uint32_t (&b)[4], const bf16* tile, int n, int kk, int lane) {
  if constexpr (kKContig) {
    const int row = n + (lane % 8) + (lane / 16) * 8, col = kk + ((lane / 8) % 2) * 8;
    ldmatrix_x4(b, smem_addr(tile + row * Tile::kStride + col));
  } else {
    const int krow = kk + (lane % 8) + ((lane / 8) % 2) * 8, col = n + (lane / 16) * 8;
    ldmatrix_x4_trans(b, smem_addr(tile + krow * Tile::kStride + col));
  }
}

// ---------------------------------------------------------------- the kernel

template <class Cfg, GroupedLayout L>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) grouped_gemm_kernel(const GroupedGemmParams p) {
  using LT = LayoutTiles<Cfg, L>;
  using TA = typename LT::A;
  using TB = typename LT::B;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int s_tile[3];  // fwd/dgrad: group, first row of the group, m-tile within the group

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n_tiles = (p.n + kBN - 1) / kBN;

  // ---- which tile: (m0, n0) within the group's output, the group's operands
  int m0, n0, m_end, k_len;
  const bf16 *a_src, *b_src;
  int64_t c_off;  // the tile's group's first element in C (or in c16)
  if constexpr (L == GroupedLayout::kWgrad) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) report_bad_offsets(p);
    const int g = blockIdx.y;
    int lo;
    const int rows = group_rows(p, g, &lo);
    if (rows < 0) return;  // bad bounds: skipped (and reported)
    m0 = static_cast<int>(blockIdx.x) / n_tiles * kBM;
    n0 = static_cast<int>(blockIdx.x) % n_tiles * kBN;
    m_end = p.m;
    k_len = rows;  // may be 0: C[g] = beta·C[g]
    a_src = p.a + static_cast<int64_t>(lo) * p.lda;
    b_src = p.b + static_cast<int64_t>(lo) * p.ldb;
    c_off = static_cast<int64_t>(g) * p.m * p.n;
  } else {
    if (blockIdx.x == 0 && tid == 0) report_bad_offsets(p);
    const int slot = static_cast<int>(blockIdx.x) / n_tiles;  // the m-tile over all groups
    n0 = static_cast<int>(blockIdx.x) % n_tiles * kBN;
    if (warp == 0) find_m_tile<kBM>(p, slot, s_tile, lane);
    __syncthreads();
    const int g = s_tile[0];
    if (g < 0) return;  // past the last m-tile of the last group
    const int lo = s_tile[1];
    m0 = s_tile[2] * kBM;
    m_end = __ldg(p.offsets + g + 1) - lo;
    k_len = p.k;
    a_src = p.a + static_cast<int64_t>(lo) * p.lda;
    b_src = p.b + static_cast<int64_t>(g) * (L == GroupedLayout::kFwd ? p.n : p.k) * p.ldb;
    c_off = static_cast<int64_t>(lo) * p.n;
  }

  // ---- the k-loop over a kStages-deep cp.async ring
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  const auto stage_a = [&](int s) { return smem + s * LT::kStageElems; };
  const auto stage_b = [&](int s) { return smem + s * LT::kStageElems + TA::kElems; };
  const auto load_stage = [&](int s, int kt) {
    const int k0 = kt * kBK;
    if constexpr (LT::kAKContig)  // [rows][k]: rows bounded by the group, k by the padded width
      load_tile<TA, Cfg::kThreads>(stage_a(s), a_src, p.lda, m0, k0, m_end, p.lda, tid);
    else  // [k = rows of the group][m]
      load_tile<TA, Cfg::kThreads>(stage_a(s), a_src, p.lda, k0, m0, k_len, p.lda, tid);
    if constexpr (LT::kBKContig)  // [n][k]
      load_tile<TB, Cfg::kThreads>(stage_b(s), b_src, p.ldb, n0, k0, p.n, p.ldb, tid);
    else  // [k][n]
      load_tile<TB, Cfg::kThreads>(stage_b(s), b_src, p.ldb, k0, n0, k_len, p.ldb, tid);
  };

  const int warp_m0 = (warp % Cfg::kWarpsM) * Cfg::kWarpM, warp_n0 = (warp / Cfg::kWarpsM) * Cfg::kWarpN;
  float acc[Cfg::kMFrags][Cfg::kNFrags][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMFrags; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kNFrags; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int k_tiles = (k_len + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait counts uniform
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();               // ... for all threads; and stage (kt−1) % kStages is free
    const int pf = kt + kStages - 1;
    if (pf < k_tiles) load_stage(pf % kStages, pf);
    cp_async_commit();

    const bf16* ta = stage_a(kt % kStages);
    const bf16* tb = stage_b(kt % kStages);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[Cfg::kMFrags][4], bfr[Cfg::kNFrags / 2][4];
#pragma unroll
      for (int i = 0; i < Cfg::kMFrags; ++i) load_a_frag<TA, LT::kAKContig>(af[i], ta, warp_m0 + i * 16, kk, lane);
#pragma unroll
      for (int j = 0; j < Cfg::kNFrags / 2; ++j) load_b_frag<TB, LT::kBKContig>(bfr[j], tb, warp_n0 + j * 16, kk, lane);
#pragma unroll
      for (int i = 0; i < Cfg::kMFrags; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kNFrags; ++j)
          mma_bf16_16816(acc[i][j], af[i], bfr[j / 2][(j % 2) * 2], bfr[j / 2][(j % 2) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: C = alpha·acc + beta·C; accumulator e of an MMA is (row g + 8·(e/2), col 2t + e%2)
  const int ldc = p.n;
  if (p.c16 != nullptr) {           // bf16 output: pairs as bf16x2. beta ≠ 0 only from launch_grouped_gemm's
    bf16* c16_dst = p.c16 + c_off;  // second pass of a two-term call (then C is rounded twice)
    const bool pair16 = (p.n % 2) == 0 && reinterpret_cast<uintptr_t>(p.c16) % 4 == 0;
#pragma unroll
    for (int i = 0; i < Cfg::kMFrags; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + warp_m0 + i * 16 + lane / 4 + half * 8;
        if (row >= m_end) continue;
        bf16* crow = c16_dst + static_cast<int64_t>(row) * ldc;
#pragma unroll
        for (int j = 0; j < Cfg::kNFrags; ++j) {
          const int col = n0 + warp_n0 + j * 8 + (lane % 4) * 2;
          if (col >= p.n) continue;
          float v0 = p.alpha * acc[i][j][half * 2], v1 = p.alpha * acc[i][j][half * 2 + 1];
          const bool has1 = col + 1 < p.n;
          if (p.beta != 0.0f) {
            v0 += p.beta * __bfloat162float(crow[col]);
            if (has1) v1 += p.beta * __bfloat162float(crow[col + 1]);
          }
          if (pair16) {
            *reinterpret_cast<__nv_bfloat162*>(crow + col) = __floats2bfloat162_rn(v0, v1);
          } else {
            crow[col] = __float2bfloat16_rn(v0);
            if (has1) crow[col + 1] = __float2bfloat16_rn(v1);
          }
        }
      }
    return;
  }
  const bool vec2 = (p.n % 2) == 0 && reinterpret_cast<uintptr_t>(p.c) % 8 == 0;  // float2 rows
  float* c_dst = p.c + c_off;
#pragma unroll
  for (int i = 0; i < Cfg::kMFrags; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m0 + i * 16 + lane / 4 + half * 8;
      if (row >= m_end) continue;
      float* crow = c_dst + static_cast<int64_t>(row) * ldc;
#pragma unroll
      for (int j = 0; j < Cfg::kNFrags; ++j) {
        const int col = n0 + warp_n0 + j * 8 + (lane % 4) * 2;
        if (col >= p.n) continue;
        float v0 = p.alpha * acc[i][j][half * 2], v1 = p.alpha * acc[i][j][half * 2 + 1];
        if (vec2) {  // col even, n even: col + 1 < n and 8-byte aligned
          float2* c2 = reinterpret_cast<float2*>(crow + col);
          if (p.beta != 0.0f) {
            const float2 old = *c2;
            v0 += p.beta * old.x;
            v1 += p.beta * old.y;
          }
          *c2 = make_float2(v0, v1);
        } else {
          if (p.beta != 0.0f) v0 += p.beta * crow[col];
          crow[col] = v0;
          if (col + 1 < p.n) {
            if (p.beta != 0.0f) v1 += p.beta * crow[col + 1];
            crow[col + 1] = v1;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- f32 (or bf16) → bf16 operand copies
// Sources are f32 tensors, or bf16 ones (weight copies, activations already rounded) that need
// padding or a transpose: those are copied exactly (rounding a bf16 value to bf16 is the identity).

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(bf16 v) { return __bfloat162float(v); }

// dst [rows, ld] (ld = pad8(cols)) = bf16_rn(src [rows, cols]), zeros in columns cols … ld−1.
// One thread per 16-byte output chunk (8 elements); two float4 loads where an f32 src allows.
template <class Src>
__global__ void to_bf16_padded_kernel(bf16* __restrict__ dst, const Src* __restrict__ src, int64_t rows, int64_t cols,
                                      int64_t ld) {
  const int64_t chunks_per_row = ld / 8, chunks = rows * chunks_per_row;
  const bool src_vec = sizeof(Src) == 4 && (cols % 4) == 0 && (reinterpret_cast<uintptr_t>(src) % 16) == 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < chunks; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / chunks_per_row, c = (i % chunks_per_row) * 8;
    const Src* s = src + r * cols + c;
    float v[8];
    if (src_vec && c + 8 <= cols) {
      const float4 x = reinterpret_cast<const float4*>(s)[0], y = reinterpret_cast<const float4*>(s)[1];
      v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w, v[4] = y.x, v[5] = y.y, v[6] = y.z, v[7] = y.w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = c + e < cols ? as_float(s[e]) : 0.0f;
    }
    uint4 out;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
    reinterpret_cast<uint4*>(dst + r * ld)[c / 8] = out;
  }
}

template <class Src>
inline cudaError_t launch_to_bf16_padded(bf16* dst, const Src* src, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t chunks = rows * (pad8(cols) / 8);
  if (chunks == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const int64_t blocks = (chunks + kBlock - 1) / kBlock;
  const unsigned grid = static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
  to_bf16_padded_kernel<Src><<<grid, kBlock, 0, stream>>>(dst, src, rows, cols, pad8(cols));
  return cudaGetLastError();
}

// ---------------------------------------------------------------- launch

// Runs one grouped GEMM of layout L on the stream. Requires lda, ldb multiples of 8 and 16-byte
// aligned a, b (bf16 copies made by launch_to_bf16_padded); c 8-byte aligned. A second term (k2 > 0,
// fwd/dgrad) runs as a second launch that adds alpha·A2·op(B2) with beta = 1: this kernel is the
// fallback, kept simple (the TMA kernel sums both terms in one accumulator); with a bf16 output
// (c16) the first term is then rounded to bf16 before the second is added. c16 excludes wgrad.
template <class Cfg = DefaultTiles>
cudaError_t launch_grouped_gemm(const GroupedGemmParams& p, GroupedLayout layout, cudaStream_t stream) {
  if (p.k2 != 0) {
    if (layout == GroupedLayout::kWgrad || p.k2 < 0) return cudaErrorInvalidValue;
    GroupedGemmParams first = p, second = p;
    first.a2 = first.b2 = nullptr;
    first.k2 = first.lda2 = first.ldb2 = 0;
    second.a = p.a2, second.b = p.b2, second.k = p.k2, second.lda = p.lda2, second.ldb = p.ldb2, second.beta = 1.0f;
    second.a2 = second.b2 = nullptr;
    second.k2 = second.lda2 = second.ldb2 = 0;
    const cudaError_t e = launch_grouped_gemm<Cfg>(first, layout, stream);
    return e != cudaSuccess ? e : launch_grouped_gemm<Cfg>(second, layout, stream);
  }
  if (p.c16 != nullptr && layout == GroupedLayout::kWgrad) return cudaErrorInvalidValue;
  if (p.groups <= 0 || p.n <= 0 || (layout == GroupedLayout::kWgrad && p.m <= 0)) return cudaSuccess;
  const int n_tiles = (p.n + Cfg::kBN - 1) / Cfg::kBN;
  const auto launch = [&](auto kernel, size_t smem, dim3 grid) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  };
  switch (layout) {
    case GroupedLayout::kFwd:
    case GroupedLayout::kDgrad: {
      const int64_t m_slots = (int64_t{p.rows} + Cfg::kBM - 1) / Cfg::kBM + p.groups;  // ≥ Σ ceil(rows_g/kBM)
      const dim3 grid(static_cast<unsigned>(m_slots * n_tiles));
      if (layout == GroupedLayout::kFwd)
        return launch(grouped_gemm_kernel<Cfg, GroupedLayout::kFwd>, LayoutTiles<Cfg, GroupedLayout::kFwd>::kSmemBytes,
                      grid);
      return launch(grouped_gemm_kernel<Cfg, GroupedLayout::kDgrad>,
                    LayoutTiles<Cfg, GroupedLayout::kDgrad>::kSmemBytes, grid);
    }
    case GroupedLayout::kWgrad: {
      const int m_tiles = (p.m + Cfg::kBM - 1) / Cfg::kBM;
      const dim3 grid(static_cast<unsigned>(m_tiles * n_tiles), static_cast<unsigned>(p.groups));
      return launch(grouped_gemm_kernel<Cfg, GroupedLayout::kWgrad>,
                    LayoutTiles<Cfg, GroupedLayout::kWgrad>::kSmemBytes, grid);
    }
  }
  return cudaErrorInvalidValue;
}

// Dynamic shared memory of the mma.sync kernel's largest layout: the grouped ops fall back to
// cuBLAS per group where a device allows less per block (e.g. sm_86/sm_89, 99 KB).
template <class Cfg = DefaultTiles>
constexpr size_t grouped_gemm_max_smem_bytes() {
  const size_t f = LayoutTiles<Cfg, GroupedLayout::kFwd>::kSmemBytes,
               d = LayoutTiles<Cfg, GroupedLayout::kDgrad>::kSmemBytes,
               w = LayoutTiles<Cfg, GroupedLayout::kWgrad>::kSmemBytes;
  return f > d ? (f > w ? f : w) : (d > w ? d : w);
}

}  // namespace diffmoe::cuda::gg
