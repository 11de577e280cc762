#include "model/generator.h"

#include <fmt/format.h>

#include <algorithm>

#include "model/rope_upload.h"

namespace diffmoe {

namespace {

// A view of `shape.numel()` elements of t starting at element `offset` (t is dense row-major, so
// this is any contiguous run: one token's head slice, one weight row block).
Tensor sub(const Tensor& t, int64_t offset, Shape shape) {
  DIFFMOE_CHECK(offset >= 0 && offset + shape.numel() <= t.numel(), "[generator] view of {} values at {} is outside {}",
                shape.numel(), offset, t.describe());
  return Tensor{.data = static_cast<char*>(t.data) + static_cast<size_t>(offset) * dtype_size(t.dtype),
                .dtype = t.dtype,
                .device = t.device,
                .shape = shape};
}

}  // namespace

Generator::Generator(Model& model, GeneratorOptions opt)
    : model_(model), cfg_(model.config()), be_(model.backend()), opt_(opt), layers_(model, arena_, *this) {
  const ModelConfig& c = cfg_;
  if (opt_.max_len == 0) opt_.max_len = c.max_seq_len;
  if (opt_.prefill_chunk == 0) opt_.prefill_chunk = opt_.max_len;
  DIFFMOE_CHECK(opt_.batch >= 1 && opt_.max_len >= 1 && opt_.max_len <= c.max_seq_len,
                "[generator] batch {} and max_len {}: need batch >= 1 and 1 <= max_len <= max_seq_len = {}", opt_.batch,
                opt_.max_len, c.max_seq_len);
  DIFFMOE_CHECK(opt_.prefill_chunk >= 1 && opt_.prefill_chunk <= opt_.max_len,
                "[generator] prefill_chunk {} must be in [1, max_len = {}]", opt_.prefill_chunk, opt_.max_len);

  const DType t = model.dtype();
  const int64_t B = opt_.batch;

  // State: the latent caches, the layers' scratch for B·prefill_chunk rows and RoPE tables for positions < max_len.
  for (int64_t l = 0; l < c.n_layers; ++l)
    arena_.add(fmt::format("cache.{}", l), Shape{B, opt_.max_len, c.kv_lora_rank + c.qk_rope_head_dim}, t);
  plan_decode_scratch(arena_, c, B * opt_.prefill_chunk, opt_.max_len, t);
  arena_.add("tokens", Shape{B * opt_.max_len}, DType::kI32);
  arena_.add("logits", Shape{B, c.vocab_size}, t);
  arena_.add("final.x_norm", Shape{B, c.dim}, t);
  arena_.add("final.rstd", Shape{B}, t);
  if (c.n_layers > c.n_dense_layers)
    arena_.add("router.counts", Shape{c.n_routed_experts}, DType::kI32);  // the router's per-expert counts (unused)
  arena_.allocate(be_.allocator());

  DIFFMOE_CHECK(t == DType::kF64 || t == DType::kF32, "[generator] unsupported parameter dtype {}", dtype_name(t));
  upload_rope_tables(be_, c, opt_.max_len, arena_.get("rope.cos"), arena_.get("rope.sin"));
}

Tensor Generator::cache(int64_t layer) const { return arena_.get(fmt::format("cache.{}", layer)); }

void Generator::linear(Context ctx, const Tensor& y, const Tensor& x, const Tensor& w, double beta) const {
  be_.gemm(ctx, {.c = y, .a = x, .b = w, .trans_a = false, .trans_b = true, .alpha = 1.0, .beta = beta});
}

// The cache rows at positions ≥ len_ are never read (latent_attention reads s < kv_len), so emptying
// the cache is just forgetting its length.
void Generator::reset() { len_ = 0; }

Tensor Generator::upload_tokens(std::span<const int32_t> ids, int64_t seq) {
  DIFFMOE_CHECK(seq >= 1 && seq <= opt_.max_len && static_cast<int64_t>(ids.size()) == opt_.batch * seq,
                "[generator] upload_tokens: {} ids for [batch = {}, seq = {}] (seq <= max_len = {})", ids.size(),
                opt_.batch, seq, opt_.max_len);
  const Tensor t = scratch("tokens", Shape{opt_.batch, seq});
  be_.upload(t, ids.data());
  return t;
}

Tensor Generator::prefill(Context ctx, const Tensor& tokens) {
  reset();
  return append(ctx, tokens);
}

Tensor Generator::step(Context ctx, const Tensor& tokens) {
  check_shape(tokens, Shape{opt_.batch, 1}, "generator.step", "tokens");
  return append(ctx, tokens);
}

Tensor Generator::append(Context ctx, const Tensor& tokens) {
  DIFFMOE_CHECK(tokens.rank() == 2 && tokens.dim(0) == opt_.batch && tokens.dim(1) >= 1,
                "[generator] tokens must be [batch = {}, T >= 1], got {}", opt_.batch, tokens.describe());
  check_dtype(tokens, DType::kI32, "generator", "tokens");
  // The backend's GEMM precision is per process, not per model: set it for this model's weights (the
  // bf16 GEMM mode's bf16 copies) as the training step and the serving engine's step do, so a decode
  // that runs before any training step, or after another model's, multiplies them in their mode.
  model_.use_gemm_precision();
  const int64_t T = tokens.dim(1);
  DIFFMOE_CHECK(len_ + T <= opt_.max_len, "[generator] {} cached + {} new positions exceed max_len = {}", len_, T,
                opt_.max_len);
  for (int64_t t0 = 0; t0 < T; t0 += opt_.prefill_chunk)
    forward_chunk(ctx, tokens, t0, std::min(opt_.prefill_chunk, T - t0));
  return arena_.get("logits");
}

void Generator::forward_chunk(Context ctx, const Tensor& tokens, int64_t t0, int64_t tq) {
  const int64_t B = opt_.batch, rows = B * tq;
  const Tensor h = scratch("h", Shape{rows, cfg_.dim});  // row b·tq + t = sequence b, position len_ + t
  // h_0 = embed_scale · Embed(tokens), one call per sequence (the chunk's columns of row b are contiguous).
  for (int64_t b = 0; b < B; ++b)
    be_.embedding_fwd(ctx, {.out = h.rows(b * tq, (b + 1) * tq),
                            .tokens = tokens[b].rows(t0, t0 + tq),
                            .table = param("embed.weight"),
                            .scale = cfg_.embed_scale});
  const Tensor counts = cfg_.n_layers > cfg_.n_dense_layers ? arena_.get("router.counts") : Tensor{};
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    layers_.attention(ctx, l, {.n = rows, .seq_len = tq, .pos_offset = len_});
    layers_.ffn(ctx, l, rows, counts);
  }
  head(ctx, tq);
  len_ += tq;
}

