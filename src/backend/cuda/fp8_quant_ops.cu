// act_quant, weight_quant and weight_dequant on the GPU (op_args.h's FP8 section, docs/model.md §7), bit for
// bit the CPU's (cpu/fp8_ops.cpp; the shared arithmetic is fp8_quant.cuh). Memory-bound: each reads
// its source once and writes each copy once, with 16-byte loads and 4- or 16-byte stores.
//
// act_quant: one block of kQuantThreads per 128×128 tile of x [M, K] (grid: K-tiles × M-tiles):
//   1. rows: warp w takes rows w, w + 8, ... (kRowsPerWarp of them); lane l holds the row's columns
//      4l .. 4l + 3 (one 16-byte f32 or 8-byte bf16 load), the row tile's amax is a warp max, and the
//      lane stores its four codes at once (the warp writes the row's 128 codes contiguously), lane 0
//      the scale. For the transposed copy the lane also puts its four values in shared memory: the
//      tile in x's dtype (32 KiB for bf16, 64 KiB for f32).
//   2. columns (transposed copy only): thread t takes column t % 128 and half t / 128 of the tile's
//      rows; it reads its column from shared memory (a warp reads 32 consecutive values of a row: no
//      bank conflicts), the column's amax is the max over both halves, and it writes its half of
//      q_t's row segment as 16-byte stores of 16 codes.
// weight_quant: one block per 128×128 block of w [N, K]: the block's values stay in registers, the
// amax is a block max, the codes go to q as in step 1 and, for the transposed copy, through shared
// memory (the codes, 16 KiB) to q_t as in step 2. Blocks on the last column of scale tiles write the
// scale rows' padding (0).
// weight_dequant: one thread per element, w = e4m3(q)·s as one f32 product.
//
// Tiles at the edges, and tensors whose sizes or addresses rule out the vector accesses (row lengths
// not multiples of 4 or 16, unaligned views), take the same steps with scalar loads and byte stores;
// absent values count as 0 in a max (as if zero-padded, which changes no max of |x|) and are never
// written. The path taken does not change a bit of the result.
#include <cuda_bf16.h>
#include <fmt/format.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/fp8_quant.cuh"
#include "backend/cuda/grouped_gemm_tma.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kQuantThreads = 256;
constexpr int kQuantWarps = kQuantThreads / kWarp;  // 8
// act_quant's blocks per SM (at most 80 registers a thread): a block has no loads in flight while it quantises
// its columns (step 2), so two resident blocks left the memory idle whenever both were there.
constexpr int kQuantBlocksPerSm = 3;
constexpr int kLoadBatch = 8;                           // rows a warp loads before it quantises them (step 1)
constexpr int kRowsPerWarp = fp8::kTile / kQuantWarps;  // 16 rows of a tile per warp
constexpr int kValsPerLane = fp8::kTile / kWarp;        // 4 values of a row per lane
constexpr int kColHalves = kQuantThreads / fp8::kTile;  // 2 threads per column in step 2
constexpr int kRowsPerHalf = fp8::kTile / kColHalves;   // 64 rows each
constexpr int kCodesPerStore = 16;                      // one uint4 of codes
static_assert(kValsPerLane == kVec, "a lane's part of a row tile is one 4-value vector access (elementwise.cuh)");
static_assert(kRowsPerWarp * kQuantWarps == fp8::kTile, "the warps cover the tile's rows");
static_assert(kRowsPerWarp % kLoadBatch == 0, "whole load batches per warp");
static_assert(kColHalves == 2 && kColHalves * fp8::kTile == kQuantThreads, "two threads per column in step 2");
static_assert(kRowsPerHalf % kCodesPerStore == 0, "a half column is whole 16-code stores");

