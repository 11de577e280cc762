// Grouped GEMM for the MoE experts on Hopper (sm_90a): TMA loads, a producer warp and two consumer
// warpgroups on wgmma, persistent CTAs. The same three layouts as grouped_gemm.cuh (whose params,
// offsets checks and bf16 operand copies it reuses), all on warpgroup MMAs:
//   kFwd   C[rows_g] = alpha·A[rows_g]·B[g]ᵀ + beta·C   A [R,k] K-major, B [G,n,k] K-major
//   kDgrad C[rows_g] = alpha·A[rows_g]·B[g]  + beta·C   A [R,k] K-major, B [G,k,n] MN-major
//   kWgrad C[g]      = alpha·A[rows_g]ᵀ·B[rows_g] + beta·C[g]
//                      A [R,m] MN-major (the reduction runs over rows), B [R,n] MN-major
// wgmma reads MN-major bf16 tiles as they are stored ("transposed" operands), so neither dgrad's
// weights nor wgrad's activations need a transposed copy (the earlier wgmma kernel copied dgrad's
// weights transposed for every call; wgrad ran on mma.sync).
//
// Design (one CTA per SM, 384 threads of ≤ 168 registers, ≤ 226 KB of shared memory: the ring,
// the epilogue's staging buffers and the groups' prefix, see TmaGemmTiles):
// - CTA tile 128×256×64. Warpgroup 0 is the producer: one thread issues the TMA copies of each
//   k-tile into a 4-stage ring (A 16 KB + B 32 KB per stage). Warpgroups 1 and 2 each own one
//   m64 half of the tile: an m64n256 f32 accumulator (128 registers per thread), 4 wgmma.m64n256k16
//   per k-tile, keeping one k-tile of MMAs in flight (wait_group 1) before releasing its stage.
// - Stages hand over through mbarriers: full[s] (the producer's expect_tx, completed by the TMA
//   bytes) and empty[s] (one arrival per consumer warp once its MMAs on s are done).
// - Shared tiles use TMA's 128-byte swizzle, the layout wgmma reads: a K-major box is rows of 64
//   k (128 B); an MN-major box is 64 k-rows of 64 m or n. Descriptors: K-major SBO = 1024 B (8-row
//   atoms), k16 step +32 B; MN-major LBO = 8192 B (next 64-wide box), SBO = 1024 B (next 8 k-rows),
//   k16 step +2048 B (16 k-rows).
// - Boundaries by TMA: reads outside a tensor map's dims come back as zeros. A's map is 2-D over
//   all R rows, so an m-tile's rows past its group's end belong to the next group: their products
//   land in C rows the epilogue does not write. B's maps are 3-D (…, G) in fwd/dgrad, so a group's
//   n and k tails are zeros. wgrad reduces over rows: in a group's last k-tile the consumers zero
//   the rows past the group's end in their A box before the MMAs (so the next group's rows add 0).
// - Scheduling on the device, no host sync: each CTA builds the exclusive prefix of the groups'
//   m-tile counts in shared memory (bad groups have none) and walks tiles t = blockIdx.x,
//   + gridDim.x, …; t → (m-tile slot, n-tile) with n fastest (CTAs sharing an A tile run
//   together), the slot's group by binary search. wgrad: t → (group, m-tile, n-tile).
// - Epilogue through shared memory, while the producer already loads the next tile's first
//   stages: each consumer warpgroup writes its m64×n256 block (alpha·acc + beta·C, old C loaded in
//   the accumulator layout before any store) in chunks of 64 rows × 128 bytes (32 f32 or 64 bf16
//   columns) into its own 8 KB staging buffer, then stores each chunk's rows with coalesced 16-byte
//   stores (4 full 128-byte row segments per warp instruction) where the group's rows and n end.
//   Written straight from the accumulators, a warp store touched 8 rows × 32 bytes (f32) or × 16
//   bytes (bf16): bf16 output was slower than f32. fwd/dgrad may write a bf16 C instead (params
//   c16, beta = 0: the bf16 GEMM mode's expert activations). Where a row is not a whole number of
//   16-byte vectors (n % 4 ≠ 0 for f32, n % 8 ≠ 0 for bf16) or C is not 16-byte aligned, the
//   epilogue stores straight from the accumulators instead (float2 / bf16x2 pairs, or scalars).
// - Two terms (fwd/dgrad, params k2 > 0): C = alpha·(A·op(B) + A2·op(B2)) + beta·C. A2 and B2 get
//   their own tensor maps (map_a2, map_b2, inner size k2); the producer issues a tile's k-tiles
//   0 … kt1−1 from (A, B) and then kt1 … kt1+kt2−1 from (A2, B2) into the same ring (kt1 =
//   ceil(k/kBK), kt2 = ceil(k2/kBK); each term's partial last k-tile is zero-filled by its own
//   maps), and the consumers just see kt1 + kt2 k-tiles. One launch writes C once, where two
//   launches (the second with beta = 1) re-read C: the MoE backward's dx_perm = da·W1 + db·W3.
//   k2 = 0: the maps are never read and the kernel does what it did with one term.
// - Σ C² (wgrad, the launcher's sq_partial): each consumer warp squares the values it is about to
//   store (f32 partials) and writes their f64 sum into its own slot of the tile (wgrad_sq_slots); the caller adds
//   the slots in a fixed order (no atomics: the same bits every run). The global gradient norm then
//   need not read the expert gradients again. A kernel argument of its own, not a params field:
//   one more field in GroupedGemmParams alone made ptxas spill 3-4× more bytes in every layout.
// Includes only CUDA headers: tools/kernel-dev/grouped_gemm_check.cu compiles it standalone.
#pragma once
#include <cuda.h>  // CUtensorMap (types only: the encoder is fetched through the runtime)
#include <cudaTypedefs.h>

