// The decoder layers of latent-cache inference (docs/model.md §2: "Inference may use the absorbed latent cache";
// docs/derivations.md §2.4 MLA absorb, §3.3 absorbed inference for DiffMLA design A), shared by the two decoders:
// model/generator.h (a [B, T] block of equal-length sequences, one cache row per position) and serve/engine.h
// (packed rows of many sequences at their own positions, a paged cache). Per layer, on N rows of the residual h:
//   x̄ = RMSNorm_attn(h);  q = [q^C ; RoPE(q^R)] from x̄ (wq_a/q_norm/wq_b or wq)
//   kv_rows = [RMSNorm_kv(c) ; RoPE(k^R)], [c ; k^R] = x̄ W_kvaᵀ      → DecodeOps::write_cache
//   λ (differential) = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init
//   O = absorbed attention over the cache (q̃_j = q^C_j W^UK_j, L = latent attention, o_j = L_{h(j)} W^UVᵀ_j)
//                                                                     → DecodeOps::attend
//   differential: Ō_h = (1 − λ_init)·RMSNorm_2dv(O_h; subln);   h += Ō W_oᵀ
//   h += FFN(RMSNorm_ffn(h))     dense SwiGLU or the MoE exactly as in training (bias used for selection, no aux loss)
// What the decoders do differently — where the cache rows go and how the attention reads them, which
// positions RoPE takes, whether a Linear runs through FP8 weight copies — is the DecodeOps they pass in
// and the DecodeRows of the pass. The op sequence (and so every result, bitwise) is the decoders' own.
#pragma once
#include <cstdint>
#include <string>

#include "core/arena.h"
#include "model/model.h"

namespace diffmoe {

// Checkpoint names of layer l's attention and FFN parameters (docs/model.md §8): "layers.{l}.attn.{name}".
std::string attn_param(int64_t l, const char* name);
std::string ffn_param(int64_t l, const char* name);

// The rows of one forward pass and the RoPE positions they are at (RopeArgs): a [B, seq_len] block of
// sequences whose row b·seq_len + t is at position pos_offset + t, or, when `positions` (i32 [n]) is
// given, row r at positions[r].
struct DecodeRows {
  int64_t n = 0;
  int64_t seq_len = 0, pos_offset = 0;
  Tensor positions = {};
};

// The cache-specific part of the attention for N rows, H component heads (docs/derivations.md §3.3).
struct LatentAttentionStep {
  Tensor att;     // out: O [N, H·d_v] token-major, component j of row n at columns j·d_v (O_h = [o_2h ; o_2h+1])
  Tensor q;       // [N, H·d_qk]: per head [q^C ; RoPE(q^R)]
  Tensor lambda;  // λ [1] (differential; undefined for plain MLA)
  Tensor kva;     // [N, r_kv + d_rope] = [c ; RoPE(k^R)]: the rows the new cache rows were normed from (a decoder
                  // that expands keys and values from them, serve/engine.h)
};

// What a decoder supplies to the shared layers.
class DecodeOps {
 public:
  // y = x Wᵀ (+ beta·y) for the dense Linear weights (attention projections, dense and shared-expert FFN).
  virtual void linear(Context ctx, const Tensor& y, const Tensor& x, const Tensor& w, double beta) const = 0;
  // Stores layer l's new cache rows kv_rows [N, r_kv + d_rope] = [ĉ ; RoPE(k^R)], one per row of `rows`.
  virtual void write_cache(Context ctx, int64_t l, const DecodeRows& rows, const Tensor& kv_rows) = 0;
  // s.att = the absorbed attention of layer l (W^UK absorption, latent attention over the cache including
  // the rows just written, W^UV up-projection), before subln.
  virtual void attend(Context ctx, int64_t l, const DecodeRows& rows, const LatentAttentionStep& s) = 0;

 protected:
  ~DecodeOps() = default;
};

// Plans the layers' scratch in `arena` for up to `rows` rows (views shared by all layers; DecodeLayers
// reads the first values of each) and the RoPE tables "rope.cos"/"rope.sin" [positions, d_rope / 2]
// (YaRN folded in, docs/model.md §3; the caller uploads them with upload_rope_tables). Also "q_lat"
// [H·rows·r_kv] and "lat" [H_out·rows·r_kv] for the absorbed query q̃ and the latent output L, in the
// layout the decoder's attend chooses. The caller adds its own views and allocates.
void plan_decode_scratch(Arena& arena, const ModelConfig& c, int64_t rows, int64_t positions, DType t);

// The first shape.numel() values of an arena view, viewed as `shape` (throws naming the view when it
// is too small).
Tensor arena_prefix(const Arena& arena, const char* name, Shape shape);

class DecodeLayers {
 public:
  // Reads the model's parameters at every call; model, scratch arena and ops must outlive the layers.
  DecodeLayers(Model& model, const Arena& scratch, DecodeOps& ops);

  // h += Attn_l(RMSNorm(h)) on the rows' residual ("h" [N, D]); the cache rows through the ops.
  void attention(Context ctx, int64_t l, const DecodeRows& rows);
  // h += FFN_l(RMSNorm(h)) on n rows; a MoE layer counts the rows routed to each expert into
  // expert_counts (i32 [n_routed_experts], overwritten by the router).
  void ffn(Context ctx, int64_t l, int64_t n, const Tensor& expert_counts);

 private:
  // y = RMSNorm(x; weight) on the rows of x [rows, width], eps norm_eps (rstd into the "rstd" scratch).
  void rmsnorm(Context ctx, const Tensor& y, const Tensor& x, const std::string& weight);
  // y += w2(silu(x W1ᵀ) ⊙ x W3ᵀ) on n rows of width `width` (docs/model.md §4); prefix: "layers.{l}.ffn[.shared]."
  void mlp(Context ctx, const Tensor& y, const Tensor& x, int64_t n, int64_t width, const std::string& prefix);
  Tensor scratch(const char* name, Shape shape) const { return arena_prefix(arena_, name, shape); }
  Tensor param(const std::string& name) const { return model_.params().get(name); }

  Model& model_;
  const ModelConfig& cfg_;
  Backend& be_;
  const Arena& arena_;
  DecodeOps& ops_;
};

}  // namespace diffmoe
