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

void fp8_fprop(const LayerContext& lc, const Fp8Weight& f, const Tensor& y, const Tensor& x, double beta,
               const Tensor& addend) {
  const Fp8Slot a = rows_slot(lc, "a", x.dim(0), x.dim(1));
  lc.be->act_quant(lc.ctx, {.q = a.q, .scale = a.scale, .x = x});
  const Fp8Slot w = weight_blocks(lc, "w", f, /*transposed=*/false);
  lc.be->fp8_gemm(lc.ctx, {.c = y,
                           .a = a.q,
                           .a_scale = a.scale,
                           .b = w.q,
                           .b_scale = w.scale,
                           .b_scaling = Fp8Scaling::kBlock128x128,
                           .beta = beta,
                           .addend = addend});
}

// dx = dy W from dy's row-wise copy in slot "a".
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

// dW = dyᵀ x + beta·dW from dy's transposed copy and x quantised transposed here.
void fp8_wgrad_from(const LayerContext& lc, const Tensor& dw, const Fp8Slot& dy_t, const Tensor& x, double beta) {
  const Fp8Slot x_t = cols_slot(lc, "b_t", x.dim(0), x.dim(1));
  lc.be->act_quant(lc.ctx, {.q_t = x_t.q, .scale_t = x_t.scale, .x = x});
  lc.be->fp8_gemm(lc.ctx, {.c = dw,
                           .a = dy_t.q,
                           .a_scale = dy_t.scale,
                           .b = x_t.q,
                           .b_scale = x_t.scale,
                           .b_scaling = Fp8Scaling::kTile1x128,
                           .beta = beta});
}

}  // namespace

void LayerContext::linear(const Tensor& y, const Tensor& x, const Tensor& w, double beta, const Tensor& addend) const {
  if (const Fp8Weight* f = fp8_weight(w)) return fp8_fprop(*this, *f, y, x, beta, addend);
  be->gemm(ctx,
           {.c = y, .a = x, .b = w, .trans_a = false, .trans_b = true, .alpha = 1.0, .beta = beta, .addend = addend});
}

void LayerContext::linear_dx(const Tensor& dx, const Tensor& dy, const Tensor& w, double beta) const {
  if (const Fp8Weight* f = fp8_weight(w)) {
    const Fp8Slot a = rows_slot(*this, "a", dy.dim(0), dy.dim(1));
    be->act_quant(ctx, {.q = a.q, .scale = a.scale, .x = dy});
    return fp8_dgrad_from(*this, *f, dx, a, beta);
  }
  be->gemm(ctx, {.c = dx, .a = dy, .b = w, .trans_a = false, .trans_b = false, .alpha = 1.0, .beta = beta});
}

void LayerContext::linear_dw(const Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w) const {
  if (fp8_weight(w) != nullptr) {
    const Fp8Slot dy_t = cols_slot(*this, "a_t", dy.dim(0), dy.dim(1));
    be->act_quant(ctx, {.q_t = dy_t.q, .scale_t = dy_t.scale, .x = dy});
    return fp8_wgrad_from(*this, dw, dy_t, x, dw_beta_for(dw));
  }
  be->gemm(ctx, {.c = dw, .a = dy, .b = x, .trans_a = true, .trans_b = false, .alpha = 1.0, .beta = dw_beta_for(dw)});
}

void LayerContext::linear_backward(const Tensor& dw, const Tensor& dx, const Tensor& dy, const Tensor& x,
                                   const Tensor& w, double beta_dx) const {
  if (const Fp8Weight* f = fp8_weight(w)) {
    // One pass over dy writes both of its copies: 1×128 tiles (Dgrad) and 128×1 tiles (Wgrad).
    const int64_t m = dy.dim(0), n = dy.dim(1);
    const Fp8Slot a = rows_slot(*this, "a", m, n), a_t = cols_slot(*this, "a_t", m, n);
    be->act_quant(ctx, {.q = a.q, .scale = a.scale, .q_t = a_t.q, .scale_t = a_t.scale, .x = dy});
    fp8_wgrad_from(*this, dw, a_t, x, dw_beta_for(dw));
    return fp8_dgrad_from(*this, *f, dx, a, beta_dx);
  }
  const Tensor op = gemm_operand(dy);
  linear_dw(dw, op, x, w);
  linear_dx(dx, op, w, beta_dx);
}