#include "grouped_gemm.cuh"

namespace diffmoe::cuda::gg {

template <GroupedLayout L>
struct TmaGemmTiles {
  static constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4;
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
  static constexpr bool kAMNMajor = L == GroupedLayout::kWgrad;  // A's m contiguous (wgrad)
  static constexpr bool kBMNMajor = L != GroupedLayout::kFwd;    // B's n contiguous (dgrad, wgrad)
  static constexpr int kBox = 64;                                // 64 elements = one 128-byte swizzle row
  static constexpr int kBoxBytes = kBox * kBox * 2;              // one 64×64 MN-major box (8 KB)
  static constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2, kStageBytes = kABytes + kBBytes;
  static constexpr int kHalfBytes = 64 * kBK * 2;  // a consumer's m64 part of the A stage (either major)
  static constexpr int kStepA = kAMNMajor ? 16 * 128 : 32, kStepB = kBMNMajor ? 16 * 128 : 32;  // per k16
  // Epilogue staging (one buffer per consumer warpgroup, never touched by TMA): chunks of 64 rows ×
  // 128 bytes, i.e. 32 f32 or 64 bf16 columns of the warpgroup's m64×n256 block. A buffer holds one
  // chunk (two barriers per chunk); double buffering or a whole 128×256 f32 tile (128 KB) does not
  // fit next to the 4-stage ring (budget below).
  static constexpr int kEpiRows = 64;                           // a warpgroup's rows
  static constexpr int kEpiRowBytes = 128;                      // one chunk row: 8 16-byte vectors
  static constexpr int kEpiBufBytes = kEpiRows * kEpiRowBytes;  // 8 KB per warpgroup
  static constexpr int kEpiBytes = kEpiBufBytes * kConsumers;   // 16 KB
  static constexpr int kRingBytes = kStageBytes * kStages;      // 192 KB
  // Dynamic smem before the groups' prefix: the ring (1024-byte aligned), the staging buffers,
  // and 1024 bytes of slack to align the ring.
  static constexpr size_t kTileSmemBytes = size_t{kRingBytes} + kEpiBytes + 1024;
  static_assert(kBK == kBox && kBM == 64 * kConsumers && kBN % kBox == 0, "the swizzle rows and boxes above");
  static_assert(kHalfBytes == kBoxBytes, "a consumer's A half is one MN-major box or 64 K-major rows");
  static_assert(kEpiRows * kConsumers == kBM && kBN * 4 % kEpiRowBytes == 0 && kBN * 2 % kEpiRowBytes == 0,
                "whole chunks of f32 and bf16 columns per warpgroup block");
};

// The groups this kernel schedules: its prefix of m-tile counts [G+1] shares the dynamic smem.
constexpr int kTmaMaxGroups = 4096;

// Shared memory budget, per CTA (one per SM): dynamic = kTileSmemBytes + the prefix, static = the
// ring's mbarriers (ptxas reports 128 bytes; kTmaStaticSmemBytes leaves room), within the 227 KB
// an sm_90 block may opt in to: 192 KB ring + 16 KB staging + 1 KB slack + 16 KB prefix + 1 KB
// static = 226 KB.
constexpr size_t kTmaSmemOptin = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200
constexpr size_t kTmaStaticSmemBytes = 1024;
template <GroupedLayout L>
constexpr size_t tma_dynamic_smem_bytes(int groups) {
  return TmaGemmTiles<L>::kTileSmemBytes + sizeof(int) * (static_cast<size_t>(groups) + 1);
}
static_assert(tma_dynamic_smem_bytes<GroupedLayout::kFwd>(kTmaMaxGroups) + kTmaStaticSmemBytes <= kTmaSmemOptin &&
                  tma_dynamic_smem_bytes<GroupedLayout::kDgrad>(kTmaMaxGroups) + kTmaStaticSmemBytes <= kTmaSmemOptin &&
                  tma_dynamic_smem_bytes<GroupedLayout::kWgrad>(kTmaMaxGroups) + kTmaStaticSmemBytes <= kTmaSmemOptin,
              "ring + epilogue staging + prefix exceed an sm_90 block's shared memory");

// ---------------------------------------------------------------- PTX wrappers (sm_90a)

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The barrier inits → visible to the async proxy (TMA's complete_tx) and the other threads.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// A barrier of one consumer warpgroup (ids 1, 2; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_bar(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }
// Pins the accumulators in place around the asynchronous MMAs: the compiler may not read, move or
// reuse them between issue and wait (each gets a volatile, ordered "definition" here).
template <int kN>
__device__ __forceinline__ void fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Descriptor of a K-major tile in the 128-byte swizzle layout starting at shared address `addr`:
// rows of 64 k (128 B), chunk c of row r stored at chunk c ^ (r % 8), 8-row atoms of 1024 B.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  uint64_t d = (addr & 0x3FFFFu) >> 4;  // start address, bits 0-13
  d |= uint64_t{1} << 16;               // leading byte offset: unused for swizzled K-major
  d |= uint64_t{1024 >> 4} << 32;       // stride byte offset: 8 rows × 128 B
  d |= uint64_t{1} << 62;               // layout: 128-byte swizzle
  return d;
}

// Descriptor of an MN-major tile in the 128-byte swizzle layout: 64-element boxes of kBox k-rows,
// LBO = the next box along m/n, SBO = the next 8 k-rows.
__device__ __forceinline__ uint64_t sw128_mn_desc(uint32_t addr, uint32_t box_bytes) {
  uint64_t d = (addr & 0x3FFFFu) >> 4;
  d |= uint64_t{(box_bytes >> 4) & 0x3FFFu} << 16;
  d |= uint64_t{1024 >> 4} << 32;
  d |= uint64_t{1} << 62;
  return d;
}

// d[128] += A·B for one m64n256k16 step (bf16 in, f32 accumulate). A and B in 128B-swizzled smem
// given by descriptors; kTransA / kTransB: 0 = K-major, 1 = MN-major (the "transposed" operand).
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %132, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, %130, %131;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]),
        "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]),
        "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),
        "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB), "r"(1));
}

