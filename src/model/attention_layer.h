// The DiffMLA attention block of one layer (docs/model.md §2): pre-norm, MLA projections with decoupled
// RoPE, differential (or plain) causal attention, per-head subln, output projection, residual add.
#pragma once
#include "model/layer_context.h"
#include "model/recompute.h"

namespace diffmoe {

// The MLA key/value split of config c (docs/model.md §2): from kv = ĉ W_kvbᵀ [N, H·(d_nope + d_v)] and the
// rows kva [N, r_kv + d_rope] whose last d_rope columns hold the rotated rope key, k [N, H, d_qk] = per head
// [k^C_j ; k^R] and v [N, H, d_v] (the training forward's, and the serving engine's expanded prefill).
MlaKvSplitFwdArgs mla_kv_split_args(const ModelConfig& c, const Tensor& k, const Tensor& v, const Tensor& kv,
                                    const Tensor& kva);

class AttentionLayer {
 public:
  // recompute: attention or full re-run the forward in the backward (model/recompute.h).
  AttentionLayer(int64_t layer, Recompute recompute)
      : l_(layer),
        recompute_(recompute == Recompute::kAttention || recompute == Recompute::kFull),
        names_(layer, "attn") {}
  // Adds this layer's activation views (and the shared backward scratch) to the arena, with the
  // dtypes of the precision plan.
  void plan(const LayerContext& lc, PrecisionPlan& plan, Arena& acts) const;
  // out = x + Attn(RMSNorm(x)).  x, out [N, D] (distinct buffers; x is kept for the backward).
  void forward(const LayerContext& lc, const Tensor& x, const Tensor& out) const;
  // d_out (= the residual stream's gradient, [N, D]) += ∂L/∂x. Weight gradients accumulate into
  // lc.grads. d_out16: as in FfnLayer::backward (bf16 GEMM mode: read by W_o's backward GEMMs,
  // rewritten from the updated d_out), else empty. With recompute, first re-runs the forward's
  // activations from x.
  void backward(const LayerContext& lc, const Tensor& x, const Tensor& d_out, const Tensor& d_out16) const;

 private:
  std::string p(const char* name) const;  // "layers.{l}.attn.<name>"
  // The activation `name`: "act.{l}.attn.<name>", or with recompute the view all layers share.
  std::string a(const char* name) const;
  bool recomputed(std::string_view name) const { return recompute_ && name != "lambda"; }  // λ: one value, kept
  void plan_act(PrecisionPlan& pl, Arena& acts, const char* name, const Shape& shape, ActRole role) const {
    names_.plan(pl, acts, name, shape, role, recomputed(name));
  }
  // Everything up to W_o: RMSNorm, the MLA projections, RoPE, attention, subln. Returns what W_o
  // reads (Ō, or O when not differential).
  Tensor forward_core(const LayerContext& lc, const Tensor& x) const;
  int64_t l_;
  bool recompute_;
  ActNames names_;
};

}  // namespace diffmoe
