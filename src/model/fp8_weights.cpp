#include "model/fp8_weights.h"

#include <algorithm>

#include <fmt/format.h>

#include "backend/op_args.h"

namespace diffmoe {

namespace {
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

void plan_fp8(const ModelConfig& cfg, PrecisionPlan& pl, int64_t tokens, Arena& acts) {
  if (!pl.fp8()) return;
  using R = ActRole;
  // The widest output (N) and input (K) sides, those of the expert stacks, and the largest matrix and
  // block-scale table.
  int64_t max_n = 0, max_k = 0, expert_width = 0, expert_sides = 0, matrix = 0, block_scales = 0, stack = 0,
          stack_scales = 0;
  for (const ParamSpec& p : parameter_specs(cfg)) {
    if (!pl.fp8_weight(p)) continue;
    const WeightDims d = weight_dims(p);
    max_n = std::max(max_n, d.n);
    max_k = std::max(max_k, d.k);
    const int64_t scales =
        std::max(fp8_tiles(d.n) * fp8_block_scale_cols(d.k), fp8_tiles(d.k) * fp8_block_scale_cols(d.n));
    if (d.experts > 0) {
      expert_width = std::max({expert_width, d.n, d.k});
      expert_sides = std::max(expert_sides, d.n + d.k);
      stack = std::max(stack, d.experts * d.n * d.k);
      stack_scales = std::max(stack_scales, d.experts * scales);
    }
    matrix = std::max(matrix, d.n * d.k);
    block_scales = std::max(block_scales, scales);
  }
  if (matrix == 0) return;
  // The most rows a dense Linear quantises: the tokens (LayerContext::scratch checks every view's size).
  const int64_t rows = tokens;
  // Slot a quantises x [rows, K] or dy [rows, N] row-wise (ceil(w/128)·rows scales), a_t dy and b_t x
  // in 128×1 tiles ([w, rows]: ceil(rows/128)·w scales); w and w_t hold one matrix's blocks.
  const int64_t width = std::max(max_n, max_k);
  // Two sets of views, each live only inside one kind of call, so they share their bytes: a dense
  // Linear's (D), and the routed experts' grouped Fprop/Dgrad's (G) with their grouped Wgrad's (W).
  std::vector<std::vector<ScratchView>> sets = {{
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
  }};
  if (expert_width > 0) {
    // G: all expert rows (tokens · top-k) of A and A2 row-wise, and the blocks of both stacks of a
    // two-term call. The two-term call is the Dgrad dx = da·W1 + db·W3, whose A2 = db is moe_inter_dim wide.
    const int64_t expert_rows = tokens * cfg.n_activated_experts;
    std::vector<ScratchView>& g = sets.emplace_back();
    for (const auto& [s, w] :
         {std::pair{"scratch.fp8.ga", expert_width}, std::pair{"scratch.fp8.ga2", cfg.moe_inter_dim}}) {
      g.push_back({fmt::format("{}.q", s), expert_rows * w, R::kFp8Data});
      g.push_back({fmt::format("{}.scale", s), fp8_tiles(w) * expert_rows, R::kFp8Scale});
    }
    for (const char* s : {"scratch.fp8.gw", "scratch.fp8.gw2"}) {
      g.push_back({fmt::format("{}.q", s), stack, R::kFp8Data});
      g.push_back({fmt::format("{}.scale", s), stack_scales, R::kFp8Scale});
    }
    // W: dy [R, N] and x [R, K] quantised transposed per expert (act_quant with offsets), both copies
    // in one view (N + K columns of tile slots: LayerContext cuts it in two). In the same set as G, not
    // sharing its bytes: the experts' backward writes dy's row-wise copy (for the Dgrad, in ga / ga2) in
    // the pass that writes its grouped transposed one.
    const int64_t slots = fp8_group_tiles(expert_rows, cfg.n_routed_experts);
    g.push_back({"scratch.fp8.gt.q", kFp8Tile * slots * expert_sides, R::kFp8Data});
    g.push_back({"scratch.fp8.gt.scale", slots * expert_sides, R::kFp8Scale});
  }
  const auto bytes_of = [&](const std::vector<ScratchView>& views) {
    size_t b = 0;
    for (const ScratchView& v : views) b += Arena::view_bytes(Shape{v.numel}, pl.dtype(v.role));
    return b;
  };
  size_t bytes = 0;  // the largest set's
  for (const auto& set : sets) bytes = std::max(bytes, bytes_of(set));
  std::string host = "scratch.dlogits";
  const auto e =
      std::find_if(acts.entries().begin(), acts.entries().end(), [&](const Arena::Entry& x) { return x.name == host; });
  DIFFMOE_CHECK(e != acts.entries().end(), "[model] plan_fp8: plan {} first (the FP8 scratch shares its bytes)", host);
  if (Arena::view_bytes(e->shape, e->dtype) < bytes) {
    host = "scratch.fp8";
    pl.add(acts, host, Shape{static_cast<int64_t>(bytes)}, R::kFp8Data);  // one byte per element
  }
  for (const auto& set : sets) {  // each set's views one after another from the host's first byte
    size_t offset = 0;
    for (const ScratchView& v : set) {
      pl.alias(acts, v.name, Shape{v.numel}, v.role, host, offset);
      offset += Arena::view_bytes(Shape{v.numel}, pl.dtype(v.role));
    }
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
