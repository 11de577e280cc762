// The engine's layers over the packed rows of a step (engine.h has the math; docs/model.md §2, §4, §5;
// docs/derivations.md §2.4, §3.3 for the absorbed attention). The op sequence is model/generator.cpp's with
// three changes for a packed batch: RoPE reads each row's position (RopeArgs::positions), the cache
// rows go to their pool slots (paged_cache_write) and the attention reads keys through block tables
// (paged_latent_attention); and the per-(token, head) absorption GEMMs become one grouped GEMM per
// projection over head-major rows (moe_gather as the row permutation), which only reorders sums.
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "model/router_options.h"
#include "serve/engine.h"
#include "serve/engine_plan.h"

namespace diffmoe::serve {

namespace {

std::string attn_param(int64_t l, const char* name) { return fmt::format("layers.{}.attn.{}", l, name); }
std::string ffn_param(int64_t l, const char* name) { return fmt::format("layers.{}.ffn.{}", l, name); }

}  // namespace

// W_kvb [H·(d_nope + d_v), r_kv] holds per component j the rows [W^UK_j (d_nope) ; W^UV_j (d_v)]. The
// absorption multiplies the full query [q^C_j ; q^R_j] (d_qk wide) by [W^UK_j ; 0]: the zero rows
// add exact zeros, so q̃_j = q^C_j W^UK_j without copying q^C out of q. The up-projection of value
// group h stacks its components' W^UV: [W^UV_2h ; W^UV_2h+1] (differential) or W^UV_h (plain).
// Elements are moved as they are (any compute dtype), on the host, once.
void Engine::refresh_weights() {
  const ModelConfig& c = cfg_;
  const int64_t H = c.n_heads, dn = c.qk_nope_head_dim, dqk = c.d_qk(), dv = c.v_head_dim, rkv = c.kv_lora_rank;
  const int64_t comps = c.differential ? 2 : 1;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const Tensor wkv_b = param(attn_param(l, "wkv_b.weight"));
    const Tensor w_uk = arena_.get(fmt::format("w_uk.{}", l)), w_uv = arena_.get(fmt::format("w_uv.{}", l));
    DIFFMOE_CHECK(wkv_b.dtype == w_uk.dtype, "[engine] layer {} wkv_b is {}, layer 0's is {}", l,
                  dtype_name(wkv_b.dtype), dtype_name(w_uk.dtype));
    const size_t es = dtype_size(wkv_b.dtype), row = static_cast<size_t>(rkv) * es;
    std::vector<char> src(wkv_b.nbytes()), uk(w_uk.nbytes(), 0), uv(w_uv.nbytes(), 0);
    be_.download(src.data(), wkv_b);
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t i = 0; i < dn; ++i)
        std::copy_n(src.data() + (j * (dn + dv) + i) * row, row, uk.data() + (j * dqk + i) * row);
      for (int64_t i = 0; i < dv; ++i)  // group j / comps, rows (j % comps)·d_v + i
        std::copy_n(src.data() + (j * (dn + dv) + dn + i) * row, row,
                    uv.data() + ((j / comps) * comps * dv + (j % comps) * dv + i) * row);
    }
    be_.upload(w_uk, uk.data());
    be_.upload(w_uv, uv.data());
  }
  quantize_weights();
}

