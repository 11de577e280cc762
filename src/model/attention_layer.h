// The DiffMLA attention block of one layer (spec §2): pre-norm, MLA projections with decoupled
// RoPE, differential (or plain) causal attention, per-head subln, output projection, residual add.
#pragma once
#include "model/layer_context.h"

namespace diffmoe {

class AttentionLayer {
 public:
  AttentionLayer(int64_t layer) : l_(layer) {}
  // Adds this layer's activation views (and the shared backward scratch) to the arena plan.
  void plan(const LayerContext& lc, Arena& acts) const;
  // out = x + Attn(RMSNorm(x)).  x, out [N, D] (distinct buffers; x is kept for the backward).
  void forward(const LayerContext& lc, const Tensor& x, const Tensor& out) const;
  // d_out (= the residual stream's gradient, [N, D]) += ∂L/∂x. Weight gradients accumulate into
  // lc.grads. d_out16: as in FfnLayer::backward (bf16 GEMM mode: read by W_o's backward GEMMs,
  // rewritten from the updated d_out), else empty.
  void backward(const LayerContext& lc, const Tensor& x, const Tensor& d_out, const Tensor& d_out16) const;

 private:
  std::string p(const char* name) const;  // "layers.{l}.attn.<name>" / activations "act.{l}.attn.<name>"
  std::string a(const char* name) const;
  int64_t l_;
};

}  // namespace diffmoe
