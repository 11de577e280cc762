// LayerContext's GEMMs (layer_context.h): the backend's gemm / grouped ops, or, for the weights the
// fp8 mode runs in FP8, the recipe of docs/model.md §7 and docs/derivations.md §6.1 on the FP8 ops
// (op_args.h's FP8 section):
//   Fprop  y  = x Wᵀ:   act_quant(x) 1×128 tiles        · W in 128×128 blocks      (fp8_gemm)
//   Dgrad  dx = dy W:   act_quant(dy) 1×128 tiles       · Wᵀ's 128×128 blocks (q_t)
//   Wgrad  dW += dyᵀx:  act_quant(dy)ᵀ 128×1 tiles      · act_quant(x)ᵀ 128×1 tiles, beta = dw_beta
// Every FP8 copy is quantised from the bf16/f32 tensor itself (never from another FP8 copy), into the
// FP8 scratch (fp8_weights.h), where the GEMM reads it: the weight's blocks too, from the bf16 rounding
// of its compute weight, for every GEMM that reads them (weight_quant is deterministic, so every call makes the same
// bits; no e4m3 weight copy is kept between GEMMs). The products accumulate in f32 (CPU: f64, rounded
// once) into outputs of the planned dtypes.
//
// Routed experts, Fprop and Dgrad: one fp8_grouped_gemm for all experts. A (and A2) is quantised
// row-wise over all its rows at once, which is each group's own quantisation (a 1×128 tile never
// crosses rows), and each stack in 128×128 blocks per expert (weight_quant of the 3-D stack: W for
// Fprop, Wᵀ for Dgrad). The offsets stay on the device.
// Routed experts, Wgrad: dy and x quantised transposed with the offsets (act_quant's grouped copy:
// the 128×1 tiles run along the rows and restart at each expert's first row, so none crosses an
// expert's end; padded with zeros to whole tiles), then one fp8_grouped_gemm_wgrad. No host
// synchronisation anywhere in the experts' FP8 GEMMs.
// Where two GEMMs read one operand (the *_pair calls, grouped_backward*), its FP8 copy is made once and
// read by both: the quantisation is a pure function of the tensor, so this gives the single calls' bits
// with fewer passes over memory (the quantisers take more of the fp8 step than the FP8 GEMMs;
// bench/RESULTS.md).
#include "model/layer_context.h"