// act_quant's staged tile for the transposed copy holds x's own values (exact: bf16 stays bf16), so a bf16
// source stages 32 KiB instead of 64: more blocks per SM keep more loads in flight.
template <class In>
constexpr size_t kTileSmemBytes = sizeof(In) * fp8::kTile* fp8::kTile;
// Four values as four bf16 (v.x's in the low half of .x), rounded to nearest even: exact for bf16 values.
__device__ __forceinline__ uint2 bf16x4_bits(float4 v) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  return make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}
__device__ __forceinline__ float4 bf16x4_values(uint2 bits) {
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
// The lane's four values of a row into the staged tile (8 or 16 bytes, aligned: the column is a multiple of 4).
__device__ __forceinline__ void stage4(float* dst, float4 v) { *reinterpret_cast<float4*>(dst) = v; }
__device__ __forceinline__ void stage4(__nv_bfloat16* dst, float4 v) {
  *reinterpret_cast<uint2*>(dst) = bf16x4_bits(v);
}

struct QuantOutputs {
  uint8_t* q = nullptr;  // row-wise copy (act) / q (weights), or null
  float* scale = nullptr;
  uint8_t* q_t = nullptr;  // transposed copy, or null
  float* scale_t = nullptr;
};

template <class In>
struct ActQuantParams {
  const In* x;
  QuantOutputs out;
  int64_t m, k;
  bool ue8m0;
  bool vec_rows;  // 4-value loads of x and 4-code stores into q: K % 4 == 0 and aligned pointers
  bool vec_cols;  // 16-code stores into q_t: M % 16 == 0 and q_t 16-byte aligned
};

// The lane's four values of row `row` (columns col .. col + 3) of a [rows, cols] source: one vector
// load where `vec`, else scalar loads with absent values 0.
template <class In>
__device__ __forceinline__ float4 load_row_part(const In* src, int64_t row, int64_t col, int64_t rows, int64_t cols,
                                                bool vec) {
  if (vec) return load4(src + row * cols + col);
  float e[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (row < rows) {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (col + j < cols) e[j] = load1(src + row * cols + col + j);
  }
  return make_float4(e[0], e[1], e[2], e[3]);
}

// Stores the codes of v · r at dst[0..3] (those of columns < cols - col): one 32-bit store where `vec`.
__device__ __forceinline__ void store_codes4(uint8_t* dst, float4 v, float r, int64_t present, bool vec) {
  if (vec) {
    *reinterpret_cast<uint32_t*>(dst) = fp8::e4m3x4(v, r);
    return;
  }
  const float e[kVec] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    if (j < present) dst[j] = fp8::e4m3x1(e[j], r);
}

// Step 2 of act_quant's transposed copies: the staged tile (row r, column c at tile[r · kTile + c]; absent
// values 0) into 128×1 tiles. Thread t takes column c = t % 128 and half t / 128 of the rows; the column's amax is
// the max over both halves. Column c's codes go to dst + c · ld (row r of the tile at byte r), its scale to
// scale_t[c]; columns ≥ cols are absent. vec: 16-code stores of all 128 rows (absent rows code to 0); else byte
// stores of the rows < rows only.
template <class In>
__device__ __forceinline__ void quantise_tile_columns(const In* tile, float (*col_amax)[fp8::kTile], uint8_t* dst,
                                                      int64_t ld, float* scale_t, int64_t cols, int rows, bool vec,
                                                      bool ue8m0) {
  const int c = threadIdx.x % fp8::kTile, half = threadIdx.x / fp8::kTile, r0 = half * kRowsPerHalf;
  float amax = 0.0f;
  for (int r = r0; r < r0 + kRowsPerHalf; ++r) amax = fmaxf(amax, fabsf(load1(tile + r * fp8::kTile + c)));
  col_amax[half][c] = amax;
  __syncthreads();
  if (c >= cols) return;
  const float s = fp8::tile_scale(fmaxf(col_amax[0][c], col_amax[1][c]), ue8m0), inv = fp8::inverse_scale(s);
  if (half == 0) scale_t[c] = s;
  uint8_t* out = dst + c * ld + r0;
  const In* col = tile + r0 * fp8::kTile + c;  // col[r · kTile]: the tile's row r0 + r
  if (vec) {
#pragma unroll
    for (int r = 0; r < kRowsPerHalf; r += kCodesPerStore) {
      uint32_t w[kCodesPerStore / 4];
#pragma unroll
      for (int j = 0; j < kCodesPerStore / 4; ++j) {
        const In* e = col + (r + 4 * j) * fp8::kTile;
        w[j] = fp8::e4m3x4(
            make_float4(load1(e), load1(e + fp8::kTile), load1(e + 2 * fp8::kTile), load1(e + 3 * fp8::kTile)), inv);
      }
      *reinterpret_cast<uint4*>(out + r) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
    for (int r = 0; r < kRowsPerHalf && r0 + r < rows; ++r) out[r] = fp8::e4m3x1(load1(col + r * fp8::kTile), inv);
  }
}

// Step 1 of act_quant over one tile: rows row0 … row0 + 127 of x (those ≥ row_end absent: 0), columns k0 … k0 + 127
// (blockIdx.x's column tile). Warp w takes rows w, w + 8, ... (kRowsPerWarp of them); lane l holds the row's columns
// 4l .. 4l + 3 (one vector load where vec). kRowWise: each present row's codes into q, its scale into scale (the
// row tile's amax a warp max). kColWise: the values into the staged tile for step 2.
template <class In, bool kRowWise, bool kColWise>
__device__ __forceinline__ void quantise_tile_rows(const ActQuantParams<In>& p, int64_t row0, int64_t row_end,
                                                   int64_t k0, bool vec, In* tile) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int c0 = lane * kValsPerLane;  // the lane's first column in the tile
  // The loads of a batch of rows first (kLoadBatch in flight per lane), then their codes: the stores could alias x
  // for all the compiler knows, so it would not hoist a load past them, and one load in flight per warp left the
  // memory mostly idle. Batches of 8 keep the kernel within kQuantBlocksPerSm's registers.
  for (int b = 0; b < kRowsPerWarp; b += kLoadBatch) {
    float4 v[kLoadBatch];
#pragma unroll
    for (int i = 0; i < kLoadBatch; ++i)
      v[i] = load_row_part(p.x, row0 + warp + (b + i) * kQuantWarps, k0 + c0, row_end, p.k, vec);
#pragma unroll
    for (int i = 0; i < kLoadBatch; ++i) {
      const int r = warp + (b + i) * kQuantWarps;
      const int64_t m = row0 + r;
      if (kRowWise && m < row_end) {  // warp-uniform: every lane takes part in the warp max
        const float s = fp8::tile_scale(warp_max(fp8::abs_max4(v[i])), p.ue8m0);
        store_codes4(p.out.q + m * p.k + k0 + c0, v[i], fp8::inverse_scale(s), p.k - (k0 + c0), vec);
        if (lane == 0) p.out.scale[int64_t{blockIdx.x} * p.m + m] = s;
      }
      if (kColWise) stage4(tile + r * fp8::kTile + c0, v[i]);
    }
  }
}

template <class In, bool kRowWise, bool kColWise>
__global__ void __launch_bounds__(kQuantThreads, kQuantBlocksPerSm) act_quant_kernel(ActQuantParams<In> p) {
  extern __shared__ __align__(16) unsigned char act_quant_smem[];  // In [kTile][kTile] (kColWise only)
  __shared__ float col_amax[kColHalves][fp8::kTile];
  In* tile = reinterpret_cast<In*>(act_quant_smem);
  const int64_t m0 = int64_t{blockIdx.y} * fp8::kTile, k0 = int64_t{blockIdx.x} * fp8::kTile;
  const bool full = m0 + fp8::kTile <= p.m && k0 + fp8::kTile <= p.k;

  // 1. rows
  quantise_tile_rows<In, kRowWise, kColWise>(p, m0, p.m, k0, full && p.vec_rows, tile);
  if (!kColWise) return;
  __syncthreads();

  // 2. columns: q_t[k0 + c, m0 ...] from the tile's column c
  quantise_tile_columns(tile, col_amax, p.out.q_t + k0 * p.m + m0, p.m, p.out.scale_t + int64_t{blockIdx.y} * p.k + k0,
                        p.k - k0, static_cast<int>(min(int64_t{fp8::kTile}, p.m - m0)), full && p.vec_cols, p.ue8m0);
}

// act_quant's grouped transposed copy (ActQuantArgs::offsets): one block of kQuantThreads per (column tile of x, tile
// slot t), act_quant's two steps (the row-wise copy of the slot's rows with kRowWise). The slot's group comes from the
// prefix of the groups' tile counts in shared memory (after the staged tile), built as the grouped GEMMs build theirs
// (grouped_gemm_tma.cuh build_m_tile_prefix: a group with bad bounds gets no tile, and block (0, 0) records the first
// bad offset), so the slots here are the ones fp8_grouped_gemm_wgrad reads. The slot's rows (at most 128, none past the
// group's end) are staged once; rows past the group's end are 0 in the tile, so every column writes all 128 codes of
// its slot (zeros as padding) with 16-byte stores into its row of q_t [k, width].
template <class In, bool kRowWise>
__global__ void __launch_bounds__(kQuantThreads, kQuantBlocksPerSm)
    act_quant_grouped_t_kernel(ActQuantParams<In> p, const gg::GroupedGemmParams sched, int64_t width) {
  // In [kTile][kTile], then the prefix: int [G + 1], tile slots before each group
  extern __shared__ __align__(16) unsigned char act_quant_grouped_smem[];
  __shared__ float col_amax[kColHalves][fp8::kTile];
  In* tile = reinterpret_cast<In*>(act_quant_grouped_smem);
  int* s_prefix = reinterpret_cast<int*>(act_quant_grouped_smem + kTileSmemBytes<In>);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (warp == 0) gg::build_m_tile_prefix<fp8::kTile>(sched, s_prefix, lane);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) gg::report_bad_offsets(sched);
  __syncthreads();
  const int t = blockIdx.y;
  if (t >= s_prefix[sched.groups]) return;  // a slot past the last group's (block-uniform)
  int lo = 0, hi = sched.groups;            // the last g with s_prefix[g] ≤ t
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (s_prefix[mid] <= t) lo = mid;
    else hi = mid;
  }
  const int64_t r0 = __ldg(sched.offsets + lo) + int64_t{t - s_prefix[lo]} * fp8::kTile;
  const int64_t row_end = min(r0 + fp8::kTile, int64_t{__ldg(sched.offsets + lo + 1)});
  const int64_t k0 = int64_t{blockIdx.x} * fp8::kTile;
  const bool vec = p.vec_rows && row_end - r0 == fp8::kTile && k0 + fp8::kTile <= p.k;
  quantise_tile_rows<In, kRowWise, /*kColWise=*/true>(p, r0, row_end, k0, vec, tile);
  __syncthreads();
  quantise_tile_columns(tile, col_amax, p.out.q_t + k0 * width + int64_t{t} * fp8::kTile, width,
                        p.out.scale_t + int64_t{t} * p.k + k0, p.k - k0, fp8::kTile, /*vec=*/true, p.ue8m0);
}

