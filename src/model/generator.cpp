#include "model/generator.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "model/rope_upload.h"
#include "model/router_options.h"

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

std::string attn_param(int64_t l, const char* name) { return fmt::format("layers.{}.attn.{}", l, name); }
std::string ffn_param(int64_t l, const char* name) { return fmt::format("layers.{}.ffn.{}", l, name); }

}  // namespace

Generator::Generator(Model& model, GeneratorOptions opt)
    : model_(model), cfg_(model.config()), be_(model.backend()), opt_(opt) {
  const ModelConfig& c = cfg_;
  if (opt_.max_len == 0) opt_.max_len = c.max_seq_len;
  if (opt_.prefill_chunk == 0) opt_.prefill_chunk = opt_.max_len;
  DIFFMOE_CHECK(opt_.batch >= 1 && opt_.max_len >= 1 && opt_.max_len <= c.max_seq_len,
                "[generator] batch {} and max_len {}: need batch >= 1 and 1 <= max_len <= max_seq_len = {}", opt_.batch,
                opt_.max_len, c.max_seq_len);
  DIFFMOE_CHECK(opt_.prefill_chunk >= 1 && opt_.prefill_chunk <= opt_.max_len,
                "[generator] prefill_chunk {} must be in [1, max_len = {}]", opt_.prefill_chunk, opt_.max_len);

  const DType t = model.dtype();
  const int64_t B = opt_.batch, R = B * opt_.prefill_chunk;  // R: most rows of one chunk
  const int64_t D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim;
  const int64_t rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim, rq = c.q_lora_rank;
  const int64_t h_out = c.differential ? H / 2 : H;
  const bool any_moe = c.n_layers > c.n_dense_layers;
  const int64_t K = c.n_activated_experts, E = c.n_routed_experts;

  // State: the latent caches and RoPE tables (YaRN folded in, docs/model.md §3) for positions < max_len.
  for (int64_t l = 0; l < c.n_layers; ++l) arena_.add(fmt::format("cache.{}", l), Shape{B, opt_.max_len, rkv + dr}, t);
  arena_.add("rope.cos", Shape{opt_.max_len, dr / 2}, t);
  arena_.add("rope.sin", Shape{opt_.max_len, dr / 2}, t);
  arena_.add("tokens", Shape{B * opt_.max_len}, DType::kI32);
  arena_.add("logits", Shape{B, c.vocab_size}, t);
  arena_.add("final.x_norm", Shape{B, D}, t);
  arena_.add("final.rstd", Shape{B}, t);
  // Per-chunk scratch, flat buffers of the largest use, shared by all layers (scratch() views them).
  arena_.add("h", Shape{R * D}, t);  // residual stream
  arena_.add("x_norm", Shape{R * D}, t);
  arena_.add("rstd", Shape{R}, t);
  if (rq > 0) {
    arena_.add("qa", Shape{R * rq}, t);
    arena_.add("cq", Shape{R * rq}, t);
  }
  arena_.add("q", Shape{R * H * dqk}, t);        // [R, H, d_qk], per head [q^C ; RoPE(q^R)]
  arena_.add("kva", Shape{R * (rkv + dr)}, t);   // [c ; RoPE(k^R)]
  arena_.add("q_lat", Shape{R * H * rkv}, t);    // q̃ [R, H, r_kv]
  arena_.add("lat", Shape{R * h_out * rkv}, t);  // L [R, H_out, r_kv]
  arena_.add("att", Shape{R * H * dv}, t);       // O [R, H, d_v] = [R, H/2, 2·d_v]
  if (c.differential) {
    arena_.add("att_n", Shape{R * H * dv}, t);  // (1 − λ_init)·RMSNorm_2dv(O)
    arena_.add("rstd_sub", Shape{R * H / 2}, t);
    arena_.add("lambda", Shape{1}, t);
  }
  // SwiGLU a, b, h: the widest of the dense MLP, the shared experts and the routed experts' rows.
  int64_t mlp = R * c.inter_dim;
  if (any_moe) mlp = std::max({mlp, R * c.n_shared_experts * c.moe_inter_dim, R * K * c.moe_inter_dim});
  for (const char* name : {"ffn.a", "ffn.b", "ffn.h"}) arena_.add(name, Shape{mlp}, t);
  if (any_moe) {
    arena_.add("router.logits", Shape{R * E}, t);
    arena_.add("router.scores", Shape{R * E}, t);
    arena_.add("router.topk_idx", Shape{R * K}, DType::kI32);
    arena_.add("router.topk_w", Shape{R * K}, t);
    arena_.add("router.counts", Shape{E}, DType::kI32);  // the router's per-expert counts (unused here)
    arena_.add("moe.offsets", Shape{E + 1}, DType::kI32);
    arena_.add("moe.src_row", Shape{R * K}, DType::kI32);
    arena_.add("moe.slot_pos", Shape{R * K}, DType::kI32);
    arena_.add("moe.x_perm", Shape{R * K * D}, t);
    arena_.add("moe.y_perm", Shape{R * K * D}, t);
  }
  arena_.allocate(be_.allocator());

  DIFFMOE_CHECK(t == DType::kF64 || t == DType::kF32, "[generator] unsupported parameter dtype {}", dtype_name(t));
  upload_rope_tables(be_, c, opt_.max_len, arena_.get("rope.cos"), arena_.get("rope.sin"));
}