// ---------------------------------------------------------------- epilogue through shared memory

__device__ __forceinline__ void st_shared_v2_f32(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// The staging buffer's swizzle: 16-byte vector v of chunk row r sits in slot v ^ epi_swizzle(r % 8).
// One warp store of the accumulators covers rows g = lane/4 (8 rows, the same r % 8 for both
// halves) × column pairs 2·(lane%4) of one 8-column block; this permutation makes both kinds free of
// bank conflicts:
//   bf16x2 (4 B): vector jj of 8 rows → 8 different slots, 4 lanes in each: 32 banks, 1 wavefront.
//   float2 (8 B): vector 2·jj + (lane%4)/2; per half-warp (g = 0…3 or 4…7) g%4 moves bits 1-2 and
//   g/4 bit 0 → 8 different slots, 2 lanes each in different 8-byte halves: 2 wavefronts per
//   warp store of 256 bytes (the minimum).
// The reads are row-wise (8 lanes × 16 bytes = one 128-byte row, any slot order): 1 wavefront per
// 8 lanes. (Plain slot v ^ (r % 8) would leave the float2 stores 2-way conflicted.)
__device__ __forceinline__ uint32_t epi_swizzle(int r8) { return ((r8 & 3) << 1) | ((r8 >> 2) & 1); }

// Stores one consumer warpgroup's final values — acc, its m64×n256 block in the wgmma accumulator
// layout (value 4j + e of warp w: row 16w + lane/4 + 8·(e/2), column 8j + 2·(lane%4) + e%2) — as T
// (float or bf16) to c_blk (the block's first element in C, rows ldc elements apart), through the
// warpgroup's staging buffer buf (kEpiBufBytes at a 1024-byte aligned shared address). Only rows <
// rows_valid and columns < cols_valid are written; cols_valid must be a multiple of 16 / sizeof(T)
// and c_blk, ldc give 16-byte aligned rows (the caller's check), so a vector is in or out whole.
// Per chunk of kChunkCols columns: barrier (every thread has read the previous chunk), each thread
// writes its values of the chunk, barrier, each thread copies 4 rows' 16-byte vectors to C.
// bar_id: the warpgroup's named barrier (128 threads); the caller's branch is warpgroup-uniform.
// kAcc: the accumulators per thread, 128 for an m64n256 block (the bf16 kernel), 64 for m64n128
// (the FP8 kernel, grouped_gemm_fp8.cuh); the block has 2·kAcc columns.
template <class T, int kAcc>
__device__ __forceinline__ void epilogue_staged(const float (&acc)[kAcc], uint32_t buf, T* c_blk, int64_t ldc,
                                                int rows_valid, int cols_valid, int bar_id) {
  constexpr int kRows = 64, kRowBytes = 128;         // TmaGemmTiles::kEpiRows, kEpiRowBytes
  constexpr int kChunkCols = kRowBytes / sizeof(T);  // 32 f32 or 64 bf16 columns per chunk
  constexpr int kChunks = 2 * kAcc / kChunkCols;     // 8 or 4 chunks per n256 block, 4 or 2 per n128
  static_assert(2 * kAcc % kChunkCols == 0, "whole chunks per block");
  constexpr int kBlocksPerChunk = kChunkCols / 8;  // the accumulators' 8-column blocks j per chunk
  constexpr int kVec = 16 / sizeof(T);             // elements per 16-byte vector
  constexpr int kVecsPerRow = kRowBytes / 16;      // 8 lanes per row on the read side
  constexpr int kRowsPerPass = 128 / kVecsPerRow;  // the warpgroup copies 16 rows per pass
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "f32 or bf16 output");
  if (rows_valid <= 0) return;  // (uniform) the tile's rows end in the other warpgroup's half
  // The thread index is read here, not passed in: values derived from it would otherwise be
  // computed once before the tile loop and occupy registers through the k-loop (spills there).
  uint32_t wtid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(wtid));
  wtid %= 128;
  const uint32_t lane = wtid % 32, warp = wtid / 32, g = lane / 4, q = lane % 4, swz = epi_swizzle(g);
  // Write side: the thread's rows 16·warp + g (+ 8 for e/2 = 1) share r % 8 = g. Vector slot
  // (2·jj + q/2) ^ swz (f32) or jj ^ swz (bf16) = w_base ^ (jj's bits): the XOR touches only slot
  // bits, above the thread's byte offset within the vector and below the row.
  const uint32_t w_row = buf + (warp * 16 + g) * kRowBytes;
  const uint32_t w_base = sizeof(T) == 4 ? w_row + ((q / 2) ^ swz) * 16 + (q % 2) * 8 : w_row + swz * 16 + q * 4;
  // Read side: 8 lanes per 128-byte row, rows wtid/8 + 16·i (the same r % 8 for every i).
  const uint32_t r_row = wtid / kVecsPerRow, r_vec = wtid % kVecsPerRow;
  const uint32_t r_addr = buf + r_row * kRowBytes + (r_vec ^ epi_swizzle(r_row % 8)) * 16;
  T* const dst = c_blk + r_row * ldc + r_vec * kVec;
  const int rows_left = rows_valid - static_cast<int>(r_row), cols_left = cols_valid - static_cast<int>(r_vec * kVec);
