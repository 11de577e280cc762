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
}  // namespace

Fp8Weight Fp8Weight::expert(int64_t e) const {
  DIFFMOE_CHECK(experts > 0 && e >= 0 && e < experts, "[model] fp8 weight: expert {} of a {}-expert stack", e, experts);
  const int64_t tn = fp8_tiles(n), tk = fp8_tiles(k);
  return Fp8Weight{.w = w.reshape(Shape{experts * n, k}).rows(e * n, (e + 1) * n),
                   .q = q.rows(e * n, (e + 1) * n),
                   .scale = scale.rows(e * tn, (e + 1) * tn),
                   .q_t = q_t.rows(e * k, (e + 1) * k),
                   .scale_t = scale_t.rows(e * tk, (e + 1) * tk),
                   .n = n,
                   .k = k,
                   .experts = 0};
}

void plan_fp8(const ModelConfig& cfg, PrecisionPlan& pl, int64_t tokens, Arena& acts) {
  if (!pl.fp8()) return;
  using R = ActRole;
  // The weight copies, and the widest matrix side and the most rows a Linear quantises.
  int64_t width = 0, rows = tokens;
  bool experts = false;
  for (const ParamSpec& p : parameter_specs(cfg)) {
    if (!pl.fp8_weight(p)) continue;
    const WeightDims d = weight_dims(p);
    const int64_t e = std::max<int64_t>(d.experts, 1);
    const std::string base = "fp8." + p.name;
    pl.add(acts, base + ".q", Shape{e * d.n, d.k}, R::kFp8Data);
    pl.add(acts, base + ".scale", Shape{e * fp8_tiles(d.n), fp8_block_scale_cols(d.k)}, R::kFp8Scale);
    pl.add(acts, base + ".q_t", Shape{e * d.k, d.n}, R::kFp8Data);
    pl.add(acts, base + ".scale_t", Shape{e * fp8_tiles(d.k), fp8_block_scale_cols(d.n)}, R::kFp8Scale);
    width = std::max({width, d.n, d.k});
    experts = experts || d.experts > 0;
  }
  if (width == 0) return;
  // One expert's rows: at most all N·K routed rows, padded (fp8_linear.cpp).
  if (experts) rows = std::max(rows, round_up(tokens * cfg.n_activated_experts, kFp8RowPad));
  // The largest row-wise ([rows, w]: ceil(w/128)·rows scales) or transposed ([w, rows]: ceil(rows/128)·w)
  // quantisation of any side w ≤ width.
  const int64_t data = rows * width, scales = std::max(fp8_tiles(width) * rows, fp8_tiles(rows) * width);
  for (const char* slot : {"a", "a_t", "b_t"}) {
    pl.add(acts, fmt::format("scratch.fp8.{}.q", slot), Shape{data}, R::kFp8Data);
    pl.add(acts, fmt::format("scratch.fp8.{}.scale", slot), Shape{scales}, R::kFp8Scale);
  }
  if (experts) {
    pl.add(acts, "scratch.fp8.rows_a", Shape{data}, R::kGemmOperand);  // the expert rows' dtype (bf16)
    pl.add(acts, "scratch.fp8.rows_b", Shape{data}, R::kGemmOperand);
    pl.add(acts, "scratch.fp8.rows_c", Shape{data}, R::kFloat);  // an expert's f32 product
  }
}

Fp8WeightTable fp8_weight_table(const std::vector<ParamSpec>& specs, const PrecisionPlan& pl,
                                const LayoutBuffers& params, const Arena& acts) {
  Fp8WeightTable table;
  for (const ParamSpec& p : specs) {
    if (!pl.fp8_weight(p)) continue;
    const WeightDims d = weight_dims(p);
    const std::string base = "fp8." + p.name;
    const Tensor w = params.get(p.name);
    DIFFMOE_CHECK(w.dtype == DType::kBF16, "[model] the fp8 mode quantises {} from its bf16 compute weight, found {}",
                  p.name, dtype_name(w.dtype));
    table.emplace(w.data, Fp8Weight{.w = w,
                                    .q = acts.get(base + ".q"),
                                    .scale = acts.get(base + ".scale"),
                                    .q_t = acts.get(base + ".q_t"),
                                    .scale_t = acts.get(base + ".scale_t"),
                                    .n = d.n,
                                    .k = d.k,
                                    .experts = d.experts});
  }
  return table;
}

void quantize_fp8_weights(Backend& be, Context ctx, const Fp8WeightTable& table) {
  for (const auto& [addr, f] : table) {
    const int64_t e = std::max<int64_t>(f.experts, 1);
    for (int64_t i = 0; i < e; ++i) {
      const Fp8Weight m = f.experts > 0 ? f.expert(i) : f;
      // Both orientations in one pass; a block's amax does not depend on it (op_args.h).
      be.weight_quant(ctx, {.q = m.q, .scale = m.scale, .q_t = m.q_t, .scale_t = m.scale_t, .w = m.w});
    }
  }
}

}  // namespace diffmoe
