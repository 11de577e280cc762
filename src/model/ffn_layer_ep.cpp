// The MoE block with its routed experts split over an expert-parallel group (docs/model.md §12,
// docs/parallelism.md §3). Rank r of the group holds experts [r·E_l, (r+1)·E_l), E_l = E / EP.
//
// Forward, on every rank for its own N tokens:
//   router as without EP (all E experts, this rank's tokens), then ep_dispatch_plan: the pairs
//     (token n, rank r) with some slot of n on r, in (r, n) order — each token goes ONCE to each rank
//     it needs, with its slots' local expert ids (-1 where the slot's expert is elsewhere) and weights;
//   the counts (pairs per rank, rows per local expert) go to the host and are exchanged (the host
//     waits here: the buffer sizes and the all-to-all need them);
//   the pairs' x rows, slot ids and weights go out (all-to-all); the shared experts run meanwhile;
//   on the receiving rank: moe_permute over the received slots (unused ones skipped), gather, the
//     grouped expert GEMMs and SwiGLU on its E_l experts, and moe_combine into one row per pair:
//     Σ over the pair's slots of w_k · Expert_k(x);
//   those rows come back (all-to-all) and the source adds them to its tokens' outputs
//     (moe_gather_bwd over pair_of [N, EP]: y[n] += Σ_r back[pair(n, r)]).
// Backward mirrors it: the tokens' output gradients go to the pairs' ranks once per pair; there
//   moe_combine_bwd gives each expert row's gradient and each slot's routing-weight gradient
//   ⟨dy, Expert_k(x)⟩; the expert GEMMs' backward; the input gradients (one row per pair) and the
//   weight gradients (K per pair) come back and are added per token.
// Recompute (model/recompute.h): `moe` recomputes a, b, h from the kept x_perm; `full` re-runs the
//   dispatch of the x rows with the forward's recorded traffic and plan (recompute_ep), so the
//   backward's collectives are the forward's x exchange, then the backward's own.
// Group-limited routing maps expert groups to ranks (G a multiple of EP: rank r holds groups
// [r·G/EP, (r+1)·G/EP)), so a token's pairs are at most n_limited_groups.
#include <fmt/format.h>

#include <algorithm>

#include "model/ffn_layer.h"