#pragma unroll
  for (int ch = 0; ch < kChunks; ++ch) {
    if (ch * kChunkCols >= cols_valid) break;  // past n (uniform): nothing left to store
    warpgroup_bar(bar_id);                     // WAR: every thread has read the previous chunk
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int jj = 0; jj < kBlocksPerChunk; ++jj) {
        const int e = (ch * kBlocksPerChunk + jj) * 4 + half * 2;
        const uint32_t row_off = half * 8 * kRowBytes;
        if constexpr (sizeof(T) == 4) {
          st_shared_v2_f32((w_base ^ (2 * jj * 16)) + row_off, acc[e], acc[e + 1]);
        } else {
          const __nv_bfloat162 v = __floats2bfloat162_rn(acc[e], acc[e + 1]);  // as the direct path rounds
          st_shared_b32((w_base ^ (jj * 16)) + row_off, *reinterpret_cast<const uint32_t*>(&v));
        }
      }
    warpgroup_bar(bar_id);  // RAW: the chunk is in buf
#pragma unroll
    for (int i = 0; i < kRows / kRowsPerPass; ++i)
      if (i * kRowsPerPass < rows_left && ch * kChunkCols < cols_left)
        *reinterpret_cast<uint4*>(dst + i * kRowsPerPass * ldc + ch * kChunkCols) =
            ld_shared_v4(r_addr + i * kRowsPerPass * kRowBytes);
  }
}

// ---------------------------------------------------------------- tiles

// One output tile and where its operands start. fwd/dgrad: rows [a_row, a_row + m_valid) of C and
// A (global rows), columns [n0, n0 + kBN); wgrad: C[g] rows [m0, m0 + m_valid) (m), columns n0….
struct TmaTile {
  int g = 0, a_row = 0, m0 = 0, m_valid = 0, n0 = 0;
  int k_row0 = 0, k_rows = 0;  // wgrad: the group's rows (the reduction)
  int k_tiles = 0;             // fwd/dgrad: both terms' (kt1 + kt2)
  bool skip = false;           // wgrad: a group with bad bounds (reported, its C[g] untouched)
};

// Tile number t, or false past the last one. s_prefix [G+1]: m-tiles before each group (fwd/dgrad).
// kTwoTerms: the tile's k-loop also runs the second term's k-tiles.
// Cfg: the tile sizes (kBM, kBN, kBK in elements); the FP8 kernel passes its own.
template <GroupedLayout L, bool kTwoTerms, class Cfg = TmaGemmTiles<L>>
__device__ __forceinline__ bool tma_tile_at(const GroupedGemmParams& p, const int* s_prefix, int t, TmaTile& ti) {
  const int n_tiles = (p.n + Cfg::kBN - 1) / Cfg::kBN;
  if constexpr (L == GroupedLayout::kWgrad) {
    const int m_tiles = (p.m + Cfg::kBM - 1) / Cfg::kBM, per_group = m_tiles * n_tiles;
    if (t >= p.groups * per_group) return false;
    ti.g = t / per_group;
    const int r = t % per_group;
    ti.m0 = r / n_tiles * Cfg::kBM;
    ti.n0 = r % n_tiles * Cfg::kBN;
    ti.m_valid = min(Cfg::kBM, p.m - ti.m0);
    int lo;
    const int rows = group_rows(p, ti.g, &lo);
    ti.skip = rows < 0;
    ti.k_row0 = lo;
    ti.k_rows = rows < 0 ? 0 : rows;
    ti.k_tiles = (ti.k_rows + Cfg::kBK - 1) / Cfg::kBK;
    return true;
  } else {
    const int slot = t / n_tiles;
    if (slot >= s_prefix[p.groups]) return false;
    int lo_g = 0, hi_g = p.groups;  // the last g with s_prefix[g] ≤ slot (then slot < s_prefix[g+1])
    while (hi_g - lo_g > 1) {
      const int mid = (lo_g + hi_g) / 2;
      if (s_prefix[mid] <= slot) lo_g = mid;
      else hi_g = mid;
    }
    ti.g = lo_g;
    const int lo = __ldg(p.offsets + lo_g), rows = __ldg(p.offsets + lo_g + 1) - lo;
    const int mt = slot - s_prefix[lo_g];
    ti.a_row = lo + mt * Cfg::kBM;
    ti.m_valid = min(Cfg::kBM, rows - mt * Cfg::kBM);
    ti.n0 = t % n_tiles * Cfg::kBN;
    ti.k_tiles = (p.k + Cfg::kBK - 1) / Cfg::kBK + (kTwoTerms ? (p.k2 + Cfg::kBK - 1) / Cfg::kBK : 0);
    return true;
  }
}

