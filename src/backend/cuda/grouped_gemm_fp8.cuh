// FP8 grouped GEMM for the routed experts on Hopper (sm_90a): fp8_grouped_gemm (op_args.h),
//   C[rows_g] = Â[rows_g]·B̂[g]ᵀ (+ Â2[rows_g]·B̂2[g]ᵀ)
//   A [R, k] e4m3 with 1×128 tiles (a_scale [ceil(k/128), R]), B [G, n, k] e4m3 with 128×128 blocks
//   (b_scale [G, ceil(n/128), ld]); C [R, n] f32 or bf16, written once.
// The bf16 TMA kernel's structure (grouped_gemm_tma.cuh, whose PTX wrappers, device-side schedule and
// staged epilogue it reuses: a producer warp issuing TMA copies into a ring, two consumer
// warpgroups on wgmma, persistent CTAs, no host sync) with the FP8 recipe's accumulation
// (docs/derivations.md §6.3, after DeepSeek-V3 §3.3.2 and DeepGEMM):
// - A k-tile is 128 e4m3 = 128 bytes: one 128-byte swizzle row, one scale tile of A and one scale
//   block of B. Its 4 wgmma.m64n128k32 write a fresh partial sum (the first with scale-d = 0), and
//   the consumer, once they are done, promotes it: acc += partial · (sa[row] · sb) in f32 FMAs. The
//   tensor cores' own FP8 accumulation, which keeps fewer bits than f32, never sums more than 128
//   products, and every k-tile gets the exact scales of its tiles.
// - Tile 128×128×128. A partial sum needs 64 registers beside the accumulator's 64 (m64n128).
//   6-stage ring of 32 KB (A box 128 rows × 128 B, B box 128 n × 128 B).
// - Two partial sums per consumer, used in turn: the MMAs of k-tile kt + 1 are issued before the
//   consumer waits for kt's (wait_group 1), so the tensor cores work through kt + 1 while kt's sum is
//   promoted. With one partial sum (wait_group 0 on every k-tile) each warpgroup left the tensor
//   cores idle for an MMA's latency per k-tile; two made the bench shapes' calls 4-10% faster (H100),
//   so that latency is a small part of why the kernel runs at about a third of the FP8 peak.
// - Registers: 64 accumulators + 2 × 64 partial sums do not fit the 168 a thread of a 384-thread CTA
//   gets; the producer warpgroup gives its registers to the consumers (setmaxnreg: 24 / 240).
// - The scales of a k-tile are read from global memory (the A tile's 128 are 512 contiguous bytes)
//   before the wait for its MMAs, so their latency hides behind them.
// - Rows of an m-tile past its group's end belong to the next group (TMA reads all R rows): their
//   sums land in rows the epilogue does not write. Rows ≥ R and k ≥ k come in as zeros.
// - Two terms: the producer issues the first term's k-tiles, then the second's, into the same
//   ring; the consumers switch scale tensors at kt1. One launch writes C once.
//
// The weight gradient (fp8_grouped_gemm_wgrad, grouped_gemm_fp8_wgrad_kernel): C[g] = Â_g·B̂_gᵀ + beta·C[g]
// over the group's rows, A = dy's and B = x's grouped transposed copies (act_quant with offsets: [M or N,
// 128·T], K-major along the rows, each group's rows in whole 128-row tile slots, zeros past its end).
// Tiles (g, m-tile, n-tile) of 128×128, k-tiles = the group's slots. Here both scales vary along the
// output: A's per row m, B's per column n (128×1 tiles), so the producer also copies the k-tile's
// 128 + 128 scales into the stage (cp.async.bulk, counted by the same barrier) and the promotion
// multiplies each partial sum by sa[row]·sb[col]. Σ C² per consumer warp as the bf16 wgrad kernel. One partial sum
// per consumer (wait_group 0 per k-tile): with two, its per-column scales pushed it past 240 registers, and the
// spilling kernel ran 11% slower on the bench shapes (H100).
// Includes only CUDA headers.
#pragma once
#include "grouped_gemm_tma.cuh"