namespace diffmoe {

void FfnLayer::plan_ep(const LayerContext& lc, PrecisionPlan& pl, Arena& acts) const {
  const ModelConfig& c = *lc.cfg;
  const int64_t N = lc.tokens(), D = c.dim, K = c.n_activated_experts, P = lc.ep->size();
  const int64_t El = c.n_routed_experts / P, M = N * std::min(K, P);
  using R = ActRole;
  pl.add(acts, a("ep.pair_token"), Shape{M}, R::kIndex);  // the token of each pair sent (backward: dy rows)
  pl.add(acts, a("ep.pair_of"), Shape{N, P}, R::kIndex);  // pair of (n, r) or -1 (backward: the sums per token)
  pl.add_once(acts, "scratch.ep.counts", Shape{P * (1 + El)}, R::kIndex);
  pl.add_once(acts, "scratch.ep.recv_counts", Shape{P * (1 + El)}, R::kIndex);
  pl.add_once(acts, "scratch.ep.pair_idx", Shape{M, K}, R::kIndex);
  pl.add_once(acts, "scratch.ep.pair_w", Shape{M, K}, R::kFloat);
  pl.add_once(acts, "scratch.ep.x_send", Shape{M, D}, R::kGemmOperand);  // x rows out; dy rows in the backward
  pl.add_once(acts, "scratch.ep.y_back", Shape{M, D}, R::kFloat);        // expert outputs back; dx rows in the backward
  pl.add_once(acts, "scratch.ep.dtw_back", Shape{M, K}, R::kFloat);
}

void FfnLayer::forward_ep(const LayerContext& lc, const Tensor& x, const Tensor& out) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  ExpertExchange& ex = *lc.ep;
  ExpertBuffers& buf = *lc.ep_buffers;
  const int64_t K = c.n_activated_experts, P = ex.size(), El = c.n_routed_experts / P;
  const Tensor x_norm = lc.act(a("x_norm")), xg = gemm_input(lc);
  // Router (docs/model.md §5) over all E experts for this rank's tokens.
  const Tensor logits = lc.act(a("logits")), scores = lc.act(a("scores")), idx = lc.act(a("topk_idx")),
               w = lc.act(a("topk_w"));
  be.gemm(lc.ctx, {.c = logits, .a = x_norm, .b = lc.param(p("gate.weight")), .trans_b = true, .f32_exact = true});
  be.router_fwd(lc.ctx, {.scores = scores,
                         .topk_idx = idx,
                         .topk_w = w,
                         .counts = lc.act(fmt::format("stats.{}.counts", l_)),
                         .logits = logits,
                         .bias = lc.param(p("gate.bias")),
                         .opt = router_options(c)});
  if (c.aux_loss_alpha > 0)
    be.aux_loss_fwd(lc.ctx, {.loss = lc.act("loss.aux"),
                             .scores = scores,
                             .seq_len = lc.seq,
                             .top_k = K,
                             .alpha = c.aux_loss_alpha,
                             .score_func = c.score_func});
  // The pairs and their counts; the counts to the host and to the peers.
  const Tensor counts = lc.act("scratch.ep.counts"), recv_counts = lc.act("scratch.ep.recv_counts");
  const Tensor pair_token = lc.act(a("ep.pair_token")), pair_of = lc.act(a("ep.pair_of"));
  const Tensor pair_idx = lc.act("scratch.ep.pair_idx"), pair_w = lc.act("scratch.ep.pair_w");
  be.ep_dispatch_plan(lc.ctx, {.counts = counts,
                               .pair_token = pair_token,
                               .pair_of = pair_of,
                               .pair_idx = pair_idx,
                               .pair_w = pair_w,
                               .topk_idx = idx,
                               .topk_w = w,
                               .ranks = P,
                               .local_experts = El});
  const RowBlocks per_peer =
      RowBlocks::from_counts(std::vector<int64_t>(static_cast<size_t>(P), 1));  // one row of 1 + E_l each
  ex.all_to_all(lc.ctx, counts.reshape(Shape{P, 1 + El}), recv_counts.reshape(Shape{P, 1 + El}), per_peer, per_peer)
      ->wait(lc.ctx);
  std::vector<int32_t> sent(static_cast<size_t>(P * (1 + El))), got(sent.size());
  be.download(sent.data(), counts);  // a host sync: the sizes below depend on the routing
  be.download(got.data(), recv_counts);
  EpTraffic& t = buf.traffic(l_);
  std::vector<int64_t> send_pairs(static_cast<size_t>(P)), recv_pairs(static_cast<size_t>(P));
  t.rows = 0;
  for (int64_t r = 0; r < P; ++r) {
    send_pairs[static_cast<size_t>(r)] = sent[static_cast<size_t>(r * (1 + El))];
    recv_pairs[static_cast<size_t>(r)] = got[static_cast<size_t>(r * (1 + El))];
    for (int64_t e = 0; e < El; ++e) t.rows += got[static_cast<size_t>(r * (1 + El) + 1 + e)];
  }
  t.send = RowBlocks::from_counts(std::move(send_pairs));
  t.recv = RowBlocks::from_counts(std::move(recv_pairs));
  const int64_t S = t.send.total(), Rp = t.recv.total(), Rx = t.rows;
  buf.ensure(lc.ctx, l_, Rp, Rx);
  const Tensor recv_idx = buf.saved(l_, "recv_idx").rows(0, Rp), recv_w = buf.saved(l_, "recv_w").rows(0, Rp);
  const Tensor x_recv = buf.scratch("x_recv").rows(0, Rp);
  // Dispatch: each pair's x row, slot ids and weights to its rank; the shared experts meanwhile.
  const Tensor x_send = lc.act("scratch.ep.x_send").rows(0, S);
  be.moe_gather(lc.ctx, {.x_perm = x_send, .x = xg, .src_row = pair_token.rows(0, S)});
  auto sent_x = ex.all_to_all(lc.ctx, x_send, x_recv, t.send, t.recv);
  auto sent_idx = ex.all_to_all(lc.ctx, pair_idx.rows(0, S), recv_idx, t.send, t.recv);
  auto sent_w = ex.all_to_all(lc.ctx, pair_w.rows(0, S), recv_w, t.send, t.recv);
  if (c.n_shared_experts > 0) mlp_forward(lc, "shared.", "shared.", xg, out, x);
  else be.copy(lc.ctx, {.dst = out, .src = x});
  sent_x->wait(lc.ctx);
  sent_idx->wait(lc.ctx);
  sent_w->wait(lc.ctx);
  // This rank's experts on the received pairs: one row per used slot, sorted by local expert.
  const Tensor offsets = buf.saved(l_, "offsets").rows(0, El + 1), src_row = buf.saved(l_, "src_row").rows(0, Rx);
  const Tensor slot_pos = buf.saved(l_, "slot_pos").rows(0, Rp);
  const Tensor y_perm = buf.saved(l_, "y_perm").rows(0, Rx);
  be.moe_permute(lc.ctx,
                 {.offsets = offsets, .src_row = src_row, .slot_pos = slot_pos, .topk_idx = recv_idx, .n_experts = El});
  experts_ep(lc, x_recv, Rx);
  // One row per pair: Σ over its slots of w_k · Expert_k(x), back to the token's rank, added there.
  const Tensor y_recv = buf.scratch("y_recv").rows(0, Rp), y_back = lc.act("scratch.ep.y_back").rows(0, S);
  be.fill(lc.ctx, {.out = y_recv, .value = 0.0});
  be.moe_combine_fwd(lc.ctx, {.y = y_recv, .y_perm = y_perm, .topk_w = recv_w, .slot_pos = slot_pos});
  ex.all_to_all(lc.ctx, y_recv, y_back, t.recv, t.send)->wait(lc.ctx);
  be.moe_gather_bwd(lc.ctx, {.dx = out, .dx_perm = y_back, .slot_pos = pair_of});
}

