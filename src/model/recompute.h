// Activation recompute (train.recompute, docs/training.md): which activations of a layer the forward
// keeps for the backward, and which the backward recomputes from what is kept. A sub-block's input
// (the residual stream before it) is always kept, and a recomputed tensor is recomputed by the SAME
// ops on the same inputs as in the forward, so it gets the same values (bitwise on the CPU; on CUDA
// wherever the kernels are deterministic, see tools/cuda_model_check.cpp).
//
// Modes:
//   none       every layer keeps its own activations (the reference; the most memory).
//   attention  the attention block keeps only λ: its backward first re-runs its forward up to the
//              input of W_o (norms, projections, RoPE, the attention core, subln; not W_o's GEMM,
//              whose output is not needed) into ONE set of views that every layer shares.
//   moe        MoE layers keep the routing and the expert rows x_perm, y_perm (the GEMM input and
//              output of the experts); the experts' SwiGLU intermediates a, b, h are recomputed
//              from x_perm (two grouped GEMMs and the SwiGLU) into shared views.
//   full       `attention`, and the FFN block of every layer likewise (norm, dense or shared SwiGLU,
//              the gather into x_perm, the experts up to y_perm). MoE layers keep only the routing
//              (scores, top-k indices and weights, the routing plan: N·(E + 3K) + E + 1 values, no
//              D-wide rows), so the re-run never decides the routing again: on CUDA the router's
//              input could differ in its last bits from the forward's (GEMM algorithm choice), and a
//              near tie would then route differently from the forward that gave the loss.
//   With expert parallelism the same rule holds for the received expert rows (ExpertBuffers):
//   `moe` keeps x_perm, y_perm per layer; `full` keeps the dispatch plan and its host counts and the
//   backward runs the all-to-all of the x rows again by those counts (every rank at the same point,
//   no count exchange), then the permutation and the experts, into one shared set of rows.
//
// Shared views are named "act.recomputed.<block>.<name>" (ActNames): one per name for all layers.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

#include "core/arena.h"
#include "model/precision_plan.h"

namespace diffmoe {

enum class Recompute : uint8_t { kNone, kAttention, kMoe, kFull };

// "none" | "attention" | "moe" | "full". Anything else throws naming `key`.
Recompute parse_recompute(std::string_view s, std::string_view key);
std::string_view recompute_name(Recompute r);

// The activation names of one block of one layer, and their planning: "act.{layer}.{block}.{name}"
// for a tensor the layer keeps, "act.recomputed.{block}.{name}" for one its backward recomputes
// (one view for every layer of the block's kind, planned by the first layer that asks for it).
// Which names are recomputed is the block's rule (AttentionLayer, FfnLayer); this is only where
// they live.
class ActNames {
 public:
  ActNames(int64_t layer, std::string_view block) : layer_(layer), block_(block) {}
  std::string name(std::string_view n, bool recomputed) const;
  // Plans the view `name(n, recomputed)` with the plan's dtype for `role`. A shared view is planned
  // once; every later layer must ask for the same shape and role (throws otherwise).
  void plan(PrecisionPlan& pl, Arena& acts, std::string_view n, const Shape& shape, ActRole role,
            bool recomputed) const;

 private:
  int64_t layer_;
  std::string block_;
};

}  // namespace diffmoe