namespace diffmoe::cuda::gg {

struct Fp8TmaTiles {
  static constexpr int kBM = 128, kBN = 128, kBK = 128, kStages = 6;  // kBK in e4m3 = bytes
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
  static constexpr int kScaleTile = 128;  // op_args.h kFp8Tile: a k-tile is one scale tile / block
  static constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK, kStageBytes = kABytes + kBBytes;
  static constexpr int kHalfBytes = 64 * kBK;  // a consumer's m64 rows of the A stage
  static constexpr int kStepK32 = 32;          // one wgmma k32 step along a K-major swizzled row
  static constexpr int kAcc = 64;              // f32 accumulators per thread of an m64n128 block
  // setmaxnreg: the producer warpgroup keeps 24 registers a thread, each consumer thread gets 240
  // (accumulators + two partial sums = 192, the rest addresses and scales; at 232 ptxas spilled).
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536, "the SM's register file");
  static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0, "setmaxnreg takes multiples of 8");
  static constexpr int kEpiRows = 64, kEpiRowBytes = 128;
  static constexpr int kEpiBufBytes = kEpiRows * kEpiRowBytes, kEpiBytes = kEpiBufBytes * kConsumers;
  static constexpr int kRingBytes = kStageBytes * kStages;
  static constexpr size_t kTileSmemBytes = size_t{kRingBytes} + kEpiBytes + 1024;  // + slack to align the ring
  static_assert(kBK == kScaleTile && kBN == kScaleTile, "a k-tile has one A scale per row and one B block scale");
  static_assert(kBK == 128, "a K-major tile row is one 128-byte swizzle row");
  static_assert(kBM == 64 * kConsumers && 2 * kAcc == kBN, "each consumer warpgroup owns an m64n128 block");
};
constexpr size_t fp8_tma_dynamic_smem_bytes(int groups) {
  return Fp8TmaTiles::kTileSmemBytes + sizeof(int) * (static_cast<size_t>(groups) + 1);
}
static_assert(fp8_tma_dynamic_smem_bytes(kTmaMaxGroups) + kTmaStaticSmemBytes <= kTmaSmemOptin,
              "ring + epilogue staging + prefix exceed an sm_90 block's shared memory");

struct Fp8GroupedParams {
  // The schedule's fields: offsets, rows (R), groups, n, k, k2, issue; c (f32) or c16 (bf16) is
  // the output. Its a, b, a2, b2 stay null: the kernel reads the operands through tensor maps.
  GroupedGemmParams sched;
  const uint8_t* a = nullptr;  // [R, k]      (the host encodes the maps from these)
  const uint8_t* b = nullptr;  // [G, n, k]
  const uint8_t* a2 = nullptr;
  const uint8_t* b2 = nullptr;
  const float* a_scale = nullptr;  // [ceil(k/128), R]
  const float* b_scale = nullptr;  // [G, ceil(n/128), b_scale_ld]
  const float* a2_scale = nullptr;
  const float* b2_scale = nullptr;
  int b_scale_ld = 0, b2_scale_ld = 0;
};

// ---------------------------------------------------------------- PTX wrapper (sm_90a)

// d[64] (+)= A·B for one m64n128k32 step (e4m3 in, f32 accumulate), both operands K-major in
// 128B-swizzled smem given by descriptors (FP8 wgmma takes no transposed operand). accumulate = 0
// starts the sum (d = A·B): the first step of each k-tile's partial sum.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                      int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
      "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// Hands registers between warpgroups (sm_90a): the whole warpgroup executes it, the new count is per thread.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// The 4 wgmma.m64n128k32 of one 128-wide k-tile into `part` (a fresh sum: the first with scale-d 0), committed as one
// group. The caller has waited for the stage.
__device__ __forceinline__ void fp8_ktile_mma(float (&part)[64], uint32_t a_tile, uint32_t b_tile) {
  fence_operands(part);
  wgmma_fence();
  using Cfg = Fp8TmaTiles;
#pragma unroll
  for (int kk = 0; kk < Cfg::kBK / Cfg::kStepK32; ++kk)
    wgmma_m64n128k32_e4m3(part, sw128_desc(a_tile + kk * Cfg::kStepK32), sw128_desc(b_tile + kk * Cfg::kStepK32),
                          kk > 0);
  wgmma_commit();
  fence_operands(part);
}

// ---------------------------------------------------------------- the kernel

