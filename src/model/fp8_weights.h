// The fp8 mode's FP8 buffers (docs/model.md §7, docs/derivations.md §6): the e4m3 weight copies in
// 128×128 blocks, quantised from the bf16 compute weights once per update, and the scratch that the
// Linears quantise their activations and activation gradients into. All of them are planned as
// activations (PrecisionPlan roles kFp8Data / kFp8Scale), so `diffmoe plan` counts them.
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

// The FP8 copies of one GEMM weight W [N, K] (or of a stack [E, N, K], experts > 0), in op_args.h's
// layouts: q [N, K] with scale [ceil(N/128), fp8_block_scale_cols(K)] (Fprop's B) and q_t = Wᵀ
// [K, N] with scale_t (Dgrad's B). A stack keeps its experts' copies one after another.
struct Fp8Weight {
  Tensor w;  // the compute weight they are quantised from (bf16)
  Tensor q, scale, q_t, scale_t;
  int64_t n = 0, k = 0;               // one matrix's [N, K]
  int64_t experts = 0;                // 0: a single matrix
  Fp8Weight expert(int64_t e) const;  // expert e's copies, as a single matrix
};

// The fp8 mode's weights by the data address of their bf16 compute weight (LayerContext::linear finds
// a weight's copies from the tensor it is handed).
using Fp8WeightTable = std::unordered_map<const void*, Fp8Weight>;

// Plans the FP8 weight copies ("fp8.<parameter>.q", ".scale", ".q_t", ".scale_t") and the FP8 scratch
// of one micro-batch of `tokens` rows (in the fp8 mode only; nothing otherwise). The scratch:
//   scratch.fp8.a    a Linear's A operand quantised row-wise (Fprop's x, Dgrad's dy)
//   scratch.fp8.a_t  dy quantised in 128×1 tiles (Wgrad's A)
//   scratch.fp8.b_t  x quantised in 128×1 tiles (Wgrad's B)
//   scratch.fp8.rows_a, rows_b, rows_c  one routed expert's rows, padded with zero rows to a multiple
//       of 16 (cuBLASLt's FP8 shape rules; zero rows change no tile's amax and add nothing)
// each with a data view (.q, e4m3) and a scale view (.scale, f32), sized for the largest call.
void plan_fp8(const ModelConfig& cfg, PrecisionPlan& plan, int64_t tokens, Arena& acts);

// The table of every weight the plan runs in FP8, pointing into `acts` (allocated).
Fp8WeightTable fp8_weight_table(const std::vector<ParamSpec>& specs, const PrecisionPlan& plan,
                                const LayoutBuffers& params, const Arena& acts);

// Quantises every weight of the table from its compute weight (weight_quant, both orientations).
void quantize_fp8_weights(Backend& be, Context ctx, const Fp8WeightTable& table);

// Rows of one routed expert are padded to a multiple of this (cuBLASLt's FP8 GEMM: M % 8, and the
// Wgrad's reduction over rows K % 16).
constexpr int64_t kFp8RowPad = 16;

}  // namespace diffmoe
