#include "model/attention_layer.h"

#include <fmt/format.h>

namespace diffmoe {

MlaKvSplitFwdArgs mla_kv_split_args(const ModelConfig& c, const Tensor& k, const Tensor& v, const Tensor& kv,
                                    const Tensor& kva) {
  const int64_t rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim;
  return {.k = k,
          .v = v,
          .kv = kv,
          .kr = kva,
          .n_heads = c.n_heads,
          .d_nope = c.qk_nope_head_dim,
          .d_rope = dr,
          .d_v = c.v_head_dim,
          .kr_stride = rkv + dr,
          .kr_offset = rkv};
}

std::string AttentionLayer::p(const char* name) const { return fmt::format("layers.{}.attn.{}", l_, name); }
std::string AttentionLayer::a(const char* name) const { return names_.name(name, recomputed(name)); }

void AttentionLayer::plan(const LayerContext& lc, PrecisionPlan& pl, Arena& acts) const {
  const ModelConfig& c = *lc.cfg;
  const int64_t N = lc.tokens(), D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim;
  using R = ActRole;
  // What only GEMMs read (x_norm, c_q, ĉ, Ō): kGemmOperand, rounded once by the norm that writes it.
  // What only the attention core, RoPE and the MLA split touch (q, k, v and their gradients):
  // kAttention. In the bf16 mode q's GEMM writes bf16 and RoPE rotates it in place (its rope
  // columns are rounded twice, as under autocast); W_kvb's GEMM writes kv in bf16 and the split
  // moves it into k, v. Half the bytes, and no rounding inside the attention.
  plan_act(pl, acts, "x_norm", Shape{N, D}, R::kGemmOperand);  // RMSNorm_attn(x)
  plan_act(pl, acts, "rstd_x", Shape{N}, R::kFloat);
  if (rq > 0) {
    plan_act(pl, acts, "qa", Shape{N, rq}, R::kFloat);  // x_norm W_qaᵀ
    plan_act(pl, acts, "rstd_q", Shape{N}, R::kFloat);
    plan_act(pl, acts, "cq", Shape{N, rq}, R::kGemmOperand);  // RMSNorm_q(qa)
  }
  plan_act(pl, acts, "q", Shape{N, H * dqk}, R::kAttention);  // per head [nope ; RoPE(rope)]
  plan_act(pl, acts, "kva", Shape{N, rkv + dr}, R::kFloat);   // [c ; RoPE(k^R)]
  plan_act(pl, acts, "rstd_kv", Shape{N}, R::kFloat);
  plan_act(pl, acts, "ckv", Shape{N, rkv}, R::kGemmOperand);  // ĉ = RMSNorm_kv(c)
  pl.add_once(acts, "scratch.attn.kv", Shape{N, H * (dn + dv)},
              R::kAttention);  // ĉ W_kvbᵀ, per head [k^C ; v]: split at once
  plan_act(pl, acts, "k", Shape{N, H, dqk}, R::kAttention);
  plan_act(pl, acts, "v", Shape{N, H, dv}, R::kAttention);
  plan_act(pl, acts, "att", Shape{N, H * dv}, R::kFloat);  // attention output O (pre-subln when differential)
  plan_act(pl, acts, "lse", Shape{lc.batch, H, lc.seq}, R::kFloat);
  if (c.differential) {
    plan_act(pl, acts, "lambda", Shape{1}, R::kFloat);
    plan_act(pl, acts, "o2", Shape{N, H * dv}, R::kFloat);  // A_{h,1} V_h, for dλ
    plan_act(pl, acts, "rstd_sub", Shape{N * H / 2}, R::kFloat);
    plan_act(pl, acts, "att_n", Shape{N, H * dv}, R::kGemmOperand);  // (1 − λ_init) · RMSNorm_2dv(O)
  }
  // Backward scratch, shared by every attention layer.
  pl.add_once(acts, "scratch.attn.dx_norm", Shape{N, D}, R::kFloat);
  // dq in the dtype of q: written by the attention backward for W_q's GEMMs (RoPE's inverse rotates
  // it in place first), no rounding copy.
  pl.add_once(acts, "scratch.attn.dq", Shape{N, H * dqk}, R::kAttention);
  if (rq > 0) {
    pl.add_once(acts, "scratch.attn.dcq", Shape{N, rq}, R::kFloat);
    pl.add_once(acts, "scratch.attn.dqa", Shape{N, rq}, R::kFloat);
  }
  pl.add_once(acts, "scratch.attn.dkva", Shape{N, rkv + dr}, R::kFloat);
  pl.add_once(acts, "scratch.attn.dckv", Shape{N, rkv}, R::kFloat);
  pl.add_once(acts, "scratch.attn.dkv", Shape{N, H * (dn + dv)},
              R::kGemmOperand);                                           // read by W_kvb's backward GEMMs only
  pl.add_once(acts, "scratch.attn.dk", Shape{N, H, dqk}, R::kAttention);  // read by the split only
  pl.add_once(acts, "scratch.attn.dv", Shape{N, H, dv}, R::kAttention);
  pl.add_once(acts, "scratch.attn.datt", Shape{N, H * dv}, R::kFloat);
  pl.add_once(acts, "scratch.attn.datt_n", Shape{N, H * dv}, R::kFloat);
  pl.add_once(acts, "scratch.attn.dlambda", Shape{1}, R::kFloat);
}

void AttentionLayer::forward(const LayerContext& lc, const Tensor& x, const Tensor& out) const {
  // out = x + concat_h(Ō_h) W_oᵀ: the GEMM reads the residual x as its addend (no copy into out).
  lc.linear(out, forward_core(lc, x), lc.weight(p("wo.weight")), /*beta=*/1.0, /*addend=*/x);
}

Tensor AttentionLayer::forward_core(const LayerContext& lc, const Tensor& x) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  const int64_t N = lc.tokens(), B = lc.batch, T = lc.seq, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim;
  const Tensor x_norm = lc.act(a("x_norm")), q = lc.act(a("q")), kva = lc.act(a("kva")), ckv = lc.act(a("ckv"));
  const Tensor kv = lc.act("scratch.attn.kv"), k = lc.act(a("k")), v = lc.act(a("v")), att = lc.act(a("att"));
  const Tensor cos = lc.act("rope.cos"), sin = lc.act("rope.sin");