template <bool kTwoTerms>
__global__ void __launch_bounds__(Fp8TmaTiles::kThreads, 1)
    grouped_gemm_fp8_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                            const __grid_constant__ CUtensorMap map_a2, const __grid_constant__ CUtensorMap map_b2,
                            const Fp8GroupedParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Fp8TmaTiles;
  constexpr GroupedLayout kL = GroupedLayout::kFwd;  // both operands K-major: the fwd schedule
  constexpr int kStages = Cfg::kStages, kBK = Cfg::kBK;
  extern __shared__ __align__(128) unsigned char fp8_smem_raw[];  // aligned to 1024 below
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  const GroupedGemmParams& sp = p.sched;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = tid / 128;

  const uint32_t raw = smem_addr(fp8_smem_raw);
  const uint32_t tiles = (raw + 1023u) & ~1023u;  // swizzle atoms are 1024-byte aligned
  const uint32_t epi_bufs = tiles + Cfg::kRingBytes;
  int* s_prefix = reinterpret_cast<int*>(fp8_smem_raw + (tiles - raw) + Cfg::kRingBytes + Cfg::kEpiBytes);
  const auto stage_a = [&](int s) { return tiles + s * Cfg::kStageBytes; };
  const auto stage_b = [&](int s) { return tiles + s * Cfg::kStageBytes + Cfg::kABytes; };
  const auto full = [&](int s) { return smem_addr(&full_bar[s]); };
  const auto empty = [&](int s) { return smem_addr(&empty_bar[s]); };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);                     // the producer's arrive (+ the TMA bytes)
      mbar_init(empty(s), Cfg::kConsumers * 4);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  if (blockIdx.x == 0 && tid == 0) report_bad_offsets(sp);
  if (warp == 0) build_m_tile_prefix<Cfg::kBM>(sp, s_prefix, lane);
  __syncthreads();

  const int kt1 = (sp.k + kBK - 1) / kBK;  // the first term's k-tiles; the second's follow
  if (wg == 0) {
    // ---- producer: one thread issues every TMA copy
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (warp != 0 || lane != 0) return;
    int it = 0;
    TmaTile ti;
    for (int t = blockIdx.x; tma_tile_at<kL, kTwoTerms, Cfg>(sp, s_prefix, t, ti); t += gridDim.x) {
      for (int kt = 0; kt < ti.k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        mbar_wait(empty(s), ((it / kStages) & 1) ^ 1);  // a fresh barrier passes parity 1 at once
        mbar_arrive_expect_tx(full(s), Cfg::kStageBytes);
        const bool second = kTwoTerms && kt >= kt1;
        const int k0 = (second ? kt - kt1 : kt) * kBK;
        tma_load_2d(stage_a(s), second ? &map_a2 : &map_a, full(s), k0, ti.a_row);
        tma_load_3d(stage_b(s), second ? &map_b2 : &map_b, full(s), k0, ti.n0, ti.g);
      }
    }
    return;
  }

  // ---- consumers: warpgroup cw computes rows [64·cw, 64·cw + 64) of each tile
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int cw = wg - 1;
  const int n_blocks = (sp.n + Cfg::kScaleTile - 1) / Cfg::kScaleTile;
  float acc[Cfg::kAcc], part0[Cfg::kAcc], part1[Cfg::kAcc];
