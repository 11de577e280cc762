// The fp8 mode's FP8 operands (docs/model.md §7, docs/derivations.md §6): which weights run in FP8, and
// the scratch that a Linear quantises its operands into: the activation tiles of x and dy and the
// 128×128 blocks of its weight, quantised from the bf16 rounding of its compute weight where a GEMM reads them (no
// e4m3 copy of a weight outlives the GEMM that reads it). The scratch is planned as activations
// (PrecisionPlan roles kFp8Data / kFp8Scale), so `diffmoe plan` counts it.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "core/arena.h"
#include "model/config.h"
#include "model/layout_buffers.h"
#include "model/parameters.h"
#include "model/precision_plan.h"

namespace diffmoe {

// A GEMM weight W [N, K] (or a stack [E, N, K], experts > 0) that runs in FP8. Its FP8 copies, in
// op_args.h's layouts (q [N, K] with scale [ceil(N/128), fp8_block_scale_cols(K)], Fprop's B, and
// q_t = Wᵀ [K, N] with scale_t, Dgrad's B), are made from the bf16 rounding of w by the GEMM that
// reads them.
struct Fp8Weight {
  Tensor w;              // the compute weight: bf16, or f32 where it is its own master (PrecisionPlan::compute_dtype)
  int64_t n = 0, k = 0;  // one matrix's [N, K]
  int64_t experts = 0;   // 0: a single matrix
};

// The fp8 mode's weights by the data address of their compute weight (LayerContext::linear finds
// a weight's entry from the tensor it is handed).
using Fp8WeightTable = std::unordered_map<const void*, Fp8Weight>;

// Plans the FP8 scratch of one micro-batch of `tokens` rows (in the fp8 mode only; nothing otherwise):
//   scratch.fp8.a    a Linear's A operand quantised row-wise (Fprop's x, Dgrad's dy)
//   scratch.fp8.a_t  dy quantised in 128×1 tiles (Wgrad's A)
//   scratch.fp8.b_t  x quantised in 128×1 tiles (Wgrad's B)
//   scratch.fp8.w    the weight in 128×128 blocks (Fprop's B)
//   scratch.fp8.w_t  its transpose in 128×128 blocks (Dgrad's B)
//   scratch.fp8.ga, ga2  the routed experts' A and A2 operands quantised row-wise, all rows (fp8_grouped_gemm)
//   scratch.fp8.gw, gw2  the blocks of an expert stack W or Wᵀ, of each term (fp8_grouped_gemm)
//   scratch.fp8.gt     the routed experts' dy and x quantised transposed per expert, one after the other
//       (fp8_grouped_gemm_wgrad)
// the quantised ones with a data view (.q, e4m3) and a scale view (.scale, f32), sized for the largest call. All of
// it is live only inside one LayerContext GEMM call (or pair of calls), and the slots of a dense Linear (a … w_t) and
// those of the routed experts (ga … gw2, gt) are never live together, so those two sets share their bytes (within
// the experts' set, gt has bytes of its own: the backward writes dy's row-wise copy into ga / ga2 and its grouped
// transposed one into gt in one pass). It is planned as aliases (Storage::kAlias)
// over the bytes of "scratch.dlogits", the head's logits gradient, which is live only from the
// cross-entropy backward to the head's two bf16 GEMMs, before any layer's backward (Model::backward);
// where those bytes are too few, over a region "scratch.fp8" of its own. Call after "scratch.dlogits"
// is planned.
void plan_fp8(const ModelConfig& cfg, PrecisionPlan& plan, int64_t tokens, Arena& acts);

// The table of every weight the plan runs in FP8.
Fp8WeightTable fp8_weight_table(const std::vector<ParamSpec>& specs, const PrecisionPlan& plan,
                                const LayoutBuffers& params);

}  // namespace diffmoe