Tensor Generator::scratch(const char* name, Shape shape) const { return sub(arena_.get(name), 0, shape); }
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
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attention(ctx, l, tq);
    ffn(ctx, l, rows);
  }
  head(ctx, tq);
  len_ += tq;
}

void Generator::attention(Context ctx, int64_t l, int64_t tq) {
  const ModelConfig& c = cfg_;
  const int64_t B = opt_.batch, N = B * tq, pos0 = len_, kv_len = len_ + tq;
  const int64_t D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim;
  const int64_t comps = c.differential ? 2 : 1, h_out = H / comps;
  const Tensor h = scratch("h", Shape{N, D}), x_norm = scratch("x_norm", Shape{N, D}), rstd = scratch("rstd", Shape{N});
  const Tensor q = scratch("q", Shape{N, H * dqk}), kva = scratch("kva", Shape{N, rkv + dr});
  const Tensor q_lat = scratch("q_lat", Shape{B, tq, H, rkv}), lat = scratch("lat", Shape{B, tq, h_out, rkv});
  const Tensor att = scratch("att", Shape{N, H * dv});
  const Tensor cos = arena_.get("rope.cos"), sin = arena_.get("rope.sin");
  const Tensor cache_l = cache(l);
  const Tensor wkv_b = param(attn_param(l, "wkv_b.weight"));  // [H·(d_nope + d_v), r_kv], per j: [W^UK_j ; W^UV_j]

  be_.rmsnorm_fwd(ctx, {.y = x_norm,
                        .rstd = rstd,
                        .x = h,
                        .w = param(fmt::format("layers.{}.attn_norm.weight", l)),
                        .rows = N,
                        .width = D,
                        .eps = c.norm_eps});
  // Queries (docs/model.md §2): c_q = RMSNorm_q(x̄ W_qaᵀ), q = c_q W_qbᵀ (or x̄ W_qᵀ); RoPE on each head's rope
  // columns at the absolute positions pos0 + t (row n of the chunk is position pos0 + n % tq).
  if (rq > 0) {
    const Tensor qa = scratch("qa", Shape{N, rq}), cq = scratch("cq", Shape{N, rq});
    linear(ctx, qa, x_norm, param(attn_param(l, "wq_a.weight")));
    be_.rmsnorm_fwd(ctx, {.y = cq,
                          .rstd = rstd,
                          .x = qa,
                          .w = param(attn_param(l, "q_norm.weight")),
                          .rows = N,
                          .width = rq,
                          .eps = c.norm_eps});
    linear(ctx, q, cq, param(attn_param(l, "wq_b.weight")));
  } else {
    linear(ctx, q, x_norm, param(attn_param(l, "wq.weight")));
  }
  be_.rope(ctx, {.x = q,
                 .cos = cos,
                 .sin = sin,
                 .n_heads = H,
                 .head_stride = dqk,
                 .col_offset = dn,
                 .rope_dim = dr,
                 .seq_len = tq,
                 .pos_offset = pos0});
  // The cache rows of the new positions: [c ; k^R] = x̄ W_kvaᵀ, k^R rotated, then ĉ = RMSNorm_kv(c)
  // written over the latent columns of the copied rows (a strided norm, x and y rows r_kv + d_rope apart).
  linear(ctx, kva, x_norm, param(attn_param(l, "wkv_a.weight")));
  be_.rope(ctx, {.x = kva,
                 .cos = cos,
                 .sin = sin,
                 .n_heads = 1,
                 .head_stride = rkv + dr,
                 .col_offset = rkv,
                 .rope_dim = dr,
                 .seq_len = tq,
                 .pos_offset = pos0});
  for (int64_t b = 0; b < B; ++b) {
    const Tensor dst = cache_l[b].rows(pos0, kv_len), src = kva.rows(b * tq, (b + 1) * tq);
    be_.copy(ctx, {.dst = dst, .src = src});
    be_.rmsnorm_fwd(ctx, {.y = dst,
                          .rstd = rstd.rows(b * tq, (b + 1) * tq),
                          .x = src,
                          .w = param(attn_param(l, "kv_norm.weight")),
                          .rows = tq,
                          .width = rkv,
                          .x_stride = rkv + dr,
                          .y_stride = rkv + dr,
                          .eps = c.norm_eps});
  }
  // Absorb W^UK into the query (docs/derivations.md §2.4): q̃_j = q^C_j W^UK_j, [1, d_nope]·[d_nope, r_kv] per
  // (token, head); W^UK_j = rows j·(d_nope + d_v) … + d_nope of wkv_b.
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < H; ++j) {
      be_.gemm(ctx, {.c = sub(q_lat, (n * H + j) * rkv, Shape{1, rkv}),
                     .a = sub(q, (n * H + j) * dqk, Shape{1, dn}),
                     .b = sub(wkv_b, j * (dn + dv) * rkv, Shape{dn, rkv})});
    }
  }
  // MQA over the latent cache; differential: L_h = A_{h,0}ĉ − λ A_{h,1}ĉ (docs/derivations.md §3.3).
  Tensor lambda;
  if (c.differential) {
    lambda = arena_.get("lambda");
    be_.diff_lambda_fwd(ctx, {.lambda = lambda,
                              .lq1 = param(attn_param(l, "lambda_q1")),
                              .lk1 = param(attn_param(l, "lambda_k1")),
                              .lq2 = param(attn_param(l, "lambda_q2")),
                              .lk2 = param(attn_param(l, "lambda_k2")),
                              .lambda_init = c.lambda_init(l)});
  }
  be_.latent_attention(ctx, {.out = lat,
                             .q_lat = q_lat,
                             .q_rope = q.reshape(Shape{B, tq, H, dqk}),
                             .cache = cache_l,
                             .lambda = lambda,
                             .kv_len = kv_len,
                             .q_rope_offset = dn,
                             .scale = c.softmax_scale(),
                             .differential = c.differential});
  // Up-project with W^UV (docs/derivations.md §3.3): o_j = L_{h(j)} W^UVᵀ_j, [1, r_kv]·[r_kv, d_v] per (token,
  // component); W^UV_j = rows j·(d_nope + d_v) + d_nope … + d_v of wkv_b. Component j's d_v columns
  // at (n·H + j)·d_v make O_h = [o_2h ; o_2h+1] contiguous: att is [N, H/2, 2·d_v] as in training.
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < H; ++j) {
      be_.gemm(ctx, {.c = sub(att, (n * H + j) * dv, Shape{1, dv}),
                     .a = sub(lat, (n * h_out + j / comps) * rkv, Shape{1, rkv}),
                     .b = sub(wkv_b, (j * (dn + dv) + dn) * rkv, Shape{dv, rkv}),
                     .trans_b = true});
    }
  }
  Tensor o = att;
  if (c.differential) {  // Ō_h = (1 − λ_init)·RMSNorm_2dv(O_h; subln), eps 1e-5 (docs/model.md §2)
    o = scratch("att_n", Shape{N, H * dv});
    be_.rmsnorm_fwd(ctx, {.y = o,
                          .rstd = scratch("rstd_sub", Shape{N * H / 2}),
                          .x = att,
                          .w = param(attn_param(l, "subln.weight")),
                          .rows = N * H / 2,
                          .width = 2 * dv,
                          .eps = 1e-5,
                          .out_scale = 1.0 - c.lambda_init(l)});
  }
  linear(ctx, h, o, param(attn_param(l, "wo.weight")), /*beta=*/1.0);  // h += concat_h(Ō_h) W_oᵀ
}