namespace diffmoe {

namespace {

// Views of one FP8 scratch slot ("scratch.fp8.<slot>.q" / ".scale").
struct Fp8Slot {
  Tensor q, scale;
};
Fp8Slot slot(const LayerContext& lc, const char* name, const Shape& q, const Shape& scale) {
  const std::string base = std::string("scratch.fp8.") + name;
  return Fp8Slot{lc.scratch(base + ".q", q), lc.scratch(base + ".scale", scale)};
}
// x [M, K] quantised row-wise (1×128 tiles along K) / transposed (128×1 tiles along M, stored [K, M]).
Fp8Slot rows_slot(const LayerContext& lc, const char* name, int64_t m, int64_t k) {
  return slot(lc, name, Shape{m, k}, Shape{fp8_tiles(k), m});
}
Fp8Slot cols_slot(const LayerContext& lc, const char* name, int64_t m, int64_t k) {
  return slot(lc, name, Shape{k, m}, Shape{fp8_tiles(m), k});
}

// A weight's 128×128 blocks in slot `name`, quantised from the bf16 rounding of its compute weight:
// W [N, K] (Fprop's B) or, transposed, Wᵀ [K, N] (Dgrad's B); an expert stack [E, …] each matrix on its own.
Fp8Slot weight_blocks(const LayerContext& lc, const char* name, const Fp8Weight& f, bool transposed) {
  const int64_t rows = transposed ? f.k : f.n, cols = transposed ? f.n : f.k;
  const Shape q = f.experts > 0 ? Shape{f.experts, rows, cols} : Shape{rows, cols};
  const Shape scale = f.experts > 0 ? Shape{f.experts, fp8_tiles(rows), fp8_block_scale_cols(cols)}
                                    : Shape{fp8_tiles(rows), fp8_block_scale_cols(cols)};
  const Fp8Slot b = slot(lc, name, q, scale);
  if (transposed) lc.be->weight_quant(lc.ctx, {.q_t = b.q, .scale_t = b.scale, .w = f.w, .bf16_source = true});
  else lc.be->weight_quant(lc.ctx, {.q = b.q, .scale = b.scale, .w = f.w, .bf16_source = true});
  return b;
}

// x quantised row-wise (1×128 tiles) into slot `name`.
Fp8Slot quantise_rows(const LayerContext& lc, const char* name, const Tensor& x) {
  const Fp8Slot a = rows_slot(lc, name, x.dim(0), x.dim(1));
  lc.be->act_quant(lc.ctx, {.q = a.q, .scale = a.scale, .x = x});
  return a;
}
// x quantised transposed (128×1 tiles) into slot `name`.
Fp8Slot quantise_cols(const LayerContext& lc, const char* name, const Tensor& x) {
  const Fp8Slot t = cols_slot(lc, name, x.dim(0), x.dim(1));
  lc.be->act_quant(lc.ctx, {.q_t = t.q, .scale_t = t.scale, .x = x});
  return t;
}
// One pass over dy writes both of its copies: 1×128 tiles (Dgrad, slot "a") and 128×1 tiles (Wgrad, slot "a_t").
std::pair<Fp8Slot, Fp8Slot> quantise_both(const LayerContext& lc, const Tensor& dy) {
  const int64_t m = dy.dim(0), n = dy.dim(1);
  const Fp8Slot a = rows_slot(lc, "a", m, n), a_t = cols_slot(lc, "a_t", m, n);
  lc.be->act_quant(lc.ctx, {.q = a.q, .scale = a.scale, .q_t = a_t.q, .scale_t = a_t.scale, .x = dy});
  return {a, a_t};
}

// y = x Wᵀ (+ beta·addend) from x's row-wise copy.
void fp8_fprop_from(const LayerContext& lc, const Fp8Weight& f, const Tensor& y, const Fp8Slot& x, double beta,
                    const Tensor& addend) {
  const Fp8Slot w = weight_blocks(lc, "w", f, /*transposed=*/false);
  lc.be->fp8_gemm(lc.ctx, {.c = y,
                           .a = x.q,
                           .a_scale = x.scale,
                           .b = w.q,
                           .b_scale = w.scale,
                           .b_scaling = Fp8Scaling::kBlock128x128,
                           .beta = beta,
                           .addend = addend});
}

// dx = dy W (+ beta·dx) from dy's row-wise copy.
void fp8_dgrad_from(const LayerContext& lc, const Fp8Weight& f, const Tensor& dx, const Fp8Slot& dy, double beta) {
  const Fp8Slot w_t = weight_blocks(lc, "w_t", f, /*transposed=*/true);
  lc.be->fp8_gemm(lc.ctx, {.c = dx,
                           .a = dy.q,
                           .a_scale = dy.scale,
                           .b = w_t.q,
                           .b_scale = w_t.scale,
                           .b_scaling = Fp8Scaling::kBlock128x128,
                           .beta = beta});
}

// dW = dyᵀ x + beta·dW from the transposed copies of dy and x.
void fp8_wgrad_from(const LayerContext& lc, const Tensor& dw, const Fp8Slot& dy_t, const Fp8Slot& x_t, double beta) {
  lc.be->fp8_gemm(lc.ctx, {.c = dw,
                           .a = dy_t.q,
                           .a_scale = dy_t.scale,
                           .b = x_t.q,
                           .b_scale = x_t.scale,
                           .b_scaling = Fp8Scaling::kTile1x128,
                           .beta = beta});
}

// The FP8 stacks of a grouped Fprop/Dgrad (b, and b2 for a second term), checked.
std::pair<const Fp8Weight*, const Fp8Weight*> fp8_stacks(const LayerContext& lc, const GroupedGemmArgs& a) {
  const Fp8Weight* f = lc.fp8_weight(a.b);
  if (f == nullptr) return {nullptr, nullptr};
  const Fp8Weight* f2 = a.b2.defined() ? lc.fp8_weight(a.b2) : nullptr;
  DIFFMOE_CHECK(!a.b2.defined() || f2 != nullptr,
                "[model] grouped_gemm: an FP8 stack b with a second stack b2 that is not FP8");
  DIFFMOE_CHECK(f->experts > 0 && (f2 == nullptr || f2->experts > 0),
                "[model] grouped_gemm: the FP8 weight {} is not an expert stack", a.b.describe());
  DIFFMOE_CHECK(a.alpha == 1.0 && a.beta == 0.0,
                "[model] the FP8 grouped GEMM writes C (alpha 1, beta 0), got alpha {} beta {}", a.alpha, a.beta);
  return {f, f2};
}

// One fp8_grouped_gemm for a.c. A quantised row-wise over all its rows (each group's own quantisation: a
// 1×128 tile never crosses rows) into slot "ga" unless given as qa (a.a's copy, quantised already), A2 into
// "ga2" unless given as qa2; each stack's blocks per expert ("gw", "gw2": W for Fprop, Wᵀ for Dgrad).
void fp8_grouped(const LayerContext& lc, const GroupedGemmArgs& a, const Fp8Weight& f, const Fp8Weight* f2,
                 const Fp8Slot* qa, const Fp8Slot* qa2 = nullptr) {
  const Fp8Slot q = qa != nullptr ? *qa : quantise_rows(lc, "ga", a.a);
  const Fp8Slot w = weight_blocks(lc, "gw", f, /*transposed=*/!a.trans_b);
  Fp8GroupedGemmArgs g{.c = a.c, .a = q.q, .a_scale = q.scale, .b = w.q, .b_scale = w.scale, .offsets = a.offsets};
  if (f2 != nullptr) {
    const Fp8Slot q2 = qa2 != nullptr ? *qa2 : quantise_rows(lc, "ga2", a.a2);
    const Fp8Slot w2 = weight_blocks(lc, "gw2", *f2, /*transposed=*/!a.trans_b);
    g.a2 = q2.q;
    g.a2_scale = q2.scale;
    g.b2 = w2.q;
    g.b2_scale = w2.scale;
  }
  lc.be->fp8_grouped_gemm(lc.ctx, g);
}

// The FP8 expert Wgrad C_g = A_gᵀ B_g + beta·C_g of y = x Wᵀ with dy = A [R, m], x = B [R, n], each quantised
// transposed in tiles that restart at every expert's first row. Slot "gt" holds both copies: dy's [m, 128·T]
// then x's [n, 128·T] (scales [T, m] then [T, n]); with b_ready, B's copy is there already (the previous call's
// B, the same tensor). With a_rows, the pass over dy also writes its row-wise copy into that slot (for the Dgrad
// of the same dy), which it returns.
Fp8Slot fp8_grouped_wgrad(const LayerContext& lc, const GroupedGemmWgradArgs& a, bool b_ready,
                          const char* a_rows = nullptr) {
  DIFFMOE_CHECK(a.alpha == 1.0, "[model] the FP8 expert weight gradient takes alpha 1, got {}", a.alpha);
  const int64_t slots = fp8_group_tiles(a.a.dim(0), a.c.dim(0)), m = a.a.dim(1), n = a.b.dim(1);
  const Fp8Slot both = slot(lc, "gt", Shape{(m + n) * kFp8Tile * slots}, Shape{slots * (m + n)});
  const auto view = [&](int64_t first, int64_t width) {
    return Fp8Slot{.q = both.q.rows(first * kFp8Tile * slots, (first + width) * kFp8Tile * slots)
                            .reshape(Shape{width, kFp8Tile * slots}),
                   .scale = both.scale.rows(first * slots, (first + width) * slots).reshape(Shape{slots, width})};
  };
  const Fp8Slot dy_t = view(0, m), x_t = view(m, n);
  const Fp8Slot rows = a_rows != nullptr ? rows_slot(lc, a_rows, a.a.dim(0), m) : Fp8Slot{};
  lc.be->act_quant(
      lc.ctx, {.q = rows.q, .scale = rows.scale, .q_t = dy_t.q, .scale_t = dy_t.scale, .x = a.a, .offsets = a.offsets});
  if (!b_ready) lc.be->act_quant(lc.ctx, {.q_t = x_t.q, .scale_t = x_t.scale, .x = a.b, .offsets = a.offsets});
  lc.be->fp8_grouped_gemm_wgrad(lc.ctx, {.c = a.c,
                                         .a = dy_t.q,
                                         .a_scale = dy_t.scale,
                                         .b = x_t.q,
                                         .b_scale = x_t.scale,
                                         .offsets = a.offsets,
                                         .beta = a.beta,
                                         .sum_sq = a.sum_sq});
  return rows;
}

// The same tensor (a view of the same values): what the pair calls require of their shared operand.
bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.data == b.data && a.shape == b.shape && a.dtype == b.dtype && a.device == b.device;
}

}  // namespace