// One warp: s_prefix[g] = Σ_{g' < g} ceil(rows_g' / kBM) over groups with good bounds.
template <int kBM>
__device__ inline void build_m_tile_prefix(const GroupedGemmParams& p, int* s_prefix, int lane) {
  int base = 0;
  if (lane == 0) s_prefix[0] = 0;
  for (int g0 = 0; g0 < p.groups; g0 += 32) {
    int tiles, lo;
    const int incl = m_tiles_inclusive<kBM>(p, g0, lane, &tiles, &lo);
    if (g0 + lane < p.groups) s_prefix[g0 + lane + 1] = base + incl;
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
}

// ---------------------------------------------------------------- the kernel

// kTwoTerms (fwd/dgrad, launched when k2 > 0): the second term's k-tiles follow the first's. The
// one-term instantiation compiles to what it was before the second term existed (168 registers,
// the same few spilled bytes), so the common call pays nothing for it.
// kDirectEpilogue: always store straight from the accumulators (the fallback path); only the
// harness launches it, for an A/B row against the staged epilogue.
template <GroupedLayout L, bool kTwoTerms, bool kDirectEpilogue = false>
__global__ void __launch_bounds__(TmaGemmTiles<L>::kThreads, 1)
    grouped_gemm_tma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                            const __grid_constant__ CUtensorMap map_a2, const __grid_constant__ CUtensorMap map_b2,
                            const GroupedGemmParams p, double* const sq_partial) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = TmaGemmTiles<L>;
  static_assert(!kTwoTerms || L != GroupedLayout::kWgrad, "a second term only in fwd/dgrad");
  constexpr int kStages = Cfg::kStages, kBK = Cfg::kBK, kBN = Cfg::kBN;
  extern __shared__ __align__(128) unsigned char tma_smem_raw[];  // aligned to 1024 below
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = tid / 128;

  const uint32_t raw = smem_addr(tma_smem_raw);
  const uint32_t tiles = (raw + 1023u) & ~1023u;      // swizzle atoms are 1024-byte aligned
  const uint32_t epi_bufs = tiles + Cfg::kRingBytes;  // kConsumers staging buffers of kEpiBufBytes
  int* s_prefix = reinterpret_cast<int*>(tma_smem_raw + (tiles - raw) + Cfg::kRingBytes + Cfg::kEpiBytes);
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
  if (blockIdx.x == 0 && tid == 0) report_bad_offsets(p);
  if (L != GroupedLayout::kWgrad && warp == 0) build_m_tile_prefix<Cfg::kBM>(p, s_prefix, lane);
  __syncthreads();

  if (wg == 0) {
    // ---- producer: one thread issues every TMA copy
    if (warp != 0 || lane != 0) return;
    int it = 0;                             // k-tiles issued so far, over all of this CTA's tiles: stage it % kStages
    const int kt1 = (p.k + kBK - 1) / kBK;  // fwd/dgrad: k-tiles of the first term, then the second's
    TmaTile ti;
    for (int t = blockIdx.x; tma_tile_at<L, kTwoTerms>(p, s_prefix, t, ti); t += gridDim.x) {
      for (int kt = 0; kt < ti.k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        mbar_wait(empty(s), ((it / kStages) & 1) ^ 1);     // a fresh barrier passes parity 1 at once
        mbar_arrive_expect_tx(full(s), Cfg::kStageBytes);  // out-of-bounds zeros count too
        if constexpr (L == GroupedLayout::kWgrad) {
          const int k0 = kt * kBK;
          for (int h = 0; h < Cfg::kConsumers; ++h)
            tma_load_2d(stage_a(s) + h * Cfg::kBoxBytes, &map_a, full(s), ti.m0 + h * Cfg::kBox, ti.k_row0 + k0);
          for (int j = 0; j < kBN / Cfg::kBox; ++j)
            tma_load_2d(stage_b(s) + j * Cfg::kBoxBytes, &map_b, full(s), ti.n0 + j * Cfg::kBox, ti.k_row0 + k0);
        } else {
          // k-tile kt of the first term (A, B), or kt − kt1 of the second (A2, B2).
          const bool second = kTwoTerms && kt >= kt1;
          const CUtensorMap* ma = second ? &map_a2 : &map_a;
          const CUtensorMap* mb = second ? &map_b2 : &map_b;
          const int k0 = (second ? kt - kt1 : kt) * kBK;
          tma_load_2d(stage_a(s), ma, full(s), k0, ti.a_row);
          if constexpr (L == GroupedLayout::kFwd) {
            tma_load_3d(stage_b(s), mb, full(s), k0, ti.n0, ti.g);
          } else {
            for (int j = 0; j < kBN / Cfg::kBox; ++j)
              tma_load_3d(stage_b(s) + j * Cfg::kBoxBytes, mb, full(s), ti.n0 + j * Cfg::kBox, k0, ti.g);
          }
        }
      }
    }
    return;
  }

  // ---- consumers: warpgroup cw computes rows [64·cw, 64·cw + 64) of each tile
  const int cw = wg - 1, wtid = tid % 128;
  const auto desc_a = [&](uint32_t addr) {
    return Cfg::kAMNMajor ? sw128_mn_desc(addr, Cfg::kBoxBytes) : sw128_desc(addr);
  };
  const auto desc_b = [&](uint32_t addr) {
    return Cfg::kBMNMajor ? sw128_mn_desc(addr, Cfg::kBoxBytes) : sw128_desc(addr);
  };
  const bool vec2 = (p.n % 2) == 0 && reinterpret_cast<uintptr_t>(p.c) % 8 == 0;      // float2 rows
  const bool pair16 = (p.n % 2) == 0 && reinterpret_cast<uintptr_t>(p.c16) % 4 == 0;  // bf16x2 rows (c16)
  // The staged epilogue's condition (uniform): rows of whole 16-byte vectors, C 16-byte aligned.
  const bool c16_out = p.c16 != nullptr;
  const bool stage_c16 = !kDirectEpilogue && c16_out && p.n % 8 == 0 && reinterpret_cast<uintptr_t>(p.c16) % 16 == 0;
  const bool stage_c = !kDirectEpilogue && !c16_out && p.n % 4 == 0 && reinterpret_cast<uintptr_t>(p.c) % 16 == 0;
  float acc[128];
  int it = 0;
  TmaTile ti;
  for (int t = blockIdx.x; tma_tile_at<L, kTwoTerms>(p, s_prefix, t, ti); t += gridDim.x) {
#pragma unroll
    for (int e = 0; e < 128; ++e) acc[e] = 0.0f;
    for (int kt = 0; kt < ti.k_tiles; ++kt, ++it) {
      const int s = it % kStages;
      mbar_wait(full(s), (it / kStages) & 1);
      const uint32_t a_tile = stage_a(s) + cw * Cfg::kHalfBytes, b_tile = stage_b(s);
      if constexpr (L == GroupedLayout::kWgrad) {
        // The group's last k-tile: rows past its end (the next group's) → zeros in this A box.
        const int valid = ti.k_rows - kt * kBK;
        if (valid < kBK) {
          for (int i = wtid; i < (kBK - valid) * 8; i += 128) {
            const uint32_t addr = a_tile + (valid + i / 8) * 128 + (i % 8) * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
          }
          fence_proxy_async();  // generic-proxy stores → visible to wgmma
          warpgroup_bar(1 + cw);
        }
      }
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)
        wgmma_m64n256k16<Cfg::kAMNMajor, Cfg::kBMNMajor>(acc, desc_a(a_tile + kk * Cfg::kStepA),
                                                         desc_b(b_tile + kk * Cfg::kStepB));
      wgmma_commit();
      wgmma_wait<1>();  // the previous k-tile's MMAs are done: release its stage
      fence_operands(acc);
      if (kt > 0 && lane == 0) mbar_arrive(empty((it - 1) % kStages));
    }
    wgmma_wait<0>();
    fence_operands(acc);
    if (ti.k_tiles > 0 && lane == 0) mbar_arrive(empty((it - 1) % kStages));
    // This consumer warp's Σ C² slot in tile t (wgrad with sq_partial): a skipped tile adds 0.
    const auto sq_slot = [&] { return sq_partial + (int64_t{t} * Cfg::kConsumers + cw) * 4 + warp % 4; };
    if (ti.skip) {
      if (L == GroupedLayout::kWgrad && sq_partial != nullptr && lane == 0) *sq_slot() = 0.0;
      continue;
    }

    // Epilogue: accumulator 4j + e of warp w in the warpgroup is (row 16w + lane/4 + 8·(e/2),
    // col 8j + 2·(lane%4) + e%2) of the warpgroup's m64×n256 block. Stored through the warpgroup's
    // staging buffer (epilogue_staged) where C's rows are whole 16-byte vectors, else straight from
    // the accumulators (the fallback: pairs where n is even, else scalars).
    const int64_t tile_off = L == GroupedLayout::kWgrad ? (static_cast<int64_t>(ti.g) * p.m + ti.m0) * p.n
                                                        : static_cast<int64_t>(ti.a_row) * p.n;
    const int row0 = cw * 64 + (warp % 4) * 16 + lane / 4;
    const auto in_tile = [&](int half, int j) {
      return row0 + half * 8 < ti.m_valid && ti.n0 + j * 8 + (lane % 4) * 2 < p.n;
    };
    const auto has_second = [&](int j) { return ti.n0 + j * 8 + (lane % 4) * 2 + 1 < p.n; };
    const auto off = [&](int half, int j) {
      return tile_off + static_cast<int64_t>(row0 + half * 8) * p.n + ti.n0 + j * 8 + (lane % 4) * 2;
    };
    const auto staged = [&](auto* c) {
      const int64_t blk_off = tile_off + static_cast<int64_t>(cw * Cfg::kEpiRows) * p.n + ti.n0;
      epilogue_staged(acc, epi_bufs + cw * Cfg::kEpiBufBytes, c + blk_off, p.n, ti.m_valid - cw * Cfg::kEpiRows,
                      p.n - ti.n0, 1 + cw);
    };
