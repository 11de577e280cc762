// Text generation with the compressed (latent) KV cache (docs/model.md §2: "Inference may use the absorbed
// latent cache"; docs/derivations.md §2.4 MLA absorb, §3.3 absorbed inference for DiffMLA design A).
//
// A Generator runs the model's forward one chunk of new positions at a time against a per-layer
// cache of r_kv + d_rope values per token: the post-norm latent ĉ and the post-RoPE rope key k^R.
// The layers are model/decode_layers.h's; per layer and chunk (Tq new positions per sequence, pos0 =
// cached positions before the chunk) the generator's own part is:
//   RoPE at the positions pos0 + t (row b·Tq + t of the chunk)
//   cache row pos0 + t of sequence b = [RMSNorm_kv(c) ; RoPE(k^R)] of row b·Tq + t
//   q̃_j = q^C_j W^UK_j                (k-nope rows of wkv_b for component j), one GEMM per (token, head)
//   L = latent_attention(q̃, q^R, cache)    differential: L_h = A_{h,0}ĉ − λ A_{h,1}ĉ (latent space)
//   o_j = L_{h(j)} W^UVᵀ_j            (v rows of wkv_b; h(j) = j/2 differential, j plain), per (token, component)
// then the final norm and the head on the last new position of each sequence.
//
// Memory: ONE arena, planned from (batch, max_len, prefill_chunk): the caches
// [B, max_len, r_kv + d_rope] per layer, RoPE tables, and per-chunk scratch for B·prefill_chunk rows
// shared by all layers (plan_decode_scratch). Nothing allocates after construction.
#pragma once
#include <cstdint>
#include <span>

#include "model/decode_layers.h"
#include "model/model.h"

namespace diffmoe {

struct GeneratorOptions {
  int64_t batch = 1;          // sequences decoded together
  int64_t max_len = 0;        // cache capacity in positions per sequence; 0 = max_seq_len (the RoPE table's end)
  int64_t prefill_chunk = 0;  // most positions per forward pass (bounds the scratch); 0 = max_len
};

class Generator : private DecodeOps {
 public:
  // Reads the model's parameters at every call (so it follows weight updates); the model must
  // outlive the generator.
  Generator(Model& model, GeneratorOptions opt);
  Generator(const Generator&) = delete;  // the layers hold references to the arena and to this generator
  Generator& operator=(const Generator&) = delete;

  // Empties the caches of every sequence.
  void reset();
  // tokens [B, T0] i32 (1 ≤ T0 ≤ max_len) on the backend's device: reset(), then append(tokens).
  Tensor prefill(Context ctx, const Tensor& tokens);
  // tokens [B, 1]: one new token per sequence. Returns logits [B, V] for the next position.
  Tensor step(Context ctx, const Tensor& tokens);
  // tokens [B, T] (T ≥ 1): appends T positions per sequence, in chunks of at most prefill_chunk.
  // Returns logits [B, V] of the last appended position (a view, valid until the next call).
  Tensor append(Context ctx, const Tensor& tokens);

  // Uploads host token ids (row-major [B, seq]) into the generator's own token buffer and returns
  // its [B, seq] view, e.g. gen.step(ctx, gen.upload_tokens(ids, 1)).
  Tensor upload_tokens(std::span<const int32_t> ids, int64_t seq);

  int64_t length() const { return len_; }  // cached positions per sequence
  int64_t batch() const { return opt_.batch; }
  int64_t max_len() const { return opt_.max_len; }
  Tensor cache(int64_t layer) const;  // [B, max_len, r_kv + d_rope]: row s = [ĉ_s ; k^R_s]
  size_t arena_bytes() const { return arena_.bytes(); }

  // Cache values per token over all layers: n_layers · (kv_lora_rank + qk_rope_head_dim).
  static int64_t cache_values_per_token(const ModelConfig& c) {
    return c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim);
  }

 private:
  // One chunk: columns [t0, t0 + tq) of tokens [B, T] at positions len_ … len_ + tq − 1.
  void forward_chunk(Context ctx, const Tensor& tokens, int64_t t0, int64_t tq);
  void head(Context ctx, int64_t tq);  // logits of the last new position per sequence
  // DecodeOps: y = x Wᵀ (+ beta·y); the chunk's cache rows; the absorbed attention per (token, head).
  void linear(Context ctx, const Tensor& y, const Tensor& x, const Tensor& w, double beta) const override;
  void write_cache(Context ctx, int64_t l, const DecodeRows& rows, const Tensor& kv_rows) override;
  void attend(Context ctx, int64_t l, const DecodeRows& rows, const LatentAttentionStep& s) override;
  // The first shape.numel() values of a scratch buffer, viewed as `shape`.
  Tensor scratch(const char* name, Shape shape) const { return arena_prefix(arena_, name, shape); }
  Tensor param(const std::string& name) const { return model_.params().get(name); }

  Model& model_;
  const ModelConfig& cfg_;
  Backend& be_;
  GeneratorOptions opt_;
  Arena arena_;
  DecodeLayers layers_;  // reads arena_'s scratch, calls back into this generator
  int64_t len_ = 0;
};

}  // namespace diffmoe