  be.rmsnorm_fwd(lc.ctx, {.y = x_norm,
                          .rstd = lc.act(a("rstd_x")),
                          .x = x,
                          .w = lc.param(fmt::format("layers.{}.attn_norm.weight", l_)),
                          .rows = N,
                          .width = c.dim,
                          .eps = c.norm_eps});
  // Queries: c_q = RMSNorm_q(x W_qaᵀ), q = c_q W_qbᵀ (or q = x W_qᵀ without compression), RoPE on
  // the last d_rope columns of every head (docs/model.md §2). The keys' first GEMM [c ; k^R] = x W_kvaᵀ
  // runs beside the queries' first (one FP8 quantisation of x for both).
  if (rq > 0) {
    lc.linear_pair(lc.act(a("qa")), lc.weight(p("wq_a.weight")), kva, lc.weight(p("wkv_a.weight")), x_norm);
    be.rmsnorm_fwd(lc.ctx, {.y = lc.act(a("cq")),
                            .rstd = lc.act(a("rstd_q")),
                            .x = lc.act(a("qa")),
                            .w = lc.param(p("q_norm.weight")),
                            .rows = N,
                            .width = rq,
                            .eps = c.norm_eps});
    lc.linear(q, lc.act(a("cq")), lc.weight(p("wq_b.weight")));
  } else {
    lc.linear_pair(q, lc.weight(p("wq.weight")), kva, lc.weight(p("wkv_a.weight")), x_norm);
  }
  be.rope(lc.ctx, {.x = q,
                   .cos = cos,
                   .sin = sin,
                   .n_heads = H,
                   .head_stride = dqk,
                   .col_offset = dn,
                   .rope_dim = dr,
                   .seq_len = T});
  // Keys and values: [c ; k^R] = x W_kvaᵀ, ĉ = RMSNorm_kv(c), RoPE(k^R) shared by all heads,
  // [k^C_j ; v_j] = ĉ W_kvb,jᵀ, k_j = [k^C_j ; k^R].
  be.rmsnorm_fwd(lc.ctx, {.y = ckv,
                          .rstd = lc.act(a("rstd_kv")),
                          .x = kva,
                          .w = lc.param(p("kv_norm.weight")),
                          .rows = N,
                          .width = rkv,
                          .x_stride = rkv + dr,
                          .y_stride = rkv,
                          .eps = c.norm_eps});
  be.rope(lc.ctx, {.x = kva,
                   .cos = cos,
                   .sin = sin,
                   .n_heads = 1,
                   .head_stride = rkv + dr,
                   .col_offset = rkv,
                   .rope_dim = dr,
                   .seq_len = T});
  lc.linear(kv, ckv, lc.weight(p("wkv_b.weight")));
  // k, v in their planned dtype (bf16: from a bf16 kv, moved exactly).
  be.mla_kv_split_fwd(lc.ctx, mla_kv_split_args(c, k, v, kv, kva));

