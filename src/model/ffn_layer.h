// The FFN block of one layer (spec §4, §5): pre-norm, then a dense SwiGLU MLP (layers below
// n_dense_layers) or the MoE (routed experts through a group-limited top-k router + shared experts),
// then the residual add.
#pragma once
#include "model/layer_context.h"

namespace diffmoe {

class FfnLayer {
 public:
  explicit FfnLayer(int64_t layer) : l_(layer) {}
  // Adds this layer's activation views (and the shared backward scratch) with the plan's dtypes.
  void plan(const LayerContext& lc, PrecisionPlan& plan, Arena& acts) const;
  // out = x + FFN(RMSNorm(x)).  For MoE layers also adds the aux loss into acts "loss.aux" and the
  // per-expert counts into acts "stats.{l}.counts".
  void forward(const LayerContext& lc, const Tensor& x, const Tensor& out) const;
  // d_out (= residual gradient) += ∂L/∂x; weight gradients accumulate. aux_scale multiplies the
  // aux loss gradient (the same scale as the LM loss's gradient). d_out16: in the bf16 GEMM mode
  // d_out rounded to bf16 (the GEMMs read it), rewritten here from the updated d_out; else empty.
  void backward(const LayerContext& lc, const Tensor& x, const Tensor& d_out, const Tensor& d_out16,
                double aux_scale) const;

 private:
  bool moe(const LayerContext& lc) const { return lc.cfg->is_moe_layer(l_); }
  std::string p(const std::string& name) const;  // "layers.{l}.ffn.<name>"
  std::string a(const std::string& name) const;  // "act.{l}.ffn.<name>"
  RouterOptions router_options(const ModelConfig& c) const;
  Tensor gemm_input(const LayerContext& lc) const;  // x_norm as the GEMMs read it (x_norm16 in bf16 mode)
  // A SwiGLU MLP on rows x [N, D] with weights prefix (w1, w2, w3 ".weight"): y = residual + result
  // (the w2 GEMM adds the residual [N, D] as its addend; residual may be y itself).
  void mlp_forward(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix, const Tensor& x,
                   const Tensor& y, const Tensor& residual) const;
  // Backward of mlp_forward: dx (+)= (beta_dx), weight grads accumulate.
  void mlp_backward(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix, const Tensor& x,
                    const Tensor& dy, const Tensor& dx, double beta_dx) const;
  // The MoE block with the experts split over an EP group (ffn_layer_ep.cpp, spec §12): out already
  // holds x + Shared(u) on return from the shared part; xg is the GEMMs' x_norm.
  bool expert_parallel(const LayerContext& lc) const { return lc.ep != nullptr && lc.ep->size() > 1; }
  void plan_ep(const LayerContext& lc, PrecisionPlan& plan, Arena& acts) const;
  void forward_ep(const LayerContext& lc, const Tensor& x, const Tensor& out) const;
  void backward_ep(const LayerContext& lc, const Tensor& d_out_gemm, const Tensor& dx_norm, double aux_scale) const;
  int64_t l_;
};

}  // namespace diffmoe