#pragma unroll
  for (int e = 0; e < Cfg::kAcc; ++e)
    part0[e] = part1[e] = 0.0f;  // defined before the first MMA (scale-d 0) reads them
  int it = 0;
  TmaTile ti;
  for (int t = blockIdx.x; tma_tile_at<kL, kTwoTerms, Cfg>(sp, s_prefix, t, ti); t += gridDim.x) {
#pragma unroll
    for (int e = 0; e < Cfg::kAcc; ++e) acc[e] = 0.0f;
    // The thread's two rows of the tile (accumulator layout: row 16·warp + lane/4, + 8).
    const int row_lo = ti.a_row + cw * 64 + (warp % 4) * 16 + lane / 4, row_hi = row_lo + 8;
    const int64_t b_block = int64_t{ti.g} * n_blocks + ti.n0 / Cfg::kScaleTile;
    const int k_tiles = ti.k_tiles;
    // K-tile kt (ring position it + kt): its MMAs into `part` once its stage is in.
    const auto issue = [&](float(&part)[Cfg::kAcc], int kt) {
      const int s = (it + kt) % kStages;
      mbar_wait(full(s), ((it + kt) / kStages) & 1);
      fp8_ktile_mma(part, stage_a(s) + cw * Cfg::kHalfBytes, stage_b(s));
    };
    // K-tile kt's sum in `part`, once its MMAs are done (the later k-tile's, if issued, may still run):
    // its stage is released and acc += part · (sa[row] · sb).
    const auto promote = [&](float(&part)[Cfg::kAcc], int kt, bool later_issued) {
      const bool second = kTwoTerms && kt >= kt1;
      const int kb = second ? kt - kt1 : kt;
      const float* sa = (second ? p.a2_scale : p.a_scale) + int64_t{kb} * sp.rows;
      const float sb =
          __ldg((second ? p.b2_scale : p.b_scale) + b_block * (second ? p.b2_scale_ld : p.b_scale_ld) + kb);
      // Loads from clamped rows and a select, not a branch: a divergent branch while MMAs are in flight makes
      // ptxas serialise every wgmma of the kernel (warning C7518).
      const float sa_lo = __ldg(sa + min(row_lo, sp.rows - 1)), sa_hi = __ldg(sa + min(row_hi, sp.rows - 1));
      const float s_lo = (row_lo < sp.rows ? sa_lo : 0.0f) * sb, s_hi = (row_hi < sp.rows ? sa_hi : 0.0f) * sb;
      if (later_issued) wgmma_wait<1>();
      else wgmma_wait<0>();
      fence_operands(part);
      if (lane == 0) mbar_arrive(empty((it + kt) % kStages));  // this warp is done with the stage
#pragma unroll
      for (int e = 0; e < Cfg::kAcc; ++e)  // value 4j + e is in row half e/2: (e & 2) picks the thread's second row
        acc[e] = fmaf(part[e], (e & 2) ? s_hi : s_lo, acc[e]);
    };
    // Even k-tiles in part0, odd ones in part1: kt + 1's MMAs are in flight while kt's sum is promoted.
    // Every issue and wait is straight-line code (the tail's branch holds whole issue-wait sequences): a wait
    // that depends on a runtime condition makes ptxas serialise every wgmma of the kernel (warning C7518).
    if (k_tiles > 0) {  // (always: K ≥ 16)
      issue(part0, 0);
      int kt = 0;
      for (; kt + 2 < k_tiles; kt += 2) {
        issue(part1, kt + 1);
        promote(part0, kt, /*later_issued=*/true);
        issue(part0, kt + 2);
        promote(part1, kt + 1, /*later_issued=*/true);
      }
      if (kt + 1 < k_tiles) {  // two k-tiles left
        issue(part1, kt + 1);
        promote(part0, kt, /*later_issued=*/true);
        promote(part1, kt + 1, /*later_issued=*/false);
      } else {
        promote(part0, kt, /*later_issued=*/false);
      }
    }
    it += k_tiles;
    const int64_t blk_off = (static_cast<int64_t>(ti.a_row) + cw * Cfg::kEpiRows) * sp.n + ti.n0;
    const int rows_valid = ti.m_valid - cw * Cfg::kEpiRows, cols_valid = sp.n - ti.n0;
    const uint32_t buf = epi_bufs + cw * Cfg::kEpiBufBytes;
    if (sp.c16 != nullptr) epilogue_staged(acc, buf, sp.c16 + blk_off, sp.n, rows_valid, cols_valid, 1 + cw);
    else epilogue_staged(acc, buf, sp.c + blk_off, sp.n, rows_valid, cols_valid, 1 + cw);
  }
#else
  __trap();  // built without sm_90a features: the host launches this only after wgmma_supported()
#endif
}

// ---------------------------------------------------------------- the weight gradient