void FfnLayer::expert_hidden_ep(const LayerContext& lc, int64_t rows) const {
  const ExpertBuffers& buf = *lc.ep_buffers;
  const int64_t El = lc.cfg->n_routed_experts / lc.ep->size();
  const Tensor offsets = buf.saved(l_, "offsets").rows(0, El + 1), x_perm = buf.saved(l_, "x_perm").rows(0, rows);
  const Tensor ea = buf.saved(l_, "a").rows(0, rows), eb = buf.saved(l_, "b").rows(0, rows),
               eh = buf.saved(l_, "h").rows(0, rows);
  lc.be->grouped_gemm(lc.ctx,
                      {.c = ea, .a = x_perm, .b = lc.weight(p("experts.w1")), .offsets = offsets, .trans_b = true});
  lc.be->grouped_gemm(lc.ctx,
                      {.c = eb, .a = x_perm, .b = lc.weight(p("experts.w3")), .offsets = offsets, .trans_b = true});
  lc.be->swiglu_fwd(lc.ctx, {.h = eh, .a = ea, .b = eb});
}

void FfnLayer::experts_ep(const LayerContext& lc, const Tensor& x_recv, int64_t rows) const {
  const ExpertBuffers& buf = *lc.ep_buffers;
  const int64_t El = lc.cfg->n_routed_experts / lc.ep->size();
  const Tensor offsets = buf.saved(l_, "offsets").rows(0, El + 1), src_row = buf.saved(l_, "src_row").rows(0, rows);
  lc.be->moe_gather(lc.ctx, {.x_perm = buf.saved(l_, "x_perm").rows(0, rows), .x = x_recv, .src_row = src_row});
  expert_hidden_ep(lc, rows);
  lc.be->grouped_gemm(lc.ctx, {.c = buf.saved(l_, "y_perm").rows(0, rows),
                               .a = buf.saved(l_, "h").rows(0, rows),
                               .b = lc.weight(p("experts.w2")),
                               .offsets = offsets,
                               .trans_b = true});
}