template <class In>
struct WeightQuantParams {
  const In* w;
  QuantOutputs out;
  int64_t n, k;
  int64_t scale_ld, scale_t_ld;  // the scale rows' padded lengths (op_args.h fp8_block_scale_cols)
  bool ue8m0, vec_rows, vec_cols;
};

__device__ __forceinline__ float bf16_rounded(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// The block's values between the amax and the codes: as bf16 where they are bf16 values (a bf16 source, or
// rounded to bf16 first), 8 bytes per lane and row instead of 16, so that four blocks fit an SM's registers.
template <bool kAsBf16>
struct HeldRow;
template <>
struct HeldRow<true> {
  uint2 bits;
  __device__ __forceinline__ void hold(float4 v) { bits = bf16x4_bits(v); }
  __device__ __forceinline__ float4 value() const { return bf16x4_values(bits); }
};
template <>
struct HeldRow<false> {
  float4 v4;
  __device__ __forceinline__ void hold(float4 v) { v4 = v; }
  __device__ __forceinline__ float4 value() const { return v4; }
};
// Blocks per SM the register budget is set for: four (64 registers) for f32 weights rounded to bf16 and held as bf16,
// the fp8 step's case; no bound otherwise (at 64 or 80 registers ptxas spilled the bf16-source kernel).
template <class In, bool kBf16Round>
constexpr int weight_quant_blocks_per_sm() {
  return std::is_same_v<In, float> && kBf16Round ? 4 : 1;
}

// One block per 128×128 block; blockIdx.z: the matrix of a stack [G, N, K] (each quantised on its own). kBf16Round:
// each value rounded to bf16 first (WeightQuantArgs::bf16_source).
template <class In, bool kBf16Round>
__global__ void __launch_bounds__(kQuantThreads, weight_quant_blocks_per_sm<In, kBf16Round>())
    weight_quant_kernel(WeightQuantParams<In> p) {
  constexpr bool kAsBf16 = std::is_same_v<In, __nv_bfloat16> || kBf16Round;
  __shared__ __align__(16) uint8_t codes[fp8::kTile][fp8::kTile];  // the block's codes, for q_t
  __shared__ float reduce[kQuantWarps];
  if (blockIdx.z > 0) {  // matrix g of a stack: every pointer moves to its own part
    const int64_t g = blockIdx.z, elems = g * p.n * p.k;
    p.w += elems;
    if (p.out.q != nullptr) {
      p.out.q += elems;
      p.out.scale += g * gridDim.y * p.scale_ld;
    }
    if (p.out.q_t != nullptr) {
      p.out.q_t += elems;
      p.out.scale_t += g * gridDim.x * p.scale_t_ld;
    }
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n0 = int64_t{blockIdx.y} * fp8::kTile, k0 = int64_t{blockIdx.x} * fp8::kTile;
  const bool full = n0 + fp8::kTile <= p.n && k0 + fp8::kTile <= p.k;
  const int c0 = lane * kValsPerLane;
  const bool vec = full && p.vec_rows;

  HeldRow<kAsBf16> v[kRowsPerWarp];
  float amax = 0.0f;
  // Loads in batches of kLoadBatch rows (the registers of one batch in flight, then the batch is held).
#pragma unroll
  for (int b = 0; b < kRowsPerWarp; b += kLoadBatch) {
    float4 x[kLoadBatch];
#pragma unroll
    for (int i = 0; i < kLoadBatch; ++i)
      x[i] = load_row_part(p.w, n0 + warp + (b + i) * kQuantWarps, k0 + c0, p.n, p.k, vec);
#pragma unroll
    for (int i = 0; i < kLoadBatch; ++i) {
      if (kBf16Round)
        x[i] = make_float4(bf16_rounded(x[i].x), bf16_rounded(x[i].y), bf16_rounded(x[i].z), bf16_rounded(x[i].w));
      amax = fmaxf(amax, fp8::abs_max4(x[i]));
      v[b + i].hold(x[i]);
    }
  }
  const float s = fp8::tile_scale(block_max(amax, reduce), p.ue8m0), inv = fp8::inverse_scale(s);
  const int64_t nb = blockIdx.y, kb = blockIdx.x;
  if (threadIdx.x == 0) {
    if (p.out.q != nullptr) p.out.scale[nb * p.scale_ld + kb] = s;
    if (p.out.q_t != nullptr) p.out.scale_t[kb * p.scale_t_ld + nb] = s;
  }
  // Padding of the scale rows (0): by the blocks of the last tile column (scale) or row (scale_t).
  if (p.out.q != nullptr && kb == gridDim.x - 1 && kb + 1 + threadIdx.x < p.scale_ld)
    p.out.scale[nb * p.scale_ld + kb + 1 + threadIdx.x] = 0.0f;
  if (p.out.q_t != nullptr && nb == gridDim.y - 1 && nb + 1 + threadIdx.x < p.scale_t_ld)
    p.out.scale_t[kb * p.scale_t_ld + nb + 1 + threadIdx.x] = 0.0f;

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp + i * kQuantWarps;
    const int64_t n = n0 + r;
    const float4 x = v[i].value();
    if (p.out.q != nullptr && n < p.n) store_codes4(p.out.q + n * p.k + k0 + c0, x, inv, p.k - (k0 + c0), vec);
    if (p.out.q_t != nullptr) *reinterpret_cast<uint32_t*>(&codes[r][c0]) = fp8::e4m3x4(x, inv);
  }
  if (p.out.q_t == nullptr) return;
  __syncthreads();
  const int c = threadIdx.x % fp8::kTile, half = threadIdx.x / fp8::kTile, r0 = half * kRowsPerHalf;
  const int64_t k = k0 + c;
  if (k >= p.k) return;
  uint8_t* dst = p.out.q_t + k * p.n + n0 + r0;  // q_t[k, n0 + r0 ...] = codes[r0 ...][c]
  if (full && p.vec_cols) {
#pragma unroll
    for (int r = 0; r < kRowsPerHalf; r += kCodesPerStore) {
      uint32_t w[kCodesPerStore / 4];
#pragma unroll
      for (int j = 0; j < kCodesPerStore / 4; ++j) {
        const int rr = r0 + r + 4 * j;
        w[j] = uint32_t{codes[rr][c]} | uint32_t{codes[rr + 1][c]} << 8 | uint32_t{codes[rr + 2][c]} << 16 |
               uint32_t{codes[rr + 3][c]} << 24;
      }
      *reinterpret_cast<uint4*>(dst + r) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
    for (int r = 0; r < kRowsPerHalf && n0 + r0 + r < p.n; ++r) dst[r] = codes[r0 + r][c];
  }
}

template <class Out>
__global__ void weight_dequant_kernel(Out* w, const uint8_t* q, const float* scale, int64_t n, int64_t k,
                                      int64_t scale_ld) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * k; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / k, col = i % k;
    const float s = scale[(row / fp8::kTile) * scale_ld + col / fp8::kTile];
    store_as(w + i, __fmul_rn(fp8::e4m3_value(q[i]), s));
  }
}

