#include "model/decode_layers.h"

#include <fmt/format.h>

#include <algorithm>

#include "model/router_options.h"

namespace diffmoe {

std::string attn_param(int64_t l, const char* name) { return fmt::format("layers.{}.attn.{}", l, name); }
std::string ffn_param(int64_t l, const char* name) { return fmt::format("layers.{}.ffn.{}", l, name); }

Tensor arena_prefix(const Arena& arena, const char* name, Shape shape) {
  const Tensor t = arena.get(name);
  DIFFMOE_CHECK(shape.numel() <= t.numel(), "[decode] {} values of scratch {} exceed its {}", shape.numel(), name,
                t.numel());
  return Tensor{.data = t.data, .dtype = t.dtype, .device = t.device, .shape = shape};
}

void plan_decode_scratch(Arena& arena, const ModelConfig& c, int64_t rows, int64_t positions, DType t) {
  const int64_t R = rows, D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim;
  const int64_t rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim, rq = c.q_lora_rank;
  const int64_t h_out = c.differential ? H / 2 : H;
  const bool any_moe = c.n_layers > c.n_dense_layers;
  const int64_t K = c.n_activated_experts, E = c.n_routed_experts;
  arena.add("rope.cos", Shape{positions, dr / 2}, t);
  arena.add("rope.sin", Shape{positions, dr / 2}, t);
  arena.add("h", Shape{R * D}, t);  // the residual stream
  arena.add("x_norm", Shape{R * D}, t);
  arena.add("rstd", Shape{R}, t);
  if (rq > 0) {
    arena.add("qa", Shape{R * rq}, t);
    arena.add("cq", Shape{R * rq}, t);
  }
  arena.add("q", Shape{R * H * dqk}, t);           // [N, H, d_qk] token-major, per head [q^C ; RoPE(q^R)]
  arena.add("kva", Shape{R * (rkv + dr)}, t);      // x̄ W_kvaᵀ = [c ; k^R], RoPE on k^R
  arena.add("kv_rows", Shape{R * (rkv + dr)}, t);  // [ĉ ; RoPE(k^R)] for the cache
  arena.add("q_lat", Shape{H * R * rkv}, t);       // q̃, H·N rows of r_kv
  arena.add("lat", Shape{h_out * R * rkv}, t);     // L, H_out·N rows of r_kv
  arena.add("att", Shape{R * H * dv}, t);          // O [N, H, d_v] = [N, H/2, 2·d_v]
  if (c.differential) {
    arena.add("att_n", Shape{R * H * dv}, t);  // (1 − λ_init)·RMSNorm_2dv(O)
    arena.add("rstd_sub", Shape{R * h_out}, t);
    arena.add("lambda", Shape{1}, t);
  }
  // SwiGLU a, b, h: the widest of the dense MLP, the shared experts and the routed experts' rows.
  int64_t mlp = R * c.inter_dim;
  if (any_moe) mlp = std::max({mlp, R * c.n_shared_experts * c.moe_inter_dim, R * K * c.moe_inter_dim});
  for (const char* name : {"ffn.a", "ffn.b", "ffn.h"}) arena.add(name, Shape{mlp}, t);
  if (any_moe) {
    arena.add("router.logits", Shape{R * E}, t);
    arena.add("router.scores", Shape{R * E}, t);
    arena.add("router.topk_idx", Shape{R * K}, DType::kI32);
    arena.add("router.topk_w", Shape{R * K}, t);
    arena.add("moe.offsets", Shape{E + 1}, DType::kI32);
    arena.add("moe.src_row", Shape{R * K}, DType::kI32);
    arena.add("moe.slot_pos", Shape{R * K}, DType::kI32);
    arena.add("moe.x_perm", Shape{R * K * D}, t);
    arena.add("moe.y_perm", Shape{R * K * D}, t);
  }
}

DecodeLayers::DecodeLayers(Model& model, const Arena& scratch, DecodeOps& ops)
    : model_(model), cfg_(model.config()), be_(model.backend()), arena_(scratch), ops_(ops) {}

void DecodeLayers::attention(Context ctx, int64_t l, const DecodeRows& rows) {
  const ModelConfig& c = cfg_;
  const int64_t N = rows.n, D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim;
  const Tensor h = scratch("h", Shape{N, D}), x_norm = scratch("x_norm", Shape{N, D}), rstd = scratch("rstd", Shape{N});
  const Tensor q = scratch("q", Shape{N, H * dqk}), kva = scratch("kva", Shape{N, rkv + dr});
  const Tensor kv_rows = scratch("kv_rows", Shape{N, rkv + dr}), att = scratch("att", Shape{N, H * dv});
  // RoPE on `heads` heads of x, `stride` apart, at columns col … col + d_rope of each, at the rows' positions.
  const auto rope = [&](const Tensor& x, int64_t heads, int64_t stride, int64_t col) {
    be_.rope(ctx, {.x = x,
                   .cos = arena_.get("rope.cos"),
                   .sin = arena_.get("rope.sin"),
                   .n_heads = heads,
                   .head_stride = stride,
                   .col_offset = col,
                   .rope_dim = dr,
                   .seq_len = rows.seq_len,
                   .pos_offset = rows.pos_offset,
                   .positions = rows.positions});
  };

  rmsnorm(ctx, x_norm, h, fmt::format("layers.{}.attn_norm.weight", l));
  // Queries (docs/model.md §2): c_q = RMSNorm_q(x̄ W_qaᵀ), q = c_q W_qbᵀ (or x̄ W_qᵀ); then RoPE on the rope
  // columns of each head.
  if (rq > 0) {
    const Tensor qa = scratch("qa", Shape{N, rq}), cq = scratch("cq", Shape{N, rq});
    ops_.linear(ctx, qa, x_norm, param(attn_param(l, "wq_a.weight")), 0.0);
    rmsnorm(ctx, cq, qa, attn_param(l, "q_norm.weight"));
    ops_.linear(ctx, q, cq, param(attn_param(l, "wq_b.weight")), 0.0);
  } else {
    ops_.linear(ctx, q, x_norm, param(attn_param(l, "wq.weight")), 0.0);
  }
  rope(q, H, dqk, dn);
  // The new cache rows: [c ; k^R] = x̄ W_kvaᵀ, k^R rotated, then ĉ = RMSNorm_kv(c) over the latent columns of
  // the copied rows (a strided norm, x and y rows r_kv + d_rope apart).
  ops_.linear(ctx, kva, x_norm, param(attn_param(l, "wkv_a.weight")), 0.0);
  rope(kva, 1, rkv + dr, rkv);
  be_.copy(ctx, {.dst = kv_rows, .src = kva});
  be_.rmsnorm_fwd(ctx, {.y = kv_rows,
                        .rstd = rstd,
                        .x = kva,
                        .w = param(attn_param(l, "kv_norm.weight")),
                        .rows = N,
                        .width = rkv,
                        .x_stride = rkv + dr,
                        .y_stride = rkv + dr,
                        .eps = c.norm_eps});
  ops_.write_cache(ctx, l, rows, kv_rows);
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
  ops_.attend(ctx, l, rows, {.att = att, .q = q, .lambda = lambda, .kva = kva});
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
  ops_.linear(ctx, h, o, param(attn_param(l, "wo.weight")), /*beta=*/1.0);  // h += concat_h(Ō_h) W_oᵀ
}

void DecodeLayers::rmsnorm(Context ctx, const Tensor& y, const Tensor& x, const std::string& weight) {
  const int64_t rows = x.dim(0);
  be_.rmsnorm_fwd(ctx, {.y = y,
                        .rstd = scratch("rstd", Shape{rows}),
                        .x = x,
                        .w = param(weight),
                        .rows = rows,
                        .width = x.dim(1),
                        .eps = cfg_.norm_eps});
}

void DecodeLayers::mlp(Context ctx, const Tensor& y, const Tensor& x, int64_t n, int64_t width,
                       const std::string& prefix) {
  const Tensor a = scratch("ffn.a", Shape{n, width}), b = scratch("ffn.b", Shape{n, width}),
               s = scratch("ffn.h", Shape{n, width});
  ops_.linear(ctx, a, x, param(prefix + "w1.weight"), 0.0);
  ops_.linear(ctx, b, x, param(prefix + "w3.weight"), 0.0);
  be_.swiglu_fwd(ctx, {.h = s, .a = a, .b = b});
  ops_.linear(ctx, y, s, param(prefix + "w2.weight"), /*beta=*/1.0);
}

void DecodeLayers::ffn(Context ctx, int64_t l, int64_t n, const Tensor& expert_counts) {
  const ModelConfig& c = cfg_;
  const int64_t N = n, D = c.dim;
  const Tensor h = scratch("h", Shape{N, D}), x_norm = scratch("x_norm", Shape{N, D});
  rmsnorm(ctx, x_norm, h, fmt::format("layers.{}.ffn_norm.weight", l));
  if (!c.is_moe_layer(l)) {
    mlp(ctx, h, x_norm, N, c.inter_dim, fmt::format("layers.{}.ffn.", l));
    return;
  }
  // MoE (docs/model.md §5), the training path's op sequence: shared experts, router with the balancing bias,
  // dropless permute/gather, grouped expert GEMMs (an expert no row was routed to is an empty group: its
  // weights are not read), weighted combine onto the residual.
  if (c.n_shared_experts > 0)
    mlp(ctx, h, x_norm, N, c.n_shared_experts * c.moe_inter_dim, fmt::format("layers.{}.ffn.shared.", l));
  const int64_t E = c.n_routed_experts, K = c.n_activated_experts, I = c.moe_inter_dim;
  const Tensor logits = scratch("router.logits", Shape{N, E}), scores = scratch("router.scores", Shape{N, E});
  const Tensor idx = scratch("router.topk_idx", Shape{N, K}), w = scratch("router.topk_w", Shape{N, K});
  // z = u Eᵀ in f32 in every GEMM mode, as in training (docs/model.md §5).
  be_.gemm(ctx,
           {.c = logits, .a = x_norm, .b = param(ffn_param(l, "gate.weight")), .trans_b = true, .f32_exact = true});
  be_.router_fwd(ctx, {.scores = scores,
                       .topk_idx = idx,
                       .topk_w = w,
                       .counts = expert_counts,
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
  // A token picks an expert at most once: no group has more than N rows (GroupedGemmArgs::max_group_rows).
  const auto experts = [&](const Tensor& y, const Tensor& x, const char* w) {
    be_.grouped_gemm(
        ctx, {.c = y, .a = x, .b = param(ffn_param(l, w)), .offsets = offsets, .trans_b = true, .max_group_rows = N});
  };
  experts(ea, x_perm, "experts.w1");
  experts(eb, x_perm, "experts.w3");
  be_.swiglu_fwd(ctx, {.h = eh, .a = ea, .b = eb});
  experts(y_perm, eh, "experts.w2");
  be_.moe_combine_fwd(ctx, {.y = h, .y_perm = y_perm, .topk_w = w, .slot_pos = slot_pos});
}

}  // namespace diffmoe