// Row b·tq + t of the chunk is position pos0 + t of sequence b: one contiguous copy per sequence.
void Generator::write_cache(Context ctx, int64_t l, const DecodeRows& rows, const Tensor& kv_rows) {
  const int64_t tq = rows.seq_len, pos0 = rows.pos_offset;
  const Tensor cache_l = cache(l);
  for (int64_t b = 0; b < opt_.batch; ++b)
    be_.copy(ctx, {.dst = cache_l[b].rows(pos0, pos0 + tq), .src = kv_rows.rows(b * tq, (b + 1) * tq)});
}

void Generator::attend(Context ctx, int64_t l, const DecodeRows& rows, const LatentAttentionStep& s) {
  const ModelConfig& c = cfg_;
  const int64_t B = opt_.batch, tq = rows.seq_len, N = rows.n, kv_len = rows.pos_offset + tq;
  const int64_t H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim, rkv = c.kv_lora_rank;
  const int64_t comps = c.differential ? 2 : 1, h_out = H / comps;
  const Tensor q_lat = scratch("q_lat", Shape{B, tq, H, rkv}), lat = scratch("lat", Shape{B, tq, h_out, rkv});
  const Tensor wkv_b = param(attn_param(l, "wkv_b.weight"));  // [H·(d_nope + d_v), r_kv], per j: [W^UK_j ; W^UV_j]
  // Absorb W^UK into the query (docs/derivations.md §2.4): q̃_j = q^C_j W^UK_j, [1, d_nope]·[d_nope, r_kv] per
  // (token, head); W^UK_j = rows j·(d_nope + d_v) … + d_nope of wkv_b.
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < H; ++j) {
      be_.gemm(ctx, {.c = sub(q_lat, (n * H + j) * rkv, Shape{1, rkv}),
                     .a = sub(s.q, (n * H + j) * dqk, Shape{1, dn}),
                     .b = sub(wkv_b, j * (dn + dv) * rkv, Shape{dn, rkv})});
    }
  }
  // MQA over the latent cache, positions < kv_len (the chunk's rows were just written).
  be_.latent_attention(ctx, {.out = lat,
                             .q_lat = q_lat,
                             .q_rope = s.q.reshape(Shape{B, tq, H, dqk}),
                             .cache = cache(l),
                             .lambda = s.lambda,
                             .kv_len = kv_len,
                             .q_rope_offset = dn,
                             .scale = c.softmax_scale(),
                             .differential = c.differential});
  // Up-project with W^UV (docs/derivations.md §3.3): o_j = L_{h(j)} W^UVᵀ_j, [1, r_kv]·[r_kv, d_v] per (token,
  // component); W^UV_j = rows j·(d_nope + d_v) + d_nope … + d_v of wkv_b. Component j's d_v columns
  // at (n·H + j)·d_v make O_h = [o_2h ; o_2h+1] contiguous: att is [N, H/2, 2·d_v] as in training.
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < H; ++j) {
      be_.gemm(ctx, {.c = sub(s.att, (n * H + j) * dv, Shape{1, dv}),
                     .a = sub(lat, (n * h_out + j / comps) * rkv, Shape{1, rkv}),
                     .b = sub(wkv_b, (j * (dn + dv) + dn) * rkv, Shape{dv, rkv}),
                     .trans_b = true});
    }
  }
}

void Generator::head(Context ctx, int64_t tq) {
  const int64_t B = opt_.batch, D = cfg_.dim;
  // The last new position of sequence b is row b·tq + tq − 1: B rows tq·D values apart, read in place.
  const Tensor last = sub(arena_.get("h"), (tq - 1) * D, Shape{(B - 1) * tq * D + D});
  const Tensor xn = arena_.get("final.x_norm");
  be_.rmsnorm_fwd(ctx, {.y = xn,
                        .rstd = arena_.get("final.rstd"),
                        .x = last,
                        .w = param("norm.weight"),
                        .rows = B,
                        .width = D,
                        .x_stride = tq * D,
                        .eps = cfg_.norm_eps});
  linear(ctx, arena_.get("logits"), xn, param(cfg_.tie_embeddings ? "embed.weight" : "head.weight"), 0.0);
}

}  // namespace diffmoe