// The grouped transposed copy's dynamic shared memory: the staged tile and the prefix of G groups.
template <class In>
constexpr size_t grouped_t_smem_bytes(int64_t groups) {
  return kTileSmemBytes<In> + sizeof(int) * (static_cast<size_t>(groups) + 1);
}
// The most dynamic shared memory a transposed copy of x (In) asks for: the grouped kernel's with the largest prefix.
template <class In>
constexpr size_t transposed_smem_bytes(bool grouped) {
  return grouped ? grouped_t_smem_bytes<In>(gg::kTmaMaxGroups) : kTileSmemBytes<In>;
}
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // a block's dynamic shared memory without an opt-in

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The grid of 128×128 tiles of a [rows, cols] source: x = column tiles, y = row tiles.
dim3 tile_grid(int64_t rows, int64_t cols, std::string_view op) {
  DIFFMOE_CHECK(fp8_tiles(rows) <= 65535 && fp8_tiles(cols) <= INT32_MAX,
                "[{}] {} × {} has more 128-row tiles than one launch covers (65535)", op, rows, cols);
  return dim3(static_cast<unsigned>(fp8_tiles(cols)), static_cast<unsigned>(fp8_tiles(rows)));
}

template <class In, bool kRowWise, bool kColWise>
void launch_act_quant(const ActQuantParams<In>& p, cudaStream_t s) {
  const auto kernel = act_quant_kernel<In, kRowWise, kColWise>;
  const size_t smem = kColWise ? kTileSmemBytes<In> : 0;
  if (smem > kDefaultSmemBytes) {
    // Above the default 48 KiB: opt in once per kernel (the device allows it: checked by the caller).
    static const bool opted_in = [&] {
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      return true;
    }();
    (void)opted_in;
  }
  kernel<<<tile_grid(p.m, p.k, "act_quant"), kQuantThreads, smem, s>>>(p);
  CUDA_CHECK_LAUNCH("act_quant");
}