void LayerContext::linear(const Tensor& y, const Tensor& x, const Tensor& w, double beta, const Tensor& addend) const {
  if (const Fp8Weight* f = fp8_weight(w))
    return fp8_fprop_from(*this, *f, y, quantise_rows(*this, "a", x), beta, addend);
  be->gemm(ctx,
           {.c = y, .a = x, .b = w, .trans_a = false, .trans_b = true, .alpha = 1.0, .beta = beta, .addend = addend});
}

void LayerContext::linear_dx(const Tensor& dx, const Tensor& dy, const Tensor& w, double beta) const {
  if (const Fp8Weight* f = fp8_weight(w)) return fp8_dgrad_from(*this, *f, dx, quantise_rows(*this, "a", dy), beta);
  be->gemm(ctx, {.c = dx, .a = dy, .b = w, .trans_a = false, .trans_b = false, .alpha = 1.0, .beta = beta});
}

void LayerContext::linear_dw(const Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w) const {
  if (fp8_weight(w) != nullptr) {
    const Fp8Slot dy_t = quantise_cols(*this, "a_t", dy);
    return fp8_wgrad_from(*this, dw, dy_t, quantise_cols(*this, "b_t", x), dw_beta_for(dw));
  }
  be->gemm(ctx, {.c = dw, .a = dy, .b = x, .trans_a = true, .trans_b = false, .alpha = 1.0, .beta = dw_beta_for(dw)});
}