  const Tensor q4 = q.reshape(Shape{B, T, H, dqk}), k4 = k.reshape(Shape{B, T, H, dqk}),
               v4 = v.reshape(Shape{B, T, H, dv});
  Tensor o = att;  // what W_o reads
  if (c.differential) {
    // λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init;  O_h = A_{h,0}V_h − λ A_{h,1}V_h;
    // Ō_h = (1 − λ_init) · RMSNorm_{2d_v}(O_h; subln) with eps 1e-5 (docs/model.md §2, docs/derivations.md §1.3).
    const Tensor lambda = lc.act(a("lambda"));
    be.diff_lambda_fwd(lc.ctx, {.lambda = lambda,
                                .lq1 = lc.param(p("lambda_q1")),
                                .lk1 = lc.param(p("lambda_k1")),
                                .lq2 = lc.param(p("lambda_q2")),
                                .lk2 = lc.param(p("lambda_k2")),
                                .lambda_init = c.lambda_init(l_)});
    be.attention_fwd(lc.ctx, {.out = att.reshape(Shape{B, T, H / 2, 2 * dv}),
                              .o2 = lc.act(a("o2")).reshape(Shape{B, T, H / 2, 2 * dv}),
                              .lse = lc.act(a("lse")),
                              .q = q4,
                              .k = k4,
                              .v = v4,
                              .lambda = lambda,
                              .scale = c.softmax_scale(),
                              .differential = true});
    o = lc.act(a("att_n"));
    be.rmsnorm_fwd(lc.ctx, {.y = o,
                            .rstd = lc.act(a("rstd_sub")),
                            .x = att,
                            .w = lc.param(p("subln.weight")),
                            .rows = N * H / 2,
                            .width = 2 * dv,
                            .eps = 1e-5,
                            .out_scale = 1.0 - c.lambda_init(l_)});
  } else {
    be.attention_fwd(lc.ctx, {.out = att.reshape(Shape{B, T, H, dv}),
                              .o2 = {},
                              .lse = lc.act(a("lse")),
                              .q = q4,
                              .k = k4,
                              .v = v4,
                              .lambda = {},
                              .scale = c.softmax_scale(),
                              .differential = false});
  }
  return o;
}