// act_quant's kernel parameters from its arguments; vec_cols as the caller decides it (ActQuantParams).
template <class In>
ActQuantParams<In> act_quant_params(const ActQuantArgs& a, const Fp8QuantDims& d, bool vec_cols) {
  const In* x = static_cast<const In*>(a.x.data);
  return ActQuantParams<In>{
      .x = x,
      .out = {.q = static_cast<uint8_t*>(a.q.data),
              .scale = static_cast<float*>(a.scale.data),
              .q_t = static_cast<uint8_t*>(a.q_t.data),
              .scale_t = static_cast<float*>(a.scale_t.data)},
      .m = d.rows,
      .k = d.cols,
      .ue8m0 = a.ue8m0,
      .vec_rows = d.cols % kVec == 0 && vec_aligned(x) && (!d.row_wise || aligned(a.q.data, kVec)),
      .vec_cols = vec_cols};
}

template <class In, bool kRowWise>
void launch_act_quant_grouped(const ActQuantParams<In>& p, const gg::GroupedGemmParams& sched, int64_t width,
                              int64_t slots, cudaStream_t s) {
  const auto kernel = act_quant_grouped_t_kernel<In, kRowWise>;
  static const bool opted_in = [&] {  // the tile and the largest prefix, above the default 48 KiB
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(grouped_t_smem_bytes<In>(gg::kTmaMaxGroups))));
    return true;
  }();
  (void)opted_in;
  const dim3 grid(static_cast<unsigned>(fp8_tiles(p.k)), static_cast<unsigned>(slots));
  kernel<<<grid, kQuantThreads, grouped_t_smem_bytes<In>(sched.groups), s>>>(p, sched, width);
  CUDA_CHECK_LAUNCH("act_quant (grouped)");
}

