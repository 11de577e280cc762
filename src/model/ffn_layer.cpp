#include "model/ffn_layer.h"

#include <fmt/format.h>

namespace diffmoe {

std::string FfnLayer::p(const std::string& name) const { return fmt::format("layers.{}.ffn.{}", l_, name); }
std::string FfnLayer::a(const std::string& name) const { return names_.name(name, recomputed(name)); }

// moe: the experts' SwiGLU intermediates. full: everything but the routing (model/recompute.h);
// with expert parallelism also the pairs sent (ep.*), the rest of its plan lives in ExpertBuffers.
bool FfnLayer::recomputed(std::string_view name) const {
  switch (recompute_) {
    case Recompute::kMoe: return name == "experts.a" || name == "experts.b" || name == "experts.h";
    case Recompute::kFull:
      for (const char* kept :
           {"scores", "topk_idx", "topk_w", "offsets", "src_row", "slot_pos", "ep.pair_token", "ep.pair_of"})
        if (name == kept) return false;
      return true;
    case Recompute::kNone:
    case Recompute::kAttention: return false;
  }
  return false;
}

void FfnLayer::plan(const LayerContext& lc, PrecisionPlan& pl, Arena& acts) const {
  const ModelConfig& c = *lc.cfg;
  const int64_t N = lc.tokens(), D = c.dim;
  using R = ActRole;
  plan_act(pl, acts, "x_norm", Shape{N, D}, R::kFloat);  // the router's input: z = u Eᵀ stays f32 (docs/model.md §5)
  plan_act(pl, acts, "rstd_x", Shape{N}, R::kFloat);
  // The bf16 mode: x_norm rounded once (by the norm, in the same pass) for the GEMMs that read it
  // (w1/w3 of the dense FFN or the shared experts, their weight gradients, the router's weight
  // gradient) and for the gather into x_perm (the same rounded values, half the bytes read).
  if (pl.bf16_gemm()) plan_act(pl, acts, "x_norm16", Shape{N, D}, R::kGemmOperand);
  pl.add_once(acts, "scratch.ffn.dx_norm", Shape{N, D}, R::kFloat);
  // h, da, db, x_perm, dy_perm are only read by GEMMs (kGemmOperand): the op that writes them rounds
  // once. a, b, dh of every SwiGLU MLP and the experts' y_perm, dx_perm are written by GEMMs and read
  // by element-wise ops only (kGemmOutput): the GEMM's epilogue rounds once, as autocast's bf16 matmul
  // outputs, halving the bytes the SwiGLU, combine and gather kernels move.
  auto plan_mlp = [&](const std::string& pre, int64_t rows, int64_t width) {
    plan_act(pl, acts, pre + "a", Shape{rows, width}, R::kGemmOutput);   // x W1ᵀ
    plan_act(pl, acts, pre + "b", Shape{rows, width}, R::kGemmOutput);   // x W3ᵀ
    plan_act(pl, acts, pre + "h", Shape{rows, width}, R::kGemmOperand);  // silu(a) ⊙ b
    const std::string s = fmt::format("scratch.ffn.{}{}.", pre, width);
    pl.add_once(acts, s + "dh", Shape{rows, width}, R::kGemmOutput);
    pl.add_once(acts, s + "da", Shape{rows, width}, R::kGemmOperand);
    pl.add_once(acts, s + "db", Shape{rows, width}, R::kGemmOperand);
  };
  if (!moe(lc)) {
    plan_mlp("", N, c.inter_dim);
    return;
  }
  const int64_t E = c.n_routed_experts, K = c.n_activated_experts, NK = N * K;
  if (c.n_shared_experts > 0) plan_mlp("shared.", N, c.n_shared_experts * c.moe_inter_dim);
  plan_act(pl, acts, "logits", Shape{N, E}, R::kFloat);  // router logits z = u Eᵀ
  plan_act(pl, acts, "scores", Shape{N, E}, R::kFloat);  // s
  plan_act(pl, acts, "topk_idx", Shape{N, K}, R::kIndex);
  plan_act(pl, acts, "topk_w", Shape{N, K}, R::kFloat);
  pl.add(acts, fmt::format("stats.{}.counts", l_), Shape{E}, R::kIndex);
  pl.add_once(acts, "scratch.moe.dtopk_w", Shape{N, K}, R::kFloat);
  pl.add_once(acts, "scratch.moe.dlogits", Shape{N, E}, R::kFloat);
  if (expert_parallel(lc)) {  // the expert rows live in ExpertBuffers, sized by the routing
    plan_ep(lc, pl, acts);
    return;
  }
  plan_act(pl, acts, "offsets", Shape{E + 1}, R::kIndex);
  plan_act(pl, acts, "src_row", Shape{NK}, R::kIndex);
  plan_act(pl, acts, "slot_pos", Shape{N, K}, R::kIndex);
  plan_act(pl, acts, "x_perm", Shape{NK, D}, R::kGemmOperand);  // token rows sorted by expert
  plan_act(pl, acts, "y_perm", Shape{NK, D}, R::kGemmOutput);   // expert outputs, same order
  plan_mlp("experts.", NK, c.moe_inter_dim);
  pl.add_once(acts, "scratch.moe.dy_perm", Shape{NK, D}, R::kGemmOperand);
  pl.add_once(acts, "scratch.moe.dx_perm", Shape{NK, D}, R::kGemmOutput);
}

// What the GEMMs read of x_norm: its bf16 copy in the bf16 GEMM mode, else x_norm itself.
Tensor FfnLayer::gemm_input(const LayerContext& lc) const {
  return lc.act(a(lc.bf16_operands ? "x_norm16" : "x_norm"));
}

void FfnLayer::norm_forward(const LayerContext& lc, const Tensor& x) const {
  const std::string norm = fmt::format("layers.{}.ffn_norm.weight", l_);
  // The bf16 GEMM mode: the norm also writes x_norm rounded once for the GEMMs (x_norm16).
  lc.be->rmsnorm_fwd(lc.ctx, {.y = lc.act(a("x_norm")),
                              .rstd = lc.act(a("rstd_x")),
                              .x = x,
                              .w = lc.param(norm),
                              .rows = lc.tokens(),
                              .width = lc.cfg->dim,
                              .eps = lc.cfg->norm_eps,
                              .y16 = lc.bf16_operands ? gemm_input(lc) : Tensor{}});
}

void FfnLayer::mlp_hidden(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix,
                          const Tensor& x) const {
  const Tensor ta = lc.act(a(act_prefix + "a")), tb = lc.act(a(act_prefix + "b")), th = lc.act(a(act_prefix + "h"));
  lc.linear_pair(ta, lc.weight(p(prefix + "w1.weight")), tb, lc.weight(p(prefix + "w3.weight")), x);
  lc.be->swiglu_fwd(lc.ctx, {.h = th, .a = ta, .b = tb});
}

void FfnLayer::mlp_forward(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix,
                           const Tensor& x, const Tensor& y, const Tensor& residual) const {
  mlp_hidden(lc, prefix, act_prefix, x);
  lc.linear(y, lc.act(a(act_prefix + "h")), lc.weight(p(prefix + "w2.weight")), /*beta=*/1.0, /*addend=*/residual);
}

void FfnLayer::dispatch(const LayerContext& lc, const Tensor& xg, const Tensor& x_perm) const {
  // xg: in the bf16 mode the rounded copy (fewer bytes read).
  lc.be->moe_gather(lc.ctx, {.x_perm = x_perm, .x = xg, .src_row = lc.act(a("src_row"))});
}

void FfnLayer::expert_hidden(const LayerContext& lc, const Tensor& x_perm) const {
  Backend& be = *lc.be;
  const Tensor offsets = lc.act(a("offsets"));
  const Tensor ea = lc.act(a("experts.a")), eb = lc.act(a("experts.b")), eh = lc.act(a("experts.h"));
  lc.grouped_gemm_pair({.c = ea, .a = x_perm, .b = lc.weight(p("experts.w1")), .offsets = offsets, .trans_b = true},
                       {.c = eb, .a = x_perm, .b = lc.weight(p("experts.w3")), .offsets = offsets, .trans_b = true});
  be.swiglu_fwd(lc.ctx, {.h = eh, .a = ea, .b = eb});
}

void FfnLayer::expert_output(const LayerContext& lc, const Tensor& y_perm) const {
  lc.grouped_gemm({.c = y_perm,
                   .a = lc.act(a("experts.h")),
                   .b = lc.weight(p("experts.w2")),
                   .offsets = lc.act(a("offsets")),
                   .trans_b = true});
}

void FfnLayer::recompute(const LayerContext& lc, const Tensor& x) const {
  if (recompute_ == Recompute::kMoe && moe(lc)) {
    // From the kept rows; y_perm is kept too. With expert parallelism: this rank's received rows.
    if (expert_parallel(lc)) recompute_ep(lc, Tensor{});
    else expert_hidden(lc, lc.act(a("x_perm")));
    return;
  }
  if (recompute_ != Recompute::kFull) return;
  norm_forward(lc, x);
  const Tensor xg = gemm_input(lc);
  if (!moe(lc)) {
    mlp_hidden(lc, "", "", xg);  // W2's output went into the residual stream: not needed
    return;
  }
  if (expert_parallel(lc)) {  // the shared experts run there, during the dispatch
    recompute_ep(lc, xg);
    return;
  }
  if (lc.cfg->n_shared_experts > 0) mlp_hidden(lc, "shared.", "shared.", xg);
  // The routing is kept (model/recompute.h): the rows are gathered by the forward's plan.
  const Tensor x_perm = lc.act(a("x_perm"));
  dispatch(lc, xg, x_perm);
  expert_hidden(lc, x_perm);
  expert_output(lc, lc.act(a("y_perm")));  // ⟨dy, y_perm⟩ gives the routing weights' gradient
}

void FfnLayer::mlp_backward(const LayerContext& lc, const std::string& prefix, const std::string& act_prefix,
                            const Tensor& x, const Tensor& dy, const Tensor& dx, double beta_dx) const {
  const Tensor ta = lc.act(a(act_prefix + "a")), tb = lc.act(a(act_prefix + "b")), th = lc.act(a(act_prefix + "h"));
  const std::string s = fmt::format("scratch.ffn.{}{}.", act_prefix, ta.dim(1));
  const Tensor dh = lc.act(s + "dh"), da = lc.act(s + "da"), db = lc.act(s + "db");
  lc.linear_backward(lc.grad(p(prefix + "w2.weight")), dh, dy, th, lc.weight(p(prefix + "w2.weight")));
  lc.be->swiglu_bwd(lc.ctx, {.da = da, .db = db, .dh = dh, .a = ta, .b = tb});
  lc.linear_backward_pair(lc.grad(p(prefix + "w1.weight")), da, lc.weight(p(prefix + "w1.weight")),
                          lc.grad(p(prefix + "w3.weight")), db, lc.weight(p(prefix + "w3.weight")), dx, x, beta_dx);
}

void FfnLayer::forward(const LayerContext& lc, const Tensor& x, const Tensor& out) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  const Tensor x_norm = lc.act(a("x_norm"));
  norm_forward(lc, x);
  const Tensor xg = gemm_input(lc);
  // Residual: out = x + FFN(...). The first GEMM that writes out (the dense FFN's or the shared
  // experts' w2) reads x as its addend; without shared experts the combine adds onto a copy of x.
  if (!moe(lc)) {
    mlp_forward(lc, "", "", xg, out, x);
    return;
  }
  if (expert_parallel(lc)) {
    forward_ep(lc, x, out);
    return;
  }
  // Shared experts: one SwiGLU of width n_shared·moe_inter_dim (docs/model.md §4).
  if (c.n_shared_experts > 0) mlp_forward(lc, "shared.", "shared.", xg, out, x);
  else be.copy(lc.ctx, {.dst = out, .src = x});
  // Router (docs/model.md §5): z = u Eᵀ, scores, group-limited top-k with the balancing bias.
  const Tensor logits = lc.act(a("logits")), scores = lc.act(a("scores")), idx = lc.act(a("topk_idx")),
               w = lc.act(a("topk_w"));
  const Tensor counts = lc.act(fmt::format("stats.{}.counts", l_));
  // z = u Eᵀ in f32 also in the bf16 GEMM mode (docs/model.md §5): the expert choice depends on it.
  be.gemm(lc.ctx, {.c = logits, .a = x_norm, .b = lc.param(p("gate.weight")), .trans_b = true, .f32_exact = true});
  be.router_fwd(lc.ctx, {.scores = scores,
                         .topk_idx = idx,
                         .topk_w = w,
                         .counts = counts,
                         .logits = logits,
                         .bias = lc.param(p("gate.bias")),
                         .opt = router_options(c)});
  if (c.aux_loss_alpha > 0)
    be.aux_loss_fwd(lc.ctx, {.loss = lc.act("loss.aux"),
                             .scores = scores,
                             .seq_len = lc.seq,
                             .top_k = c.n_activated_experts,
                             .alpha = c.aux_loss_alpha,
                             .score_func = c.score_func});
  // Dropless dispatch: sort (token, slot) pairs by expert, gather rows, grouped expert GEMMs.
  const Tensor offsets = lc.act(a("offsets")), src_row = lc.act(a("src_row")), slot_pos = lc.act(a("slot_pos"));
  const Tensor x_perm = lc.act(a("x_perm")), y_perm = lc.act(a("y_perm"));
  be.moe_permute(
      lc.ctx,
      {.offsets = offsets, .src_row = src_row, .slot_pos = slot_pos, .topk_idx = idx, .n_experts = c.n_routed_experts});
  dispatch(lc, xg, x_perm);
  expert_hidden(lc, x_perm);
  expert_output(lc, y_perm);
  // y = Σ_k w_k Expert_{idx_k}(u) + Shared(u), added onto the residual already in `out`.
  be.moe_combine_fwd(lc.ctx, {.y = out, .y_perm = y_perm, .topk_w = w, .slot_pos = slot_pos});
}