struct Fp8WgradTiles {
  static constexpr int kBM = 128, kBN = 128, kBK = 128, kStages = 5;
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
  static constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK;
  static constexpr int kScaleBytes = 4 * (kBM + kBN);  // the k-tile's A scales (per row), B scales (per column)
  static constexpr int kStageBytes = kABytes + kBBytes + 1024;  // scales in the last KB: stages stay 1024-aligned
  static constexpr int kHalfBytes = 64 * kBK, kStepK32 = 32, kAcc = 64;
  static constexpr int kEpiRows = 64, kEpiRowBytes = 128;
  static constexpr int kEpiBufBytes = kEpiRows * kEpiRowBytes, kEpiBytes = kEpiBufBytes * kConsumers;
  static constexpr int kRingBytes = kStageBytes * kStages;
  static constexpr size_t kTileSmemBytes = size_t{kRingBytes} + kEpiBytes + 1024;
  static_assert(kScaleBytes <= 1024 && kStageBytes % 1024 == 0, "the scales fit the stage's last KB");
  static_assert(kBM == 64 * kConsumers && 2 * kAcc == kBN && kBK == 128, "as Fp8TmaTiles");
};
constexpr size_t fp8_wgrad_dynamic_smem_bytes(int groups) {
  return Fp8WgradTiles::kTileSmemBytes + sizeof(int) * (static_cast<size_t>(groups) + 1);
}
static_assert(fp8_wgrad_dynamic_smem_bytes(kTmaMaxGroups) + kTmaStaticSmemBytes <= kTmaSmemOptin,
              "ring + epilogue staging + prefix exceed an sm_90 block's shared memory");

struct Fp8WgradParams {
  // offsets, rows (a bound: 128·T), groups, m, n, c [G, m, n] f32, beta, issue.
  GroupedGemmParams sched;
  const uint8_t* a = nullptr;      // [m, width] (dy's grouped transposed copy)
  const uint8_t* b = nullptr;      // [n, width] (x's)
  const float* a_scale = nullptr;  // [T, m]
  const float* b_scale = nullptr;  // [T, n]
  int width = 0;                   // 128·T
  int slots = 0;                   // T: a group whose slots run past it is skipped and reported
};

// A 1-D bulk copy global → shared, completing `bytes` on the barrier (16-byte aligned, a multiple of 16).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
               : "memory");
}

static __global__ void __launch_bounds__(Fp8WgradTiles::kThreads, 1)
    grouped_gemm_fp8_wgrad_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                                  const Fp8WgradParams p, double* const sq_partial) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Fp8WgradTiles;
  constexpr GroupedLayout kL = GroupedLayout::kWgrad;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char fp8w_smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  const GroupedGemmParams& sp = p.sched;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = tid / 128;

  const uint32_t raw = smem_addr(fp8w_smem_raw);
  const uint32_t tiles = (raw + 1023u) & ~1023u;
  const uint32_t epi_bufs = tiles + Cfg::kRingBytes;
  unsigned char* tiles_ptr = fp8w_smem_raw + (tiles - raw);
  int* s_prefix = reinterpret_cast<int*>(tiles_ptr + Cfg::kRingBytes + Cfg::kEpiBytes);  // the groups' first slots
  const auto stage_a = [&](int s) { return tiles + s * Cfg::kStageBytes; };
  const auto stage_b = [&](int s) { return tiles + s * Cfg::kStageBytes + Cfg::kABytes; };
  const auto stage_scales = [&](int s) { return s * Cfg::kStageBytes + Cfg::kABytes + Cfg::kBBytes; };  // offset
  const auto full = [&](int s) { return smem_addr(&full_bar[s]); };
  const auto empty = [&](int s) { return smem_addr(&empty_bar[s]); };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), Cfg::kConsumers * 4);
    }
    mbar_init_fence();
  }
  if (blockIdx.x == 0 && tid == 0) report_bad_offsets(sp);
  if (warp == 0) build_m_tile_prefix<Cfg::kBM>(sp, s_prefix, lane);  // slots before each group (act_quant's)
  __syncthreads();
  // Offsets that need more slots than the copies hold (copies made from other offsets): the groups past
  // the last slot are skipped (never read past the scales) and the first such need is recorded.
  if (blockIdx.x == 0 && tid == 0 && s_prefix[sp.groups] > p.slots && sp.issue != nullptr &&
      atomicCAS(&sp.issue->flag, 0, 1) == 0) {
    sp.issue->site = sp.issue_site;
    sp.issue->index = sp.groups;
    sp.issue->value = s_prefix[sp.groups];
    sp.issue->limit = p.slots;
  }
  const auto tile_at = [&](int t, TmaTile& ti) {
    if (!tma_tile_at<kL, false, Cfg>(sp, s_prefix, t, ti)) return false;
    if (s_prefix[ti.g] + ti.k_tiles > p.slots) ti.skip = true;
    return true;
  };

  if (wg == 0) {
    // ---- producer: the k-tile's A and B boxes and their scales
    if (warp != 0 || lane != 0) return;
    int it = 0;
    TmaTile ti;
    for (int t = blockIdx.x; tile_at(t, ti); t += gridDim.x) {
      if (ti.skip) continue;
      const uint32_t sa_bytes = 4u * min(Cfg::kBM, sp.m - ti.m0), sb_bytes = 4u * min(Cfg::kBN, sp.n - ti.n0);
      for (int kt = 0; kt < ti.k_tiles; ++kt, ++it) {
        const int s = it % kStages, slot = s_prefix[ti.g] + kt;
        mbar_wait(empty(s), ((it / kStages) & 1) ^ 1);
        mbar_arrive_expect_tx(full(s), Cfg::kABytes + Cfg::kBBytes + sa_bytes + sb_bytes);
        tma_load_2d(stage_a(s), &map_a, full(s), slot * Cfg::kBK, ti.m0);
        tma_load_2d(stage_b(s), &map_b, full(s), slot * Cfg::kBK, ti.n0);
        const uint32_t sc = tiles + stage_scales(s);
        bulk_load(sc, p.a_scale + int64_t{slot} * sp.m + ti.m0, sa_bytes, full(s));
        bulk_load(sc + 4 * Cfg::kBM, p.b_scale + int64_t{slot} * sp.n + ti.n0, sb_bytes, full(s));
      }
    }
    return;
  }

  // ---- consumers
  const int cw = wg - 1;
  float acc[Cfg::kAcc], part[Cfg::kAcc];