void FfnLayer::recompute_ep(const LayerContext& lc, const Tensor& xg) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  ExpertExchange& ex = *lc.ep;
  const ExpertBuffers& buf = *lc.ep_buffers;
  const EpTraffic& t = lc.ep_buffers->traffic(l_);
  const int64_t S = t.send.total(), Rp = t.recv.total(), Rx = t.rows;
  if (recompute_ == Recompute::kMoe) {
    expert_hidden_ep(lc, Rx);  // from the kept x_perm
    return;
  }
  // `full`: the forward's dispatch of the x rows again, by its kept plan (pair_token, the received
  // slots' permutation src_row) and its recorded counts (t): no routing and no count exchange, and
  // the same all-to-all as the forward's on every rank of the group (each runs this layer's backward
  // at the same point of its sequence of collectives), so the rows received are the forward's.
  const Tensor x_send = lc.act("scratch.ep.x_send").rows(0, S), x_recv = buf.scratch("x_recv").rows(0, Rp);
  be.moe_gather(lc.ctx, {.x_perm = x_send, .x = xg, .src_row = lc.act(a("ep.pair_token")).rows(0, S)});
  auto sent_x = ex.all_to_all(lc.ctx, x_send, x_recv, t.send, t.recv);
  if (c.n_shared_experts > 0) mlp_hidden(lc, "shared.", "shared.", xg);  // W2's output is not needed
  sent_x->wait(lc.ctx);
  // y_perm too: ⟨dy, y_perm⟩ gives the routing weights' gradient (the same calls as the forward's).
  experts_ep(lc, x_recv, Rx);
}