template <class In>
void act_quant_grouped_as(CudaBackend& be, const ActQuantArgs& a, const Fp8QuantDims& d, cudaStream_t s) {
  const int64_t slots = fp8_group_tiles(d.rows, d.groups);
  DIFFMOE_CHECK(slots <= 65535 && d.groups <= gg::kTmaMaxGroups && d.rows <= INT32_MAX,
                "[act_quant] {} rows in {} groups: more tile slots (65535), groups ({}) or rows than one launch covers",
                d.rows, d.groups, gg::kTmaMaxGroups);
  DIFFMOE_CHECK(reinterpret_cast<uintptr_t>(a.q_t.data) % kCodesPerStore == 0,
                "[act_quant] the grouped q_t {} must start 16-byte aligned (its rows are written 16 codes at a time)",
                a.q_t.describe());
  const gg::GroupedGemmParams sched{.offsets = i32(a.offsets),
                                    .rows = static_cast<int>(d.rows),
                                    .groups = static_cast<int>(d.groups),
                                    .issue = reinterpret_cast<gg::GroupedGemmIssue*>(be.issue()),
                                    .issue_site = static_cast<int32_t>(IssueSite::kActQuantOffsets)};
  const ActQuantParams<In> p = act_quant_params<In>(a, d, /*vec_cols=*/true);  // q_t checked above, rows 128·slots
  if (d.row_wise) return launch_act_quant_grouped<In, true>(p, sched, a.q_t.dim(1), slots, s);
  launch_act_quant_grouped<In, false>(p, sched, a.q_t.dim(1), slots, s);
}