#pragma unroll
    for (int e = 0; e < 128; ++e) acc[e] *= p.alpha;
    if (p.c16 != nullptr) {  // bf16 output (beta = 0, grouped_gemm_tma_unusable)
      if (stage_c16) {
        staged(p.c16);
        continue;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
          if (!in_tile(half, j)) continue;
          bf16* c = p.c16 + off(half, j);
          const float v0 = acc[j * 4 + half * 2], v1 = acc[j * 4 + half * 2 + 1];
          if (pair16) {
            *reinterpret_cast<__nv_bfloat162*>(c) = __floats2bfloat162_rn(v0, v1);
          } else {
            c[0] = __float2bfloat16_rn(v0);
            if (has_second(j)) c[1] = __float2bfloat16_rn(v1);
          }
        }
      continue;
    }
    // With beta ≠ 0 every old C value of the thread is loaded first (in the accumulator layout:
    // whole 32-byte sectors), then all stores follow, staged or not: a load after each store would
    // wait for DRAM once per value (the compiler cannot reorder a load past a store that may alias
    // it), which made beta = 1 calls (wgrad's accumulation) 2-4× slower. The staged stores by the
    // other threads of the warpgroup follow this thread's loads through its barriers.
    const auto at = [&](int half, int j) { return p.c + off(half, j); };
    if (p.beta != 0.0f) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
          if (!in_tile(half, j)) continue;
          const float* c = at(half, j);
          float2 old;
          if (vec2) old = *reinterpret_cast<const float2*>(c);
          else old = make_float2(c[0], has_second(j) ? c[1] : 0.0f);
          acc[j * 4 + half * 2] += p.beta * old.x;
          acc[j * 4 + half * 2 + 1] += p.beta * old.y;
        }
    }
    if constexpr (L == GroupedLayout::kWgrad) {
      if (sq_partial != nullptr) {
        // The squares of the values stored below. Every accumulator outside C's bounds is exactly 0
        // (TMA reads zeros past m and n, the k-tail rows are zeroed, old C is loaded only inside),
        // so all 128 are summed without bounds checks: per-element predicates here cost enough
        // registers to spill in the k-loop. Four f32 partials of 32 squares each (relative error
        // ≤ 32·2^-24 ≈ 2e-6), widened to f64 once. Summed in f64 (a conversion per square: their
        // throughput is a sixteenth of FMA's) the wgrad kernel measured 8 % slower on an H100.
        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int e = 0; e < 128; ++e) part[e % 4] = fmaf(acc[e], acc[e], part[e % 4]);
        double sq = (static_cast<double>(part[0]) + part[1]) + (static_cast<double>(part[2]) + part[3]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane == 0) *sq_slot() = sq;
      }
    }
    if (stage_c) {
      staged(p.c);
      continue;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        if (!in_tile(half, j)) continue;
        float* c = at(half, j);
        const float v0 = acc[j * 4 + half * 2], v1 = acc[j * 4 + half * 2 + 1];
        if (vec2) {
          *reinterpret_cast<float2*>(c) = make_float2(v0, v1);
        } else {
          c[0] = v0;
          if (has_second(j)) c[1] = v1;
        }
      }
  }