void FfnLayer::backward(const LayerContext& lc, const Tensor& x, const Tensor& d_out, const Tensor& d_out16,
                        double aux_scale) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  const int64_t N = lc.tokens();
  recompute(lc, x);
  const Tensor xg = gemm_input(lc), dx_norm = lc.act("scratch.ffn.dx_norm");
  const Tensor d_out_gemm = d_out16.defined() ? d_out16 : d_out;  // what the w2 backward GEMMs read
  if (!moe(lc)) {
    mlp_backward(lc, "", "", xg, d_out_gemm, dx_norm, 0.0);
  } else if (expert_parallel(lc)) {
    backward_ep(lc, d_out_gemm, dx_norm, aux_scale);
  } else {
    double beta = 0.0;  // the first contribution to dx_norm overwrites, the rest accumulate
    if (c.n_shared_experts > 0) {
      mlp_backward(lc, "shared.", "shared.", xg, d_out_gemm, dx_norm, 0.0);
      beta = 1.0;
    }
    const Tensor offsets = lc.act(a("offsets")), slot_pos = lc.act(a("slot_pos")), w = lc.act(a("topk_w"));
    const Tensor x_perm = lc.act(a("x_perm")), y_perm = lc.act(a("y_perm"));
    const Tensor dy_perm = lc.act("scratch.moe.dy_perm"), dx_perm = lc.act("scratch.moe.dx_perm");
    const Tensor dw = lc.act("scratch.moe.dtopk_w"), dlogits = lc.act("scratch.moe.dlogits");
    const Tensor ea = lc.act(a("experts.a")), eb = lc.act(a("experts.b")), eh = lc.act(a("experts.h"));
    const std::string s = fmt::format("scratch.ffn.experts.{}.", c.moe_inter_dim);
    const Tensor dh = lc.act(s + "dh"), da = lc.act(s + "da"), db = lc.act(s + "db");
    // Combine: expert outputs get w_k·dy, the routing weights get ⟨dy, Expert_k(u)⟩ (docs/derivations.md §4.4).
    // dy: the residual gradient's bf16 copy in the bf16 GEMM mode (dy_perm = w·dy is rounded to bf16
    // anyway; ⟨dy, y_perm⟩ reads half the bytes, both factors then bf16 values summed in f64).
    be.moe_combine_bwd(
        lc.ctx,
        {.dy_perm = dy_perm, .dtopk_w = dw, .dy = d_out_gemm, .y_perm = y_perm, .topk_w = w, .slot_pos = slot_pos});
    // Experts: y = h W2ᵀ per group, h = silu(a) ⊙ b, a = x W1ᵀ, b = x W3ᵀ.
    const Tensor dw1 = lc.grad(p("experts.w1")), dw2 = lc.grad(p("experts.w2")), dw3 = lc.grad(p("experts.w3"));
    lc.grouped_backward(
        {.c = dw2, .a = dy_perm, .b = eh, .offsets = offsets, .beta = lc.dw_beta_for(dw2), .sum_sq = lc.expert_grad_sq},
        lc.weight(p("experts.w2")),
        {.c = dh, .a = dy_perm, .b = lc.weight(p("experts.w2")), .offsets = offsets, .trans_b = false});
    be.swiglu_bwd(lc.ctx, {.da = da, .db = db, .dh = dh, .a = ea, .b = eb});
    // dW1, dW3 from x_perm, and dx_perm = da·W1 + db·W3 per group as one two-term call (the GPU sums both in
    // one accumulator).
    lc.grouped_backward_pair(
        {.c = dw1, .a = da, .b = x_perm, .offsets = offsets, .beta = lc.dw_beta_for(dw1), .sum_sq = lc.expert_grad_sq},
        lc.weight(p("experts.w1")),
        {.c = dw3, .a = db, .b = x_perm, .offsets = offsets, .beta = lc.dw_beta_for(dw3), .sum_sq = lc.expert_grad_sq},
        lc.weight(p("experts.w3")),
        {.c = dx_perm,
         .a = da,
         .b = lc.weight(p("experts.w1")),
         .offsets = offsets,
         .trans_b = false,
         .a2 = db,
         .b2 = lc.weight(p("experts.w3"))});
    if (beta == 0.0) be.fill(lc.ctx, {.out = dx_norm, .value = 0.0});
    be.moe_gather_bwd(lc.ctx, {.dx = dx_norm, .dx_perm = dx_perm, .slot_pos = slot_pos});
    // Router: gradient through the weights only, plus the sequence aux loss (docs/derivations.md §4.4, §4.6).
    const Tensor scores = lc.act(a("scores")), idx = lc.act(a("topk_idx"));
    be.router_bwd(
        lc.ctx,
        {.dlogits = dlogits, .dtopk_w = dw, .scores = scores, .topk_idx = idx, .topk_w = w, .opt = router_options(c)});
    if (c.aux_loss_alpha > 0)
      be.aux_loss_bwd(lc.ctx, {.dlogits = dlogits,
                               .scores = scores,
                               .seq_len = lc.seq,
                               .top_k = c.n_activated_experts,
                               .alpha = c.aux_loss_alpha,
                               .dloss = aux_scale,
                               .score_func = c.score_func});
    lc.linear_backward(lc.grad(p("gate.weight")), dx_norm, dlogits, xg, lc.param(p("gate.weight")), 1.0);
  }
  const std::string norm = fmt::format("layers.{}.ffn_norm.weight", l_);
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
