// Data-dependent argument checks on the device. The CPU backend checks tensor contents (token ids,
// expert indices, slot positions, targets) on the host before it computes; the CUDA backend cannot
// read them without a host sync, so its kernels check each index where they use it: a bad one is
// skipped (no out-of-bounds access) and recorded here, the first one wins. The backend reads this
// record at synchronize() and download() and throws an error naming the op, the field, the
// element and its value, as the CPU would have.
//
// Plain C++ (no CUDA headers): shared by host code and kernels.
#pragma once
#include <cstdint>

namespace diffmoe {

// Where an index was checked: one entry per (op, field). Host-side texts: cuda_backend.cpp.
enum class IssueSite : int32_t {
  kNone = 0,
  kEmbeddingFwdTokens,
  kEmbeddingBwdTokens,
  kRouterBwdTopkIdx,
  kPermuteTopkIdx,
  kGatherSrcRow,
  kGatherBwdSlotPos,
  kCombineFwdSlotPos,
  kCombineBwdSlotPos,
  kCrossEntropyFwdTargets,
  kCrossEntropyBwdTargets,
  kGroupedGemmOffsets,  // offsets break 0 = o[0] ≤ o[1] ≤ … ≤ o[G] ≤ rows (limit = rows)
  kGroupedGemmWgradOffsets,
  kEpPlanTopkIdx,
  kRopePositions,
  kPagedCacheWriteSlots,
  kPagedAttentionBlockTable,
  kPagedAttentionKvLens,    // kv_lens[b] must cover the query rows and fit the block table (limit = capacity + 1)
  kPagedAttentionQOffsets,  // 0 = q_offsets[0] ≤ … ≤ q_offsets[B] = rows (limit = rows)
  kGroupedGemmMaxRows,  // group index-1's rows offsets[index] − offsets[index−1] = value exceed limit = max_group_rows
  kFp8GroupedGemmOffsets,  // as kGroupedGemmOffsets, of fp8_grouped_gemm
  kFp8GroupedGemmWgradOffsets,
  kActQuantOffsets,  // act_quant's grouped transposed copy (ActQuantArgs::offsets)
};

struct DeviceIssue {
  int32_t flag = 0;   // 0 = nothing found; set once by atomicCAS
  int32_t site = 0;   // IssueSite
  int64_t index = 0;  // element index within the field
  int64_t value = 0;  // the offending value
  int64_t limit = 0;  // valid range [0, limit)
};

}  // namespace diffmoe