template <class In>
void act_quant_as(const ActQuantArgs& a, const Fp8QuantDims& d, cudaStream_t s) {
  const ActQuantParams<In> p =
      act_quant_params<In>(a, d, d.rows % kCodesPerStore == 0 && (!d.col_wise || aligned(a.q_t.data, kCodesPerStore)));
  if (d.row_wise && d.col_wise) return launch_act_quant<In, true, true>(p, s);
  if (d.row_wise) return launch_act_quant<In, true, false>(p, s);
  launch_act_quant<In, false, true>(p, s);
}

template <class In>
void weight_quant_as(const WeightQuantArgs& a, const Fp8QuantDims& d, cudaStream_t s) {
  const In* w = static_cast<const In*>(a.w.data);
  WeightQuantParams<In> p{
      .w = w,
      .out = {.q = static_cast<uint8_t*>(a.q.data),
              .scale = static_cast<float*>(a.scale.data),
              .q_t = static_cast<uint8_t*>(a.q_t.data),
              .scale_t = static_cast<float*>(a.scale_t.data)},
      .n = d.rows,
      .k = d.cols,
      .scale_ld = fp8_block_scale_cols(d.cols),
      .scale_t_ld = fp8_block_scale_cols(d.rows),
      .ue8m0 = a.ue8m0,
      .vec_rows = d.cols % kVec == 0 && vec_aligned(w) && (!d.row_wise || aligned(a.q.data, kVec)),
      .vec_cols = d.rows % kCodesPerStore == 0 && (!d.col_wise || aligned(a.q_t.data, kCodesPerStore))};
  dim3 grid = tile_grid(d.rows, d.cols, "weight_quant");
  DIFFMOE_CHECK(d.groups <= 65535, "[weight_quant] a stack of {} matrices exceeds one launch's grid.z (65535)",
                d.groups);
  grid.z = static_cast<unsigned>(d.groups);
  if (a.bf16_source) weight_quant_kernel<In, true><<<grid, kQuantThreads, 0, s>>>(p);
  else weight_quant_kernel<In, false><<<grid, kQuantThreads, 0, s>>>(p);
  CUDA_CHECK_LAUNCH("weight_quant");
}

}  // namespace