void Generator::ffn(Context ctx, int64_t l, int64_t rows) {
  const ModelConfig& c = cfg_;
  const int64_t N = rows, D = c.dim;
  const Tensor h = scratch("h", Shape{N, D}), x_norm = scratch("x_norm", Shape{N, D});
  be_.rmsnorm_fwd(ctx, {.y = x_norm,
                        .rstd = scratch("rstd", Shape{N}),
                        .x = h,
                        .w = param(fmt::format("layers.{}.ffn_norm.weight", l)),
                        .rows = N,
                        .width = D,
                        .eps = c.norm_eps});
  // y += w2(silu(x W1ᵀ) ⊙ x W3ᵀ) on `n` rows of width `width` (docs/model.md §4).
  auto mlp = [&](const Tensor& x, const Tensor& y, int64_t n, int64_t width, const std::string& prefix) {
    const Tensor a = scratch("ffn.a", Shape{n, width}), b = scratch("ffn.b", Shape{n, width}),
                 s = scratch("ffn.h", Shape{n, width});
    linear(ctx, a, x, param(prefix + "w1.weight"));
    linear(ctx, b, x, param(prefix + "w3.weight"));
    be_.swiglu_fwd(ctx, {.h = s, .a = a, .b = b});
    linear(ctx, y, s, param(prefix + "w2.weight"), /*beta=*/1.0);
  };
  if (!c.is_moe_layer(l)) {
    mlp(x_norm, h, N, c.inter_dim, fmt::format("layers.{}.ffn.", l));
    return;
  }
  // MoE (docs/model.md §5), the training path's op sequence: shared experts, router with the balancing bias,
  // dropless permute/gather, grouped expert GEMMs, weighted combine onto the residual.
  if (c.n_shared_experts > 0)
    mlp(x_norm, h, N, c.n_shared_experts * c.moe_inter_dim, fmt::format("layers.{}.ffn.shared.", l));
  const int64_t E = c.n_routed_experts, K = c.n_activated_experts, I = c.moe_inter_dim;
  const Tensor logits = scratch("router.logits", Shape{N, E}), scores = scratch("router.scores", Shape{N, E});
  const Tensor idx = scratch("router.topk_idx", Shape{N, K}), w = scratch("router.topk_w", Shape{N, K});
  // z = u Eᵀ in f32 in every GEMM mode, as in training (docs/model.md §5).
  be_.gemm(ctx,
           {.c = logits, .a = x_norm, .b = param(ffn_param(l, "gate.weight")), .trans_b = true, .f32_exact = true});
  be_.router_fwd(ctx, {.scores = scores,
                       .topk_idx = idx,
                       .topk_w = w,
                       .counts = arena_.get("router.counts"),
                       .logits = logits,
                       .bias = param(ffn_param(l, "gate.bias")),
                       .opt = router_options(c)});
  const Tensor offsets = arena_.get("moe.offsets"), src_row = scratch("moe.src_row", Shape{N * K});
  const Tensor slot_pos = scratch("moe.slot_pos", Shape{N, K});
  const Tensor x_perm = scratch("moe.x_perm", Shape{N * K, D}), y_perm = scratch("moe.y_perm", Shape{N * K, D});
  be_.moe_permute(ctx, {.offsets = offsets, .src_row = src_row, .slot_pos = slot_pos, .topk_idx = idx, .n_experts = E});
  be_.moe_gather(ctx, {.x_perm = x_perm, .x = x_norm, .src_row = src_row});
  const Tensor ea = scratch("ffn.a", Shape{N * K, I}), eb = scratch("ffn.b", Shape{N * K, I}),
               eh = scratch("ffn.h", Shape{N * K, I});
  be_.grouped_gemm(ctx,
                   {.c = ea, .a = x_perm, .b = param(ffn_param(l, "experts.w1")), .offsets = offsets, .trans_b = true});
  be_.grouped_gemm(ctx,
                   {.c = eb, .a = x_perm, .b = param(ffn_param(l, "experts.w3")), .offsets = offsets, .trans_b = true});
  be_.swiglu_fwd(ctx, {.h = eh, .a = ea, .b = eb});
  be_.grouped_gemm(ctx,
                   {.c = y_perm, .a = eh, .b = param(ffn_param(l, "experts.w2")), .offsets = offsets, .trans_b = true});
  be_.moe_combine_fwd(ctx, {.y = h, .y_perm = y_perm, .topk_w = w, .slot_pos = slot_pos});
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
  linear(ctx, arena_.get("logits"), xn, param(cfg_.tie_embeddings ? "embed.weight" : "head.weight"));
}

}  // namespace diffmoe
