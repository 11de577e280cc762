// The FFN block of one layer (docs/model.md §4, §5): pre-norm, then a dense SwiGLU MLP (layers below
// n_dense_layers) or the MoE (routed experts through a group-limited top-k router + shared experts),
// then the residual add.
#pragma once
#include "model/layer_context.h"
#include "model/recompute.h"
#include "model/router_options.h"

namespace diffmoe {

class FfnLayer {
 public:
  // recompute: what the backward recomputes (model/recompute.h: moe, full).
  FfnLayer(int64_t layer, Recompute recompute) : l_(layer), recompute_(recompute), names_(layer, "ffn") {}
  // Adds this layer's activation views (and the shared backward scratch) with the plan's dtypes.
  void plan(const LayerContext& lc, PrecisionPlan& plan, Arena& acts) const;
  // out = x + FFN(RMSNorm(x)).  For MoE layers also adds the aux loss into acts "loss.aux" and the
  // per-expert counts into acts "stats.{l}.counts".
  void forward(const LayerContext& lc, const Tensor& x, const Tensor& out) const;
  // d_out (= residual gradient) += ∂L/∂x; weight gradients accumulate. aux_scale multiplies the
  // aux loss gradient (the same scale as the LM loss's gradient). d_out16: in the bf16 GEMM mode
  // d_out rounded to bf16 (the GEMMs read it), rewritten here from the updated d_out; else empty.
  // With recompute, first re-runs the forward's recomputed activations from x and what is kept.
  void backward(const LayerContext& lc, const Tensor& x, const Tensor& d_out, const Tensor& d_out16,
                double aux_scale) const;

 private:
  bool moe(const LayerContext& lc) const { return lc.cfg->is_moe_layer(l_); }
  std::string p(const std::string& name) const;  // "layers.{l}.ffn.<name>"
  // The activation `name`: "act.{l}.ffn.<name>", or, when the backward recomputes it, the view all
  // layers share (ActNames).
  std::string a(const std::string& name) const;
  bool recomputed(std::string_view name) const;
  void plan_act(PrecisionPlan& pl, Arena& acts, const std::string& name, const Shape& shape, ActRole role) const {
    names_.plan(pl, acts, name, shape, role, recomputed(name));
  }
  Tensor gemm_input(const LayerContext& lc) const;  // x_norm as the GEMMs read it (x_norm16 in bf16 mode)
  // x_norm = RMSNorm_ffn(x) (and its bf16 copy x_norm16 in the bf16 GEMM mode).
  void norm_forward(const LayerContext& lc, const Tensor& x) const;
  // A SwiGLU MLP on rows x [N, D] with weights prefix (w1, w2, w3 ".weight"): y = residual + result
  // (the w2 GEMM adds the residual [N, D] as its addend; residual may be y itself).
  void mlp_forward(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix, const Tensor& x,
                   const Tensor& y, const Tensor& residual) const;
  // Its hidden part: a = x W1ᵀ, b = x W3ᵀ, h = silu(a) ⊙ b.
  void mlp_hidden(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix,
                  const Tensor& x) const;
  // x_perm = the rows of xg sorted by expert, by the routing plan (src_row) of the forward.
  void dispatch(const LayerContext& lc, const Tensor& xg, const Tensor& x_perm) const;
  // The routed experts on the dispatched rows x_perm [NK, D] (grouped by the routing plan's
  // offsets): a, b, h per group as mlp_hidden, then y_perm = h W2ᵀ per group.
  void expert_hidden(const LayerContext& lc, const Tensor& x_perm) const;
  void expert_output(const LayerContext& lc, const Tensor& y_perm) const;
  // The backward's recompute (model/recompute.h): the activations recomputed() names, from x and
  // the kept routing, by the forward's ops.
  void recompute(const LayerContext& lc, const Tensor& x) const;
  // Backward of mlp_forward: dx (+)= (beta_dx), weight grads accumulate.
  void mlp_backward(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix, const Tensor& x,
                    const Tensor& dy, const Tensor& dx, double beta_dx) const;
  // The MoE block with the experts split over an EP group (ffn_layer_ep.cpp, docs/model.md §12): out already
  // holds x + Shared(u) on return from the shared part; xg is the GEMMs' x_norm.
  bool expert_parallel(const LayerContext& lc) const { return lc.ep != nullptr && lc.ep->size() > 1; }
  void plan_ep(const LayerContext& lc, PrecisionPlan& plan, Arena& acts) const;
  void forward_ep(const LayerContext& lc, const Tensor& x, const Tensor& out) const;
  void backward_ep(const LayerContext& lc, const Tensor& d_out_gemm, const Tensor& dx_norm, double aux_scale) const;
  // This rank's experts on its `rows` received expert rows (ExpertBuffers x_perm): a, b, h.
  void expert_hidden_ep(const LayerContext& lc, int64_t rows) const;
  // The received x rows through this rank's experts: x_perm gathered by src_row, the hidden part,
  // y_perm = h W2ᵀ (the forward and the `full` recompute run the same calls).
  void experts_ep(const LayerContext& lc, const Tensor& x_recv, int64_t rows) const;
  // The backward's recompute with expert parallelism (model/recompute.h): `moe` a, b, h from the
  // kept x_perm; `full` (xg: the recomputed GEMM input) the dispatch again by the forward's recorded
  // plan and counts, the shared experts' hidden part meanwhile, then x_perm, a, b, h and y_perm.
  void recompute_ep(const LayerContext& lc, const Tensor& xg) const;
  int64_t l_;
  Recompute recompute_;
  ActNames names_;
};

}  // namespace diffmoe