void CudaBackend::act_quant(Context ctx, const ActQuantArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "act_quant");
  const Fp8QuantDims d = validate_act_quant(a, Device::kCUDA);
  if (d.rows == 0 || d.cols == 0) return;
  const DetailScope detail(*this, stream(ctx), [&] {
    return fmt::format("act_quant {}x{} {}{}{}", d.rows, d.cols, dtype_name(a.x.dtype), d.row_wise ? " rows" : "",
                       d.grouped ? " grouped-t" : (d.col_wise ? " t" : ""));
  });
  const size_t smem = (a.x.dtype == DType::kBF16 ? transposed_smem_bytes<__nv_bfloat16>(d.grouped)
                                                 : transposed_smem_bytes<float>(d.grouped)) +
                      sizeof(float) * kColHalves * fp8::kTile;
  DIFFMOE_CHECK(
      !d.col_wise || max_shared_bytes() >= smem,
      "[act_quant] the transposed copy stages a 128×128 tile of x (and, grouped, the groups' tile prefix) in {} "
      "bytes of shared memory; this device allows {} per block",
      smem, max_shared_bytes());
  if (d.grouped) {
    if (a.x.dtype == DType::kBF16) return act_quant_grouped_as<__nv_bfloat16>(*this, a, d, stream(ctx));
    return act_quant_grouped_as<float>(*this, a, d, stream(ctx));
  }
  if (a.x.dtype == DType::kBF16) return act_quant_as<__nv_bfloat16>(a, d, stream(ctx));
  act_quant_as<float>(a, d, stream(ctx));
}

void CudaBackend::weight_quant(Context ctx, const WeightQuantArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "weight_quant");
  const Fp8QuantDims d = validate_weight_quant(a, Device::kCUDA);
  if (d.rows == 0 || d.cols == 0 || d.groups == 0) return;
  const DetailScope detail(*this, stream(ctx), [&] {
    return fmt::format("weight_quant {}x{}x{} {}{}", d.groups, d.rows, d.cols, dtype_name(a.w.dtype),
                       d.col_wise ? " t" : "");
  });
  if (a.w.dtype == DType::kBF16) return weight_quant_as<__nv_bfloat16>(a, d, stream(ctx));
  weight_quant_as<float>(a, d, stream(ctx));
}

void CudaBackend::weight_dequant(Context ctx, const WeightDequantArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "weight_dequant");
  const Fp8QuantDims d = validate_weight_dequant(a, Device::kCUDA);
  const int64_t total = d.rows * d.cols;
  if (total == 0) return;
  const auto* q = static_cast<const uint8_t*>(a.q.data);
  const auto* scale = static_cast<const float*>(a.scale.data);
  const int64_t ld = fp8_block_scale_cols(d.cols);
  const cudaStream_t s = stream(ctx);
  if (a.w.dtype == DType::kBF16) {
    weight_dequant_kernel<<<grid_for(total), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(a.w.data), q, scale, d.rows,
                                                               d.cols, ld);
  } else {
    weight_dequant_kernel<<<grid_for(total), kThreads, 0, s>>>(f32(a.w), q, scale, d.rows, d.cols, ld);
  }
  CUDA_CHECK_LAUNCH("weight_dequant");
}

}  // namespace diffmoe