void FfnLayer::backward_ep(const LayerContext& lc, const Tensor& d_out_gemm, const Tensor& dx_norm,
                           double aux_scale) const {
  const ModelConfig& c = *lc.cfg;
  Backend& be = *lc.be;
  ExpertExchange& ex = *lc.ep;
  ExpertBuffers& buf = *lc.ep_buffers;
  const int64_t K = c.n_activated_experts, P = ex.size(), El = c.n_routed_experts / P;
  const EpTraffic& t = buf.traffic(l_);
  const int64_t S = t.send.total(), Rp = t.recv.total(), Rx = t.rows;
  const Tensor xg = gemm_input(lc);
  const Tensor pair_token = lc.act(a("ep.pair_token")), pair_of = lc.act(a("ep.pair_of"));
  // The tokens' output gradients to the pairs' ranks (once per pair); the shared experts meanwhile.
  const Tensor dy_send = lc.act("scratch.ep.x_send").rows(0, S), dy_recv = buf.scratch("dy_recv").rows(0, Rp);
  be.moe_gather(lc.ctx, {.x_perm = dy_send, .x = d_out_gemm, .src_row = pair_token.rows(0, S)});
  auto sent_dy = ex.all_to_all(lc.ctx, dy_send, dy_recv, t.send, t.recv);
  double beta = 0.0;  // the first contribution to dx_norm overwrites, the rest accumulate
  if (c.n_shared_experts > 0) {
    mlp_backward(lc, "shared.", "shared.", xg, d_out_gemm, dx_norm, 0.0);
    beta = 1.0;
  }
  sent_dy->wait(lc.ctx);
  // This rank's experts: the combine's backward, then the expert GEMMs' (as without EP).
  const Tensor offsets = buf.saved(l_, "offsets").rows(0, El + 1), slot_pos = buf.saved(l_, "slot_pos").rows(0, Rp);
  const Tensor recv_w = buf.saved(l_, "recv_w").rows(0, Rp);
  const Tensor x_perm = buf.saved(l_, "x_perm").rows(0, Rx), y_perm = buf.saved(l_, "y_perm").rows(0, Rx);
  const Tensor ea = buf.saved(l_, "a").rows(0, Rx), eb = buf.saved(l_, "b").rows(0, Rx),
               eh = buf.saved(l_, "h").rows(0, Rx);
  const Tensor dy_perm = buf.scratch("dy_perm").rows(0, Rx), dx_perm = buf.scratch("dx_perm").rows(0, Rx);
  const Tensor dh = buf.scratch("dh").rows(0, Rx), da = buf.scratch("da").rows(0, Rx),
               db = buf.scratch("db").rows(0, Rx);
  const Tensor dtw = buf.scratch("dtw").rows(0, Rp), dx_recv = buf.scratch("dx_recv").rows(0, Rp);
  be.moe_combine_bwd(
      lc.ctx,
      {.dy_perm = dy_perm, .dtopk_w = dtw, .dy = dy_recv, .y_perm = y_perm, .topk_w = recv_w, .slot_pos = slot_pos});
  const Tensor dw1 = lc.grad(p("experts.w1")), dw2 = lc.grad(p("experts.w2")), dw3 = lc.grad(p("experts.w3"));
  be.grouped_gemm_wgrad(
      lc.ctx,
      {.c = dw2, .a = dy_perm, .b = eh, .offsets = offsets, .beta = lc.dw_beta_for(dw2), .sum_sq = lc.expert_grad_sq});
  be.grouped_gemm(lc.ctx,
                  {.c = dh, .a = dy_perm, .b = lc.weight(p("experts.w2")), .offsets = offsets, .trans_b = false});
  be.swiglu_bwd(lc.ctx, {.da = da, .db = db, .dh = dh, .a = ea, .b = eb});
  be.grouped_gemm_wgrad(
      lc.ctx,
      {.c = dw1, .a = da, .b = x_perm, .offsets = offsets, .beta = lc.dw_beta_for(dw1), .sum_sq = lc.expert_grad_sq});
  be.grouped_gemm_wgrad(
      lc.ctx,
      {.c = dw3, .a = db, .b = x_perm, .offsets = offsets, .beta = lc.dw_beta_for(dw3), .sum_sq = lc.expert_grad_sq});
  be.grouped_gemm(lc.ctx, {.c = dx_perm,
                           .a = da,
                           .b = lc.weight(p("experts.w1")),
                           .offsets = offsets,
                           .trans_b = false,
                           .a2 = db,
                           .b2 = lc.weight(p("experts.w3"))});
  be.fill(lc.ctx, {.out = dx_recv, .value = 0.0});
  be.moe_gather_bwd(lc.ctx, {.dx = dx_recv, .dx_perm = dx_perm, .slot_pos = slot_pos});
  // Back to the tokens' ranks: one input-gradient row and K routing-weight gradients per pair.
  const Tensor dx_back = lc.act("scratch.ep.y_back").rows(0, S), dtw_back = lc.act("scratch.ep.dtw_back").rows(0, S);
  auto back_dx = ex.all_to_all(lc.ctx, dx_recv, dx_back, t.recv, t.send);
  auto back_dw = ex.all_to_all(lc.ctx, dtw, dtw_back, t.recv, t.send);
  back_dx->wait(lc.ctx);
  back_dw->wait(lc.ctx);
  if (beta == 0.0) be.fill(lc.ctx, {.out = dx_norm, .value = 0.0});
  be.moe_gather_bwd(lc.ctx, {.dx = dx_norm, .dx_perm = dx_back, .slot_pos = pair_of});
  // dtopk_w[n, k]: the one pair of n that holds slot k has it (the others' entry is 0).
  const Tensor dw = lc.act("scratch.moe.dtopk_w");
  be.fill(lc.ctx, {.out = dw, .value = 0.0});
  be.moe_gather_bwd(lc.ctx, {.dx = dw, .dx_perm = dtw_back, .slot_pos = pair_of});
  // Router: gradient through the weights only, plus the sequence aux loss (docs/derivations.md §4.4, §4.6).
  const Tensor scores = lc.act(a("scores")), idx = lc.act(a("topk_idx")), w = lc.act(a("topk_w"));
  const Tensor dlogits = lc.act("scratch.moe.dlogits");
  be.router_bwd(
      lc.ctx,
      {.dlogits = dlogits, .dtopk_w = dw, .scores = scores, .topk_idx = idx, .topk_w = w, .opt = router_options(c)});
  if (c.aux_loss_alpha > 0)
    be.aux_loss_bwd(lc.ctx, {.dlogits = dlogits,
                             .scores = scores,
                             .seq_len = lc.seq,
                             .top_k = K,
                             .alpha = c.aux_loss_alpha,
                             .dloss = aux_scale,
                             .score_func = c.score_func});
  lc.linear_backward(lc.grad(p("gate.weight")), dx_norm, dlogits, xg, lc.param(p("gate.weight")), 1.0);
}

}  // namespace diffmoe