#pragma unroll
  for (int e = 0; e < Cfg::kAcc; ++e) part[e] = 0.0f;  // defined before the first MMA (scale-d 0) reads it
  int it = 0;
  TmaTile ti;
  for (int t = blockIdx.x; tile_at(t, ti); t += gridDim.x) {
    const auto sq_slot = [&] { return sq_partial + (int64_t{t} * Cfg::kConsumers + cw) * 4 + warp % 4; };
    if (ti.skip) {  // a group with bad bounds: its C[g] untouched, its Σ C² share 0
      if (sq_partial != nullptr && lane == 0) *sq_slot() = 0.0;
      continue;
    }
#pragma unroll
    for (int e = 0; e < Cfg::kAcc; ++e) acc[e] = 0.0f;
    // The thread's rows (m) and columns (n) within the tile: rows r_lo, r_lo + 8; columns 8j + 2q + {0, 1}.
    const int r_lo = cw * 64 + (warp % 4) * 16 + lane / 4, q = lane % 4;
    const bool lo_in = r_lo < ti.m_valid, hi_in = r_lo + 8 < ti.m_valid;
    const int n_in = sp.n - ti.n0;  // columns of the tile inside C (a multiple of 8)
    for (int kt = 0; kt < ti.k_tiles; ++kt, ++it) {
      const int s = it % kStages;
      mbar_wait(full(s), (it / kStages) & 1);
      const uint32_t a_tile = stage_a(s) + cw * Cfg::kHalfBytes, b_tile = stage_b(s);
      fp8_ktile_mma(part, a_tile, b_tile);
      wgmma_wait<0>();
      fence_operands(part);
      // Scales past C's rows or columns were not copied: those sums (of TMA's zeros) get scale 0.
      const float* sc = reinterpret_cast<const float*>(tiles_ptr + stage_scales(s));
      const float sa_lo = lo_in ? sc[r_lo] : 0.0f, sa_hi = hi_in ? sc[r_lo + 8] : 0.0f;
#pragma unroll
      for (int j = 0; j < Cfg::kAcc / 4; ++j) {
        const int col = 8 * j + 2 * q;
        const float2 sb = col < n_in ? *reinterpret_cast<const float2*>(sc + Cfg::kBM + col) : make_float2(0.0f, 0.0f);
        acc[4 * j + 0] = fmaf(part[4 * j + 0], sa_lo * sb.x, acc[4 * j + 0]);
        acc[4 * j + 1] = fmaf(part[4 * j + 1], sa_lo * sb.y, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(part[4 * j + 2], sa_hi * sb.x, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(part[4 * j + 3], sa_hi * sb.y, acc[4 * j + 3]);
      }
      if (lane == 0) mbar_arrive(empty(s));  // this warp is done with the stage, scales included
    }
    // Epilogue: acc + beta·C (old C loaded in the accumulator layout before any store), Σ C², staged stores.
    float* c_tile = sp.c + (static_cast<int64_t>(ti.g) * sp.m + ti.m0) * sp.n + ti.n0;
    if (sp.beta != 0.0f) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (!(half == 0 ? lo_in : hi_in)) continue;
#pragma unroll
        for (int j = 0; j < Cfg::kAcc / 4; ++j) {
          const int col = 8 * j + 2 * q;
          if (col >= n_in) continue;
          const float2 old = *reinterpret_cast<const float2*>(c_tile + int64_t{r_lo + 8 * half} * sp.n + col);
          acc[4 * j + 2 * half] = fmaf(sp.beta, old.x, acc[4 * j + 2 * half]);
          acc[4 * j + 2 * half + 1] = fmaf(sp.beta, old.y, acc[4 * j + 2 * half + 1]);
        }
      }
    }
    if (sq_partial != nullptr) {
      // Every accumulator outside C is exactly 0 (zero scales, old C loaded only inside): all are summed.
      float part_sq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int e = 0; e < Cfg::kAcc; ++e) part_sq[e % 4] = fmaf(acc[e], acc[e], part_sq[e % 4]);
      double sq = (static_cast<double>(part_sq[0]) + part_sq[1]) + (static_cast<double>(part_sq[2]) + part_sq[3]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
      if (lane == 0) *sq_slot() = sq;
    }
    epilogue_staged(acc, epi_bufs + cw * Cfg::kEpiBufBytes, c_tile + int64_t{cw * Cfg::kEpiRows} * sp.n, sp.n,
                    ti.m_valid - cw * Cfg::kEpiRows, n_in, 1 + cw);
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------- launch

// Why the FP8 kernel does not take these params, or null when it does: K-major rows of 16-byte
// multiples (k, k2 % 16, TMA's stride rule) and at least one k-tile, n a multiple of 8 and C
// 16-byte aligned (the staged epilogue's whole vectors), 16-byte aligned operands, at most
// kTmaMaxGroups groups, a tensor-map encoder in the driver.
inline const char* grouped_gemm_fp8_unusable(const Fp8GroupedParams& p) {
  const GroupedGemmParams& s = p.sched;
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (s.rows <= 0 || s.groups <= 0 || s.n <= 0 || s.k <= 0) return "an empty dimension";
  if (s.groups > kTmaMaxGroups) return "more groups than kTmaMaxGroups";
  if (s.k % 16 != 0 || s.k2 % 16 != 0 || s.k2 < 0) return "K or K2 not a multiple of 16";
  if (s.n % 8 != 0) return "N not a multiple of 8";
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(s.c16 != nullptr ? static_cast<const void*>(s.c16) : s.c))
    return "a, b or c not 16-byte aligned";
  if (s.k2 > 0 && (p.a2 == nullptr || p.b2 == nullptr || !aligned16(p.a2) || !aligned16(p.b2)))
    return "second-term operands missing or not 16-byte aligned";
  if (tensor_map_encoder() == nullptr) return "no cuTensorMapEncodeTiled in the driver";
  return nullptr;
}

