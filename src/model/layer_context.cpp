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
// Routed experts: no grouped FP8 GEMM exists, so an FP8 stack runs one fp8_gemm per expert over its
// contiguous rows (the offsets read back to the host: a synchronisation on a GPU; correct, not the
// fast path). Each expert's rows are copied into scratch padded with zero rows to a multiple of
// kFp8RowPad (cuBLASLt's FP8 shape rules); a zero row changes no tile's amax and adds nothing to a
// sum, so the padding does not change a value. The product goes through an f32 scratch and is
// rounded once into the planned (bf16) expert rows.
#include <vector>

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

// The weight the blocks are quantised from: the bf16 compute weight, or an f32 one (its own master,
// PrecisionPlan::compute_dtype) rounded to bf16 into scratch first, as a bf16 copy would hold it.
Tensor bf16_weight(const LayerContext& lc, const Fp8Weight& f) {
  if (f.w.dtype == DType::kBF16) return f.w;
  const Tensor w16 = lc.scratch("scratch.fp8.w16", Shape{f.n, f.k});
  lc.be->copy(lc.ctx, {.dst = w16, .src = f.w});  // round to nearest even, as the optimizer's bf16 copy
  return w16;
}
// W [N, K] in 128×128 blocks (Fprop's B) in slot "w", or Wᵀ [K, N] (Dgrad's B) in slot "w_t".
Fp8Slot weight_blocks(const LayerContext& lc, const Fp8Weight& f) {
  const Fp8Slot b = slot(lc, "w", Shape{f.n, f.k}, Shape{fp8_tiles(f.n), fp8_block_scale_cols(f.k)});
  lc.be->weight_quant(lc.ctx, {.q = b.q, .scale = b.scale, .w = bf16_weight(lc, f)});
  return b;
}
Fp8Slot weight_blocks_t(const LayerContext& lc, const Fp8Weight& f) {
  const Fp8Slot b = slot(lc, "w_t", Shape{f.k, f.n}, Shape{fp8_tiles(f.k), fp8_block_scale_cols(f.n)});
  lc.be->weight_quant(lc.ctx, {.q_t = b.q, .scale_t = b.scale, .w = bf16_weight(lc, f)});
  return b;
}

void fp8_fprop(const LayerContext& lc, const Fp8Weight& f, const Tensor& y, const Tensor& x, double beta,
               const Tensor& addend) {
  const Fp8Slot a = rows_slot(lc, "a", x.dim(0), x.dim(1));
  lc.be->act_quant(lc.ctx, {.q = a.q, .scale = a.scale, .x = x});
  const Fp8Slot w = weight_blocks(lc, f);
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
  const Fp8Slot w_t = weight_blocks_t(lc, f);
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

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Rows [r0, r1) of src copied into the flat scratch `name` as [mp, width], rows past r1 − r0 zero.
Tensor padded_rows(const LayerContext& lc, const char* name, const Tensor& src, int64_t r0, int64_t r1, int64_t mp) {
  const Tensor t = lc.scratch(name, Shape{mp, src.dim(1)});
  lc.be->copy(lc.ctx, {.dst = t.rows(0, r1 - r0), .src = src.rows(r0, r1)});
  if (mp > r1 - r0) lc.be->fill(lc.ctx, {.out = t.rows(r1 - r0, mp), .value = 0.0});
  return t;
}

std::vector<int32_t> host_offsets(const LayerContext& lc, const Tensor& offsets) {
  std::vector<int32_t> off(static_cast<size_t>(offsets.numel()));
  lc.be->download(off.data(), offsets);  // a host synchronisation on a GPU (the per-expert loop needs the row ranges)
  return off;
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
  DIFFMOE_CHECK(a.alpha == 1.0 && a.beta == 0.0,
                "[model] the FP8 grouped GEMM writes C (alpha 1, beta 0), got alpha {} beta {}", a.alpha, a.beta);
  const std::vector<int32_t> off = host_offsets(*this, a.offsets);
  const int64_t n = a.c.dim(1);
  for (int64_t g = 0; g + 1 < static_cast<int64_t>(off.size()); ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g) + 1],
                  mp = round_up(r1 - r0, kFp8RowPad);
    if (r1 == r0) continue;  // an empty group writes no row
    const Tensor c = scratch("scratch.fp8.rows_c", Shape{mp, n});
    // C_g = A_g · op(B_g) (+ A2_g · op(B2_g)): Fprop with B's blocks (trans_b) or Dgrad with Bᵀ's.
    auto term = [&](const Tensor& src, const Fp8Weight& stack, double beta) {
      const Tensor x = padded_rows(*this, "scratch.fp8.rows_a", src, r0, r1, mp);
      const Fp8Slot q = rows_slot(*this, "a", mp, x.dim(1));
      be->act_quant(ctx, {.q = q.q, .scale = q.scale, .x = x});
      const Fp8Weight e = stack.expert(g);
      const Fp8Slot w = a.trans_b ? weight_blocks(*this, e) : weight_blocks_t(*this, e);
      be->fp8_gemm(ctx, {.c = c,
                         .a = q.q,
                         .a_scale = q.scale,
                         .b = w.q,
                         .b_scale = w.scale,
                         .b_scaling = Fp8Scaling::kBlock128x128,
                         .beta = beta});
    };
    term(a.a, *f, 0.0);
    if (f2 != nullptr) term(a.a2, *f2, 1.0);
    be->copy(ctx, {.dst = a.c.rows(r0, r1), .src = c.rows(0, r1 - r0)});  // rounded once into C's dtype
  }
}

void LayerContext::grouped_gemm_wgrad(const GroupedGemmWgradArgs& a, const Tensor& w) const {
  const Fp8Weight* f = fp8_weight(w);
  if (f == nullptr) return be->grouped_gemm_wgrad(ctx, a);
  DIFFMOE_CHECK(a.alpha == 1.0, "[model] the FP8 expert weight gradient takes alpha 1, got {}", a.alpha);
  const std::vector<int32_t> off = host_offsets(*this, a.offsets);
  const int64_t m = a.c.dim(1), n = a.c.dim(2);
  const Tensor stack = a.c.reshape(Shape{a.c.dim(0) * m, n});
  for (int64_t g = 0; g + 1 < static_cast<int64_t>(off.size()); ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g) + 1],
                  mp = round_up(r1 - r0, kFp8RowPad);
    const Tensor dw = stack.rows(g * m, (g + 1) * m);
    if (r1 == r0) {  // an empty group leaves beta·C[g] (GroupedGemmWgradArgs)
      if (a.beta == 0.0) be->fill(ctx, {.out = dw, .value = 0.0});
      else if (a.beta != 1.0) be->scale(ctx, {.y = dw, .alpha = a.beta});
    } else {
      // C_g = A_gᵀ B_g + beta·C_g: the Wgrad of y = x Wᵀ with dy = A_g [rows, m], x = B_g [rows, n].
      const Tensor dy = padded_rows(*this, "scratch.fp8.rows_a", a.a, r0, r1, mp);
      const Tensor x = padded_rows(*this, "scratch.fp8.rows_b", a.b, r0, r1, mp);
      const Fp8Slot dy_t = cols_slot(*this, "a_t", mp, m);
      be->act_quant(ctx, {.q_t = dy_t.q, .scale_t = dy_t.scale, .x = dy});
      fp8_wgrad_from(*this, dw, dy_t, x, a.beta);
    }
    if (a.sum_sq.defined())
      be->sum_squares(ctx, {.out = a.sum_sq, .x = dw});  // Σ of the new C², as the grouped op adds
  }
}

}  // namespace diffmoe