void LayerContext::linear_backward(const Tensor& dw, const Tensor& dx, const Tensor& dy, const Tensor& x,
                                   const Tensor& w, double beta_dx) const {
  if (const Fp8Weight* f = fp8_weight(w)) {
    const auto [a, a_t] = quantise_both(*this, dy);
    fp8_wgrad_from(*this, dw, a_t, quantise_cols(*this, "b_t", x), dw_beta_for(dw));
    return fp8_dgrad_from(*this, *f, dx, a, beta_dx);
  }
  const Tensor op = gemm_operand(dy);
  linear_dw(dw, op, x, w);
  linear_dx(dx, op, w, beta_dx);
}

void LayerContext::linear_pair(const Tensor& y1, const Tensor& w1, const Tensor& y2, const Tensor& w2,
                               const Tensor& x) const {
  const Fp8Weight *f1 = fp8_weight(w1), *f2 = fp8_weight(w2);
  if (f1 == nullptr || f2 == nullptr) {
    linear(y1, x, w1);
    return linear(y2, x, w2);
  }
  const Fp8Slot a = quantise_rows(*this, "a", x);
  fp8_fprop_from(*this, *f1, y1, a, 0.0, {});
  fp8_fprop_from(*this, *f2, y2, a, 0.0, {});
}

void LayerContext::linear_backward_pair(const Tensor& dw1, const Tensor& dy1, const Tensor& w1, const Tensor& dw2,
                                        const Tensor& dy2, const Tensor& w2, const Tensor& dx, const Tensor& x,
                                        double beta_dx) const {
  const Fp8Weight *f1 = fp8_weight(w1), *f2 = fp8_weight(w2);
  if (f1 == nullptr || f2 == nullptr) {
    linear_dw(dw1, dy1, x, w1);
    linear_dw(dw2, dy2, x, w2);
    linear_dx(dx, dy1, w1, beta_dx);
    return linear_dx(dx, dy2, w2, 1.0);
  }
  // x's transposed copy stays in "b_t" for both weight gradients; each dy's two copies reuse "a" and "a_t".
  const Fp8Slot x_t = quantise_cols(*this, "b_t", x);
  const auto [a1, a1_t] = quantise_both(*this, dy1);
  fp8_wgrad_from(*this, dw1, a1_t, x_t, dw_beta_for(dw1));
  fp8_dgrad_from(*this, *f1, dx, a1, beta_dx);
  const auto [a2, a2_t] = quantise_both(*this, dy2);
  fp8_wgrad_from(*this, dw2, a2_t, x_t, dw_beta_for(dw2));
  fp8_dgrad_from(*this, *f2, dx, a2, 1.0);
}