// Runs fp8_grouped_gemm on the kernel above. Call only when wgmma_supported() and
// grouped_gemm_fp8_unusable(p) is null.
inline cudaError_t launch_grouped_gemm_fp8(const Fp8GroupedParams& p, cudaStream_t stream) {
  using Cfg = Fp8TmaTiles;
  const GroupedGemmParams& s = p.sched;
  const cuuint64_t R = static_cast<cuuint64_t>(s.rows), G = static_cast<cuuint64_t>(s.groups),
                   n = static_cast<cuuint64_t>(s.n);
  // One term's maps: A [R, k] in boxes of kBM rows × 128 bytes, B [G][n][k] in boxes of kBN × 128.
  const auto encode_term = [&](CUtensorMap* ma, CUtensorMap* mb, const uint8_t* a, const uint8_t* b, int k_int) {
    const cuuint64_t k = static_cast<cuuint64_t>(k_int);
    const cuuint64_t da[2] = {k, R}, sa[1] = {k};
    const cuuint32_t ba[2] = {Cfg::kBK, Cfg::kBM};
    const cuuint64_t db[3] = {k, n, G}, sb[2] = {k, k * n};
    const cuuint32_t bb[3] = {Cfg::kBK, Cfg::kBN, 1};
    return encode_swizzled_map(ma, CU_TENSOR_MAP_DATA_TYPE_UINT8, a, 2, da, sa, ba) &&
           encode_swizzled_map(mb, CU_TENSOR_MAP_DATA_TYPE_UINT8, b, 3, db, sb, bb);
  };
  CUtensorMap map_a{}, map_b{}, map_a2{}, map_b2{};  // map_a2, map_b2 stay unread without a second term
  if (!encode_term(&map_a, &map_b, p.a, p.b, s.k) || (s.k2 > 0 && !encode_term(&map_a2, &map_b2, p.a2, p.b2, s.k2)))
    return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  const int64_t tiles_max =
      ((int64_t{s.rows} + Cfg::kBM - 1) / Cfg::kBM + s.groups) * ((s.n + Cfg::kBN - 1) / Cfg::kBN);
  const unsigned grid = static_cast<unsigned>(tiles_max < sms ? tiles_max : sms);
  const size_t smem = fp8_tma_dynamic_smem_bytes(s.groups);
  const auto kernel = s.k2 > 0 ? grouped_gemm_fp8_kernel<true> : grouped_gemm_fp8_kernel<false>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_a, map_b, map_a2, map_b2, p);
  return cudaGetLastError();
}