void Engine::attention(Context ctx, int64_t l, const StepPlan& p) {
  const ModelConfig& c = cfg_;
  const int64_t N = p.N, D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim;
  const int64_t comps = c.differential ? 2 : 1, h_out = H / comps;
  const Tensor h = scratch("h", Shape{N, D}), x_norm = scratch("x_norm", Shape{N, D}), rstd = scratch("rstd", Shape{N});
  const Tensor q = scratch("q", Shape{N, H * dqk}), kva = scratch("kva", Shape{N, rkv + dr});
  const Tensor kv_rows = scratch("kv_rows", Shape{N, rkv + dr});
  const Tensor cos = arena_.get("rope.cos"), sin = arena_.get("rope.sin");

  be_.rmsnorm_fwd(ctx, {.y = x_norm,
                        .rstd = rstd,
                        .x = h,
                        .w = param(fmt::format("layers.{}.attn_norm.weight", l)),
                        .rows = N,
                        .width = D,
                        .eps = c.norm_eps});
  // Queries (docs/model.md §2), RoPE on each head's rope columns at each row's own position.
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
                 .positions = p.positions});
  // The new cache rows: [c ; k^R] = x̄ W_kvaᵀ, k^R rotated, ĉ = RMSNorm_kv(c) over the latent columns
  // of the copied rows (a strided norm), then scattered to the rows' pool slots.
  linear(ctx, kva, x_norm, param(attn_param(l, "wkv_a.weight")));
  be_.rope(ctx, {.x = kva,
                 .cos = cos,
                 .sin = sin,
                 .n_heads = 1,
                 .head_stride = rkv + dr,
                 .col_offset = rkv,
                 .rope_dim = dr,
                 .positions = p.positions});
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
  be_.paged_cache_write(ctx, {.cache = cache_.layer(l), .rows = kv_rows, .slots = p.slots});
  // Absorb W^UK into the query (docs/derivations.md §2.4): head-major rows, one grouped GEMM over the heads.
  const Tensor q_hm = scratch("q_hm", Shape{H * N, dqk}), q_lat = scratch("q_lat", Shape{H * N, rkv});
  be_.moe_gather(ctx, {.x_perm = q_hm, .x = q.reshape(Shape{N * H, dqk}), .src_row = p.perm_q});
  be_.grouped_gemm(
      ctx,
      {.c = q_lat, .a = q_hm, .b = arena_.get(fmt::format("w_uk.{}", l)), .offsets = p.offsets_h, .trans_b = false});
  // MQA over the paged cache; differential: L_h = A_{h,0}ĉ − λ A_{h,1}ĉ (docs/derivations.md §3.3).
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
  const Tensor lat = scratch("lat", Shape{h_out, N, rkv});
  be_.paged_latent_attention(ctx, {.out = lat,
                                   .q_lat = q_lat.reshape(Shape{H, N, rkv}),
                                   .q_rope = q.reshape(Shape{N, H, dqk}),
                                   .cache = cache_.layer(l),
                                   .lambda = lambda,
                                   .block_table = p.block_table,
                                   .kv_lens = p.kv_lens,
                                   .q_offsets = p.q_offsets,
                                   .q_rope_offset = dn,
                                   .scale = c.softmax_scale(),
                                   .differential = c.differential});
  // Up-project with W^UV (docs/derivations.md §3.3): O_h = [L_h W^UVᵀ_2h ; L_h W^UVᵀ_2h+1], one grouped GEMM over
  // the value groups, then back to token-major [N, H/2, 2·d_v] (the training layout).
  const Tensor att_hm = scratch("att_hm", Shape{h_out * N, comps * dv}),
               att = scratch("att", Shape{N * h_out, comps * dv});
  be_.grouped_gemm(ctx, {.c = att_hm,
                         .a = lat.reshape(Shape{h_out * N, rkv}),
                         .b = arena_.get(fmt::format("w_uv.{}", l)),
                         .offsets = p.offsets_o,
                         .trans_b = true});
  Tensor o = att_hm;
  if (c.differential) {  // Ō_h = (1 − λ_init)·RMSNorm_2dv(O_h; subln), eps 1e-5 (docs/model.md §2): per row, any row
                         // order
    o = scratch("att_n_hm", Shape{h_out * N, comps * dv});
    be_.rmsnorm_fwd(ctx, {.y = o,
                          .rstd = scratch("rstd_sub", Shape{h_out * N}),
                          .x = att_hm,
                          .w = param(attn_param(l, "subln.weight")),
                          .rows = h_out * N,
                          .width = 2 * dv,
                          .eps = 1e-5,
                          .out_scale = 1.0 - c.lambda_init(l)});
  }
  be_.moe_gather(ctx, {.x_perm = att, .x = o, .src_row = p.perm_o});
  linear(ctx, h, att.reshape(Shape{N, H * dv}), param(attn_param(l, "wo.weight")),
         /*beta=*/1.0);  // h += concat_h(Ō_h) W_oᵀ
}

void Engine::ffn(Context ctx, int64_t l, const StepPlan& p) {
  const ModelConfig& c = cfg_;
  const int64_t N = p.N, D = c.dim;
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
  // MoE (docs/model.md §5): shared experts, router with the balancing bias, dropless permute/gather, grouped
  // expert GEMMs (an expert no row was routed to is an empty group: its weights are not read),
  // weighted combine onto the residual.
  if (c.n_shared_experts > 0)
    mlp(x_norm, h, N, c.n_shared_experts * c.moe_inter_dim, fmt::format("layers.{}.ffn.shared.", l));
  const int64_t E = c.n_routed_experts, K = c.n_activated_experts, I = c.moe_inter_dim;
  const Tensor logits = scratch("router.logits", Shape{N, E}), scores = scratch("router.scores", Shape{N, E});
  const Tensor idx = scratch("router.topk_idx", Shape{N, K}), w = scratch("router.topk_w", Shape{N, K});
  be_.gemm(ctx,
           {.c = logits, .a = x_norm, .b = param(ffn_param(l, "gate.weight")), .trans_b = true, .f32_exact = true});
  be_.router_fwd(ctx, {.scores = scores,
                       .topk_idx = idx,
                       .topk_w = w,
                       .counts = expert_counts(l),
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

}  // namespace diffmoe::serve