void LayerContext::grouped_gemm(const GroupedGemmArgs& a) const {
  const auto [f, f2] = fp8_stacks(*this, a);
  if (f == nullptr) return be->grouped_gemm(ctx, a);
  fp8_grouped(*this, a, *f, f2, nullptr);
}

void LayerContext::grouped_gemm_pair(const GroupedGemmArgs& a1, const GroupedGemmArgs& a2) const {
  DIFFMOE_CHECK(same_tensor(a1.a, a2.a) && same_tensor(a1.offsets, a2.offsets) && !a1.a2.defined() && !a2.a2.defined(),
                "[model] grouped_gemm_pair: the two GEMMs must share A ({} vs {}) and the offsets, one term each",
                a1.a.describe(), a2.a.describe());
  const auto [f1, unused1] = fp8_stacks(*this, a1);
  const auto [f2, unused2] = fp8_stacks(*this, a2);
  if (f1 == nullptr || f2 == nullptr) {
    grouped_gemm(a1);
    return grouped_gemm(a2);
  }
  const Fp8Slot qa = quantise_rows(*this, "ga", a1.a);
  fp8_grouped(*this, a1, *f1, nullptr, &qa);
  fp8_grouped(*this, a2, *f2, nullptr, &qa);
}

void LayerContext::grouped_gemm_wgrad(const GroupedGemmWgradArgs& a, const Tensor& w) const {
  if (fp8_weight(w) == nullptr) return be->grouped_gemm_wgrad(ctx, a);
  fp8_grouped_wgrad(*this, a, /*b_ready=*/false);
}

void LayerContext::grouped_backward(const GroupedGemmWgradArgs& wg, const Tensor& w, const GroupedGemmArgs& dg) const {
  DIFFMOE_CHECK(
      same_tensor(wg.a, dg.a) && same_tensor(wg.offsets, dg.offsets) && !dg.a2.defined() && dg.b.data == w.data,
      "[model] grouped_backward: the Dgrad must read the weight gradient's dy ({} vs {}), its offsets and "
      "stack, one term",
      wg.a.describe(), dg.a.describe());
  const auto [f, unused] = fp8_stacks(*this, dg);
  if (f == nullptr) {
    grouped_gemm_wgrad(wg, w);
    return grouped_gemm(dg);
  }
  const Fp8Slot qa = fp8_grouped_wgrad(*this, wg, /*b_ready=*/false, "ga");
  fp8_grouped(*this, dg, *f, nullptr, &qa);
}

void LayerContext::grouped_backward_pair(const GroupedGemmWgradArgs& wg1, const Tensor& w1,
                                         const GroupedGemmWgradArgs& wg2, const Tensor& w2,
                                         const GroupedGemmArgs& dg) const {
  DIFFMOE_CHECK(same_tensor(wg1.b, wg2.b) && same_tensor(wg1.offsets, wg2.offsets) && wg1.a.shape == wg2.a.shape &&
                    same_tensor(dg.a, wg1.a) && same_tensor(dg.a2, wg2.a) && same_tensor(dg.offsets, wg1.offsets) &&
                    dg.b.data == w1.data && dg.b2.data == w2.data,
                "[model] grouped_backward_pair: the weight gradients must share B ({} vs {}) and the offsets, and the "
                "two-term Dgrad read their dy ({}, {}) and stacks",
                wg1.b.describe(), wg2.b.describe(), wg1.a.describe(), wg2.a.describe());
  const auto [f1, f2] = fp8_stacks(*this, dg);
  if (f1 == nullptr) {
    grouped_gemm_wgrad(wg1, w1);
    grouped_gemm_wgrad(wg2, w2);
    return grouped_gemm(dg);
  }
  const Fp8Slot qa = fp8_grouped_wgrad(*this, wg1, /*b_ready=*/false, "ga");
  const Fp8Slot qa2 = fp8_grouped_wgrad(*this, wg2, /*b_ready=*/true, "ga2");
  fp8_grouped(*this, dg, *f1, f2, &qa, &qa2);
}

}  // namespace diffmoe