// Why the wgrad kernel does not take these params, or null when it does: m, n multiples of 8 (the
// scales' 16-byte bulk copies and the staged epilogue), 16-byte aligned tensors, at most kTmaMaxGroups
// groups, a tensor-map encoder.
inline const char* grouped_gemm_fp8_wgrad_unusable(const Fp8WgradParams& p) {
  const GroupedGemmParams& s = p.sched;
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (s.groups <= 0 || s.m <= 0 || s.n <= 0 || p.width <= 0) return "an empty dimension";
  if (s.groups > kTmaMaxGroups) return "more groups than kTmaMaxGroups";
  if (s.m % 8 != 0 || s.n % 8 != 0) return "M or N not a multiple of 8";
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.a_scale) || !aligned16(p.b_scale) || !aligned16(s.c))
    return "a, b, their scales or c not 16-byte aligned";
  if (tensor_map_encoder() == nullptr) return "no cuTensorMapEncodeTiled in the driver";
  return nullptr;
}
// The f64 slots of Σ C²: one per consumer warp of each output tile.
inline int64_t fp8_wgrad_sq_slots(const Fp8WgradParams& p) {
  using Cfg = Fp8WgradTiles;
  const GroupedGemmParams& s = p.sched;
  return int64_t{s.groups} * ((s.m + Cfg::kBM - 1) / Cfg::kBM) * ((s.n + Cfg::kBN - 1) / Cfg::kBN) * Cfg::kConsumers *
         4;
}

inline cudaError_t launch_grouped_gemm_fp8_wgrad(const Fp8WgradParams& p, cudaStream_t stream, double* sq_partial) {
  using Cfg = Fp8WgradTiles;
  const GroupedGemmParams& s = p.sched;
  const cuuint64_t w = static_cast<cuuint64_t>(p.width);
  const cuuint64_t da[2] = {w, static_cast<cuuint64_t>(s.m)}, db[2] = {w, static_cast<cuuint64_t>(s.n)}, st[1] = {w};
  const cuuint32_t box[2] = {Cfg::kBK, Cfg::kBM};
  CUtensorMap map_a{}, map_b{};
  if (!encode_swizzled_map(&map_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.a, 2, da, st, box) ||
      !encode_swizzled_map(&map_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.b, 2, db, st, box))
    return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  const int64_t tiles = fp8_wgrad_sq_slots(p) / (Cfg::kConsumers * 4);
  const unsigned grid = static_cast<unsigned>(tiles < sms ? tiles : sms);
  const size_t smem = fp8_wgrad_dynamic_smem_bytes(s.groups);
  e = cudaFuncSetAttribute(grouped_gemm_fp8_wgrad_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  grouped_gemm_fp8_wgrad_kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_a, map_b, p, sq_partial);
  return cudaGetLastError();
}

}  // namespace diffmoe::cuda::gg