#else
  __trap();  // built without sm_90a features: the host launches this only after wgmma_supported()
#endif
}

// ---------------------------------------------------------------- launch

// Writes 1 when the code that runs was compiled with the sm_90a features (wgmma), else 0. Static: every file
// that includes this header gets its own (the header is included by several op files).
static __global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

// Whether the Hopper kernel can run here: a compute capability 9.x device whose loaded code has the
// sm_90a features. A plain sm_90 build (or PTX JIT-compiled without them) would reach the kernel's
// trap, so a one-thread probe asks the code itself (one blocking launch; callers cache the answer).
static inline bool wgmma_supported(int device) {  // static: it launches this file's static probe
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major != 9)
    return false;
  int* d_flag = nullptr;
  int flag = 0;
  if (cudaMalloc(&d_flag, sizeof(int)) != cudaSuccess) return false;
  sm90a_probe_kernel<<<1, 1>>>(d_flag);
  const bool ran = cudaGetLastError() == cudaSuccess &&
                   cudaMemcpy(&flag, d_flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  const bool freed = cudaFree(d_flag) == cudaSuccess;
  return ran && freed && flag == 1;
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda); null when
// the driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A tensor map of `type` with the 128-byte swizzle; dims innermost first, strides in bytes (rank − 1).
inline bool encode_swizzled_map(CUtensorMap* map, CUtensorMapDataType type, const void* base, int rank,
                                const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, type, static_cast<cuuint32_t>(rank), const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
inline bool encode_bf16_map(CUtensorMap* map, const bf16* base, int rank, const cuuint64_t* dims,
                            const cuuint64_t* strides, const cuuint32_t* box) {
  return encode_swizzled_map(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, rank, dims, strides, box);
}

// Why the TMA kernel does not take these params, or null when it does: operands 16-byte aligned
// with lda, ldb multiples of 8 (the padded bf16 copies), non-empty dims, at most kTmaMaxGroups
// groups, a tensor-map encoder in the driver; a second term only in fwd/dgrad, with the same
// alignment. (wgmma_supported() is the caller's other condition: ask it once per device.)
inline const char* grouped_gemm_tma_unusable(const GroupedGemmParams& p, GroupedLayout layout) {
  if (p.rows <= 0 || p.groups <= 0 || p.n <= 0 || (layout == GroupedLayout::kWgrad ? p.m <= 0 : p.k <= 0))
    return "an empty dimension";
  if (p.groups > kTmaMaxGroups) return "more groups than kTmaMaxGroups";
  if (p.lda % 8 != 0 || p.ldb % 8 != 0 || reinterpret_cast<uintptr_t>(p.a) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.b) % 16 != 0)
    return "operands not 16-byte aligned";
  if (p.k2 < 0 || (p.k2 > 0 && layout == GroupedLayout::kWgrad)) return "a second term outside fwd/dgrad";
  if (p.k2 > 0 && (p.a2 == nullptr || p.b2 == nullptr || p.lda2 % 8 != 0 || p.ldb2 % 8 != 0 ||
                   reinterpret_cast<uintptr_t>(p.a2) % 16 != 0 || reinterpret_cast<uintptr_t>(p.b2) % 16 != 0))
    return "second-term operands missing or not 16-byte aligned";
  if (p.c16 != nullptr && (p.beta != 0.0f || layout == GroupedLayout::kWgrad))
    return "a bf16 output with beta != 0 or in wgrad";
  if (tensor_map_encoder() == nullptr) return "no cuTensorMapEncodeTiled in the driver";
  return nullptr;
}
// The f64 slots a wgrad launch with sq_partial writes: one per consumer warp (4 per warpgroup) of each
// output tile, tile t's at [t·kConsumers·4, (t + 1)·kConsumers·4).
inline int64_t wgrad_sq_slots(const GroupedGemmParams& p) {
  using Cfg = TmaGemmTiles<GroupedLayout::kWgrad>;
  const int64_t tiles = int64_t{p.groups} * ((p.m + Cfg::kBM - 1) / Cfg::kBM) * ((p.n + Cfg::kBN - 1) / Cfg::kBN);
  return tiles * Cfg::kConsumers * 4;
}
inline bool grouped_gemm_tma_usable(const GroupedGemmParams& p, GroupedLayout layout) {
  return grouped_gemm_tma_unusable(p, layout) == nullptr;
}

