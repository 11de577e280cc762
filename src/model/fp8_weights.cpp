#include "model/fp8_weights.h"

#include <algorithm>

#include <fmt/format.h>

#include "backend/op_args.h"

namespace diffmoe {

namespace {
int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
// One matrix's [N, K] of a weight spec ([N, K] or a stack [E, N, K]) and its expert count (0: a matrix).
struct WeightDims {
  int64_t experts, n, k;
};
WeightDims weight_dims(const ParamSpec& p) {
  return WeightDims{.experts = p.shape.rank() == 3 ? p.shape[0] : 0, .n = p.shape[-2], .k = p.shape[-1]};
}
// One view of the FP8 scratch: its name, element count and role.
struct ScratchView {
  std::string name;
  int64_t numel;
  ActRole role;
};
}  // namespace

Fp8Weight Fp8Weight::expert(int64_t e) const {
  DIFFMOE_CHECK(experts > 0 && e >= 0 && e < experts, "[model] fp8 weight: expert {} of a {}-expert stack", e, experts);
  return Fp8Weight{.w = w.reshape(Shape{experts * n, k}).rows(e * n, (e + 1) * n), .n = n, .k = k, .experts = 0};
}

void plan_fp8(const ModelConfig& cfg, PrecisionPlan& pl, int64_t tokens, Arena& acts) {
  if (!pl.fp8()) return;
  using R = ActRole;
  // The widest output (N) and input (K) sides, those of the expert stacks, and the largest matrix and
  // block-scale table.
  int64_t max_n = 0, max_k = 0, expert_width = 0, matrix = 0, block_scales = 0;
  for (const ParamSpec& p : parameter_specs(cfg)) {
    if (!pl.fp8_weight(p)) continue;
    const WeightDims d = weight_dims(p);
    max_n = std::max(max_n, d.n);
    max_k = std::max(max_k, d.k);
    if (d.experts > 0) expert_width = std::max({expert_width, d.n, d.k});
    matrix = std::max(matrix, d.n * d.k);
    block_scales = std::max(
        {block_scales, fp8_tiles(d.n) * fp8_block_scale_cols(d.k), fp8_tiles(d.k) * fp8_block_scale_cols(d.n)});
  }
  if (matrix == 0) return;
  // The most rows a Linear quantises: the tokens, or one routed expert's rows padded to kFp8RowPad (a
  // token picks K distinct experts, so an expert gets at most one row per token; LayerContext::scratch
  // checks every view's size).
  const int64_t rows = round_up(tokens, kFp8RowPad);
  // Slot a quantises x [rows, K] or dy [rows, N] row-wise (ceil(w/128)·rows scales), a_t dy and b_t x
  // in 128×1 tiles ([w, rows]: ceil(rows/128)·w scales); w and w_t hold one matrix's blocks.
  const int64_t width = std::max(max_n, max_k);
  std::vector<ScratchView> views = {
      {"scratch.fp8.a.q", rows * width, R::kFp8Data},
      {"scratch.fp8.a.scale", fp8_tiles(width) * rows, R::kFp8Scale},
      {"scratch.fp8.a_t.q", rows * max_n, R::kFp8Data},
      {"scratch.fp8.a_t.scale", fp8_tiles(rows) * max_n, R::kFp8Scale},
      {"scratch.fp8.b_t.q", rows * max_k, R::kFp8Data},
      {"scratch.fp8.b_t.scale", fp8_tiles(rows) * max_k, R::kFp8Scale},
      {"scratch.fp8.w.q", matrix, R::kFp8Data},
      {"scratch.fp8.w.scale", block_scales, R::kFp8Scale},
      {"scratch.fp8.w_t.q", matrix, R::kFp8Data},
      {"scratch.fp8.w_t.scale", block_scales, R::kFp8Scale},
      // the bf16 rounding of an f32 compute weight, which its blocks are quantised from
      {"scratch.fp8.w16", matrix, R::kGemmOperand},
  };
  if (expert_width > 0) {  // an expert's rows of x, dy (bf16, the expert rows' dtype) and its f32 product
    views.push_back({"scratch.fp8.rows_a", rows * expert_width, R::kGemmOperand});
    views.push_back({"scratch.fp8.rows_b", rows * expert_width, R::kGemmOperand});
    views.push_back({"scratch.fp8.rows_c", rows * expert_width, R::kFloat});
  }
  size_t bytes = 0;
  for (const ScratchView& v : views) bytes += Arena::view_bytes(Shape{v.numel}, pl.dtype(v.role));
  std::string host = "scratch.dlogits";
  const auto e =
      std::find_if(acts.entries().begin(), acts.entries().end(), [&](const Arena::Entry& x) { return x.name == host; });
  DIFFMOE_CHECK(e != acts.entries().end(), "[model] plan_fp8: plan {} first (the FP8 scratch shares its bytes)", host);
  if (Arena::view_bytes(e->shape, e->dtype) < bytes) {
    host = "scratch.fp8";
    pl.add(acts, host, Shape{static_cast<int64_t>(bytes)}, R::kFp8Data);  // one byte per element
  }
  size_t offset = 0;
  for (const ScratchView& v : views) {
    pl.alias(acts, v.name, Shape{v.numel}, v.role, host, offset);
    offset += Arena::view_bytes(Shape{v.numel}, pl.dtype(v.role));
  }
}

Fp8WeightTable fp8_weight_table(const std::vector<ParamSpec>& specs, const PrecisionPlan& pl,
                                const LayoutBuffers& params) {
  Fp8WeightTable table;
  for (const ParamSpec& p : specs) {
    if (!pl.fp8_weight(p)) continue;
    const WeightDims d = weight_dims(p);
    const Tensor w = params.get(p.name);
    DIFFMOE_CHECK(w.dtype == DType::kBF16 || w.dtype == DType::kF32,
                  "[model] the fp8 mode quantises {} from a bf16 or f32 compute weight, found {}", p.name,
                  dtype_name(w.dtype));
    table.emplace(w.data, Fp8Weight{.w = w, .n = d.n, .k = d.k, .experts = d.experts});
  }
  return table;
}

}  // namespace diffmoe