void LayerContext::grouped_gemm(const GroupedGemmArgs& a) const {
  const Fp8Weight* f = fp8_weight(a.b);
  if (f == nullptr) return be->grouped_gemm(ctx, a);
  const Fp8Weight* f2 = a.b2.defined() ? fp8_weight(a.b2) : nullptr;
  DIFFMOE_CHECK(!a.b2.defined() || f2 != nullptr,
                "[model] grouped_gemm: an FP8 stack b with a second stack b2 that is not FP8");
  DIFFMOE_CHECK(f->experts > 0 && (f2 == nullptr || f2->experts > 0),
                "[model] grouped_gemm: the FP8 weight {} is not an expert stack", a.b.describe());
  DIFFMOE_CHECK(a.alpha == 1.0 && a.beta == 0.0,
                "[model] the FP8 grouped GEMM writes C (alpha 1, beta 0), got alpha {} beta {}", a.alpha, a.beta);
  // One term: its A quantised row-wise (all rows) in slot a_slot, its stack's blocks in w_slot.
  const auto term = [&](const Tensor& src, const Fp8Weight& stack, const char* a_slot, const char* w_slot) {
    const Fp8Slot q = rows_slot(*this, a_slot, src.dim(0), src.dim(1));
    be->act_quant(ctx, {.q = q.q, .scale = q.scale, .x = src});
    return std::pair{q, weight_blocks(*this, w_slot, stack, /*transposed=*/!a.trans_b)};
  };
  const auto [qa, qb] = term(a.a, *f, "ga", "gw");
  Fp8GroupedGemmArgs g{.c = a.c, .a = qa.q, .a_scale = qa.scale, .b = qb.q, .b_scale = qb.scale, .offsets = a.offsets};
  if (f2 != nullptr) {
    const auto [qa2, qb2] = term(a.a2, *f2, "ga2", "gw2");
    g.a2 = qa2.q;
    g.a2_scale = qa2.scale;
    g.b2 = qb2.q;
    g.b2_scale = qb2.scale;
  }
  be->fp8_grouped_gemm(ctx, g);
}

void LayerContext::grouped_gemm_wgrad(const GroupedGemmWgradArgs& a, const Tensor& w) const {
  if (fp8_weight(w) == nullptr) return be->grouped_gemm_wgrad(ctx, a);
  DIFFMOE_CHECK(a.alpha == 1.0, "[model] the FP8 expert weight gradient takes alpha 1, got {}", a.alpha);
  // C_g = A_gᵀ B_g + beta·C_g: the Wgrad of y = x Wᵀ with dy = A [R, m], x = B [R, n], each quantised
  // transposed in tiles that restart at every expert's first row.
  const int64_t slots = fp8_group_tiles(a.a.dim(0), a.c.dim(0)), m = a.a.dim(1), n = a.b.dim(1);
  // Slot "gt" holds both copies: dy's [m, 128·T] then x's [n, 128·T] (scales [T, m] then [T, n]).
  const Fp8Slot both = slot(*this, "gt", Shape{(m + n) * kFp8Tile * slots}, Shape{slots * (m + n)});
  const auto grouped_t = [&](const Tensor& src, int64_t first, int64_t width) {
    const Fp8Slot t{.q = both.q.rows(first * kFp8Tile * slots, (first + width) * kFp8Tile * slots)
                             .reshape(Shape{width, kFp8Tile * slots}),
                    .scale = both.scale.rows(first * slots, (first + width) * slots).reshape(Shape{slots, width})};
    be->act_quant(ctx, {.q_t = t.q, .scale_t = t.scale, .x = src, .offsets = a.offsets});
    return t;
  };
  const Fp8Slot dy_t = grouped_t(a.a, 0, m), x_t = grouped_t(a.b, m, n);
  be->fp8_grouped_gemm_wgrad(ctx, {.c = a.c,
                                   .a = dy_t.q,
                                   .a_scale = dy_t.scale,
                                   .b = x_t.q,
                                   .b_scale = x_t.scale,
                                   .offsets = a.offsets,
                                   .beta = a.beta,
                                   .sum_sq = a.sum_sq});
}

}  // namespace diffmoe