// Runs one grouped GEMM of layout L on the TMA kernel. Call only when wgmma_supported() and
// grouped_gemm_tma_usable(p, L). kDirectEpilogue: the harness's A/B timing of the fallback
// epilogue (stores straight from the accumulators); callers leave it false. sq_partial (wgrad
// only; wgrad_sq_slots doubles): each tile's per-warp Σ C² of what it stores.
template <GroupedLayout L, bool kDirectEpilogue = false>
cudaError_t launch_grouped_gemm_tma(const GroupedGemmParams& p, cudaStream_t stream, double* sq_partial = nullptr) {
  if (sq_partial != nullptr && L != GroupedLayout::kWgrad) return cudaErrorInvalidValue;
  using Cfg = TmaGemmTiles<L>;
  const cuuint64_t R = static_cast<cuuint64_t>(p.rows), G = static_cast<cuuint64_t>(p.groups);
  const cuuint32_t box = Cfg::kBox;
  CUtensorMap map_a{}, map_b{}, map_a2{}, map_b2{};  // map_a2, map_b2 stay unread without a second term
  bool ok = false;
  if constexpr (L == GroupedLayout::kWgrad) {
    const cuuint64_t lda_b = static_cast<cuuint64_t>(p.lda) * 2, ldb_b = static_cast<cuuint64_t>(p.ldb) * 2;
    const cuuint64_t da[2] = {static_cast<cuuint64_t>(p.m), R}, db[2] = {static_cast<cuuint64_t>(p.n), R};
    const cuuint32_t bx[2] = {box, box};
    ok = encode_bf16_map(&map_a, p.a, 2, da, &lda_b, bx) && encode_bf16_map(&map_b, p.b, 2, db, &ldb_b, bx);
  } else {
    // One term's maps: A [R, k] (row stride lda) in boxes of kBM rows × 64 k; B [G][n][k] (fwd) in
    // boxes of kBN n × 64 k, or [G][k][n] (dgrad) in 64 × 64 boxes; k-tails read as zeros.
    const auto encode_term = [&](CUtensorMap* ma, CUtensorMap* mb, const bf16* a, int lda, const bf16* b, int ldb,
                                 int k_int) {
      const cuuint64_t k = static_cast<cuuint64_t>(k_int), n = static_cast<cuuint64_t>(p.n);
      const cuuint64_t lda_b = static_cast<cuuint64_t>(lda) * 2, ldb_b = static_cast<cuuint64_t>(ldb) * 2;
      const cuuint64_t da[2] = {k, R};
      const cuuint32_t ba[2] = {box, static_cast<cuuint32_t>(Cfg::kBM)};
      if (!encode_bf16_map(ma, a, 2, da, &lda_b, ba)) return false;
      if constexpr (L == GroupedLayout::kFwd) {  // B [G][n][k]
        const cuuint64_t db[3] = {k, n, G}, sb[2] = {ldb_b, ldb_b * n};
        const cuuint32_t bb[3] = {box, static_cast<cuuint32_t>(Cfg::kBN), 1};
        return encode_bf16_map(mb, b, 3, db, sb, bb);
      } else {  // B [G][k][n]
        const cuuint64_t db[3] = {n, k, G}, sb[2] = {ldb_b, ldb_b * k};
        const cuuint32_t bb[3] = {box, box, 1};
        return encode_bf16_map(mb, b, 3, db, sb, bb);
      }
    };
    ok = encode_term(&map_a, &map_b, p.a, p.lda, p.b, p.ldb, p.k) &&
         (p.k2 == 0 || encode_term(&map_a2, &map_b2, p.a2, p.lda2, p.b2, p.ldb2, p.k2));
  }
  if (!ok) return cudaErrorInvalidValue;

  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  const int n_tiles = (p.n + Cfg::kBN - 1) / Cfg::kBN;
  const int64_t tiles_max = L == GroupedLayout::kWgrad
                                ? int64_t{p.groups} * ((p.m + Cfg::kBM - 1) / Cfg::kBM) * n_tiles
                                : ((int64_t{p.rows} + Cfg::kBM - 1) / Cfg::kBM + p.groups) * n_tiles;
  const unsigned grid = static_cast<unsigned>(tiles_max < sms ? tiles_max : sms);
  const size_t smem = tma_dynamic_smem_bytes<L>(p.groups);
  // wgrad never has a second term (grouped_gemm_tma_unusable): its one instantiation either way.
  const auto kernel = p.k2 > 0 ? grouped_gemm_tma_kernel<L, L != GroupedLayout::kWgrad, kDirectEpilogue>
                               : grouped_gemm_tma_kernel<L, false, kDirectEpilogue>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_a, map_b, map_a2, map_b2, p, sq_partial);
  return cudaGetLastError();
}

}  // namespace diffmoe::cuda::gg