void AttentionLayer::backward(const LayerContext& lc, const Tensor& x, const Tensor& d_out,
                              const Tensor& d_out16) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  const int64_t N = lc.tokens(), B = lc.batch, T = lc.seq, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim;
  const Tensor x_norm = lc.act(a("x_norm")), att = lc.act(a("att"));
  const Tensor dx_norm = lc.act("scratch.attn.dx_norm"), dq = lc.act("scratch.attn.dq"),
               dkva = lc.act("scratch.attn.dkva");
  const Tensor dckv = lc.act("scratch.attn.dckv"), dkv = lc.act("scratch.attn.dkv"), dk = lc.act("scratch.attn.dk");
  const Tensor dv_t = lc.act("scratch.attn.dv"), datt = lc.act("scratch.attn.datt");
  const Tensor cos = lc.act("rope.cos"), sin = lc.act("rope.sin");
  // Recompute: this layer's activations into the shared views, bitwise as the forward wrote them.
  if (recompute_) forward_core(lc, x);

  // Output projection: dW_o += d_outᵀ Ō, dŌ = d_out W_o.
  const Tensor o = c.differential ? lc.act(a("att_n")) : att;
  const Tensor d_o = c.differential ? lc.act("scratch.attn.datt_n") : datt;
  lc.linear_backward(lc.grad(p("wo.weight")), d_o, d_out16.defined() ? d_out16 : d_out, o, lc.weight(p("wo.weight")));

  const Tensor q4 = lc.act(a("q")).reshape(Shape{B, T, H, dqk}), k4 = lc.act(a("k")).reshape(Shape{B, T, H, dqk});
  const Tensor v4 = lc.act(a("v")).reshape(Shape{B, T, H, dv});
  const Tensor dq4 = dq.reshape(Shape{B, T, H, dqk}), dk4 = dk.reshape(Shape{B, T, H, dqk}),
               dv4 = dv_t.reshape(Shape{B, T, H, dv});
  if (c.differential) {
    // Through the subln (docs/derivations.md §1.4: dY = (1 − λ_init) dŌ, RMSNorm backward), then attention.
    be.rmsnorm_bwd(lc.ctx, {.dx = datt,
                            .dw = lc.grad(p("subln.weight")),
                            .dy = d_o,
                            .x = att,
                            .w = lc.param(p("subln.weight")),
                            .rstd = lc.act(a("rstd_sub")),
                            .rows = N * H / 2,
                            .width = 2 * dv,
                            .out_scale = 1.0 - c.lambda_init(l_)});
    const Tensor dlambda = lc.act("scratch.attn.dlambda");
    const Shape pair{B, T, H / 2, 2 * dv};
    be.attention_bwd(lc.ctx, {.dq = dq4,
                              .dk = dk4,
                              .dv = dv4,
                              .dlambda = dlambda,
                              .dout = datt.reshape(pair),
                              .q = q4,
                              .k = k4,
                              .v = v4,
                              .out = att.reshape(pair),
                              .o2 = lc.act(a("o2")).reshape(pair),
                              .lse = lc.act(a("lse")),
                              .lambda = lc.act(a("lambda")),
                              .scale = c.softmax_scale(),
                              .differential = true});
    be.diff_lambda_bwd(lc.ctx, {.dlq1 = lc.grad(p("lambda_q1")),
                                .dlk1 = lc.grad(p("lambda_k1")),
                                .dlq2 = lc.grad(p("lambda_q2")),
                                .dlk2 = lc.grad(p("lambda_k2")),
                                .dlambda = dlambda,
                                .lq1 = lc.param(p("lambda_q1")),
                                .lk1 = lc.param(p("lambda_k1")),
                                .lq2 = lc.param(p("lambda_q2")),
                                .lk2 = lc.param(p("lambda_k2"))});
  } else {
    const Shape heads{B, T, H, dv};
    be.attention_bwd(lc.ctx, {.dq = dq4,
                              .dk = dk4,
                              .dv = dv4,
                              .dlambda = {},
                              .dout = datt.reshape(heads),
                              .q = q4,
                              .k = k4,
                              .v = v4,
                              .out = att.reshape(heads),
                              .o2 = {},
                              .lse = lc.act(a("lse")),
                              .lambda = {},
                              .scale = c.softmax_scale(),
                              .differential = false});
  }

  // Keys/values: back through the split (dk^R sums over heads, docs/derivations.md §2.5), W_kvb, RoPE, kv_norm.
  be.mla_kv_split_bwd(lc.ctx, {.dkv = dkv,
                               .dkr = dkva,
                               .dk = dk,
                               .dv = dv_t,
                               .n_heads = H,
                               .d_nope = dn,
                               .d_rope = dr,
                               .d_v = dv,
                               .kr_stride = rkv + dr,
                               .kr_offset = rkv});
  lc.linear_backward(lc.grad(p("wkv_b.weight")), dckv, dkv, lc.act(a("ckv")), lc.weight(p("wkv_b.weight")));
  be.rope(lc.ctx, {.x = dkva,
                   .cos = cos,
                   .sin = sin,
                   .n_heads = 1,
                   .head_stride = rkv + dr,
                   .col_offset = rkv,
                   .rope_dim = dr,
                   .seq_len = T,
                   .inverse = true});
  be.rmsnorm_bwd(lc.ctx, {.dx = dkva,
                          .dw = lc.grad(p("kv_norm.weight")),
                          .dy = dckv,
                          .x = lc.act(a("kva")),
                          .w = lc.param(p("kv_norm.weight")),
                          .rstd = lc.act(a("rstd_kv")),
                          .rows = N,
                          .width = rkv,
                          .x_stride = rkv + dr,
                          .y_stride = rkv});
  // FP8 W_kva and W_qa: their backward runs as one pair below (x_norm's transposed copy quantised once); dkva
  // keeps until then (scratch of its own), and dx_norm gets the two products in this order all the same.
  const Tensor w_kva = lc.weight(p("wkv_a.weight"));
  const bool fp8_pair = rq > 0 && lc.fp8_weight(w_kva) != nullptr && lc.fp8_weight(lc.weight(p("wq_a.weight")));
  if (!fp8_pair) lc.linear_backward(lc.grad(p("wkv_a.weight")), dx_norm, dkva, x_norm, w_kva);

  // Queries: inverse RoPE on dq, then W_qb, q_norm, W_qa (or W_q).
  be.rope(lc.ctx, {.x = dq,
                   .cos = cos,
                   .sin = sin,
                   .n_heads = H,
                   .head_stride = dqk,
                   .col_offset = dn,
                   .rope_dim = dr,
                   .seq_len = T,
                   .inverse = true});
  if (rq > 0) {
    const Tensor dcq = lc.act("scratch.attn.dcq"), dqa = lc.act("scratch.attn.dqa");
    lc.linear_backward(lc.grad(p("wq_b.weight")), dcq, dq, lc.act(a("cq")), lc.weight(p("wq_b.weight")));
    // The bf16 GEMM mode: the norm also writes dqa rounded once for W_qa's two GEMMs (no copy).
    const Tensor dqa16 = lc.bf16_operands ? lc.operand_scratch(dqa.shape) : Tensor{};
    be.rmsnorm_bwd(lc.ctx, {.dx = dqa,
                            .dw = lc.grad(p("q_norm.weight")),
                            .dy = dcq,
                            .x = lc.act(a("qa")),
                            .w = lc.param(p("q_norm.weight")),
                            .rstd = lc.act(a("rstd_q")),
                            .rows = N,
                            .width = rq,
                            .dx16 = dqa16});
    if (fp8_pair) {
      lc.linear_backward_pair(lc.grad(p("wkv_a.weight")), dkva, w_kva, lc.grad(p("wq_a.weight")),
                              dqa16.defined() ? dqa16 : dqa, lc.weight(p("wq_a.weight")), dx_norm, x_norm);
    } else {
      lc.linear_backward(lc.grad(p("wq_a.weight")), dx_norm, dqa16.defined() ? dqa16 : dqa, x_norm,
                         lc.weight(p("wq_a.weight")),
                         /*beta_dx=*/1.0);
    }
  } else {
    lc.linear_backward(lc.grad(p("wq.weight")), dx_norm, dq, x_norm, lc.weight(p("wq.weight")), /*beta_dx=*/1.0);
  }
  // Pre-norm: the residual stream's gradient gains RMSNorm_attn's backward.
  const std::string norm = fmt::format("layers.{}.attn_norm.weight", l_);
  be.rmsnorm_bwd(lc.ctx, {.dx = d_out,
                          .dw = lc.grad(norm),
                          .dy = dx_norm,
                          .x = x,
                          .w = lc.param(norm),
                          .rstd = lc.act(a("rstd_x")),
                          .rows = N,
                          .width = c.dim,
                          .dx_accumulate = true,
                          .dx16 = d_out16});
}

}  // namespace diffmoe
