// The memory-bound element-wise ops at the bench preset's shapes (16384 tokens, dim 1536, 64
// experts top-4, moe_inter 512, 16 heads of 64 + 32 / 64, vocab 32768; bf16 outputs where the bf16
// GEMM mode has them): median device time, the bytes each op must move (every input read once,
// every output written once) and the bandwidth that gives, beside a same-size device copy (the
// practical ceiling). Results are checked against the CPU at small sizes in
// tests/ops/cuda_vs_cpu*.cpp and cuda_bf16_gemm.cpp; this only times. Inputs: a random pattern
// tiled over each tensor (non-zero; filling 10^9 values one by one would take longer than the
// timing). Cross-entropy runs on 4096 of the 16384 rows (bytes and time scale with rows).
#include <fmt/core.h>

#include <algorithm>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/arena.h"
#include "core/rng.h"
#include "device_timing.h"
#include "ops_bench.h"

namespace diffmoe::bench {
namespace {

// Uploads a tiled random pattern (normal, scaled by `std`) over a float tensor; integers in [0, hi)
// over an i32 tensor.
void fill_pattern(Backend& be, const Tensor& t, uint64_t seed, double std = 1.0, int32_t hi = 0) {
  constexpr int64_t kPeriod = (int64_t{1} << 20) + 7;  // not a multiple of any row width here
  const int64_t n = t.numel(), chunk = std::min(n, int64_t{1} << 24);
  std::vector<float> f;
  std::vector<int32_t> ints;
  if (t.dtype == DType::kI32) ints.resize(static_cast<size_t>(chunk));
  else f.resize(static_cast<size_t>(chunk));
  for (int64_t i = 0; i < chunk; ++i) {
    const uint64_t j = static_cast<uint64_t>(i % kPeriod);
    if (t.dtype == DType::kI32) ints[static_cast<size_t>(i)] = static_cast<int32_t>(uniform_at(seed, 3, j) * hi) % hi;
    else f[static_cast<size_t>(i)] = static_cast<float>(std * normal_at(seed, 5, j));
  }
  const size_t elem = dtype_size(t.dtype);
  for (int64_t off = 0; off < n; off += chunk) {
    Tensor part = t;
    part.data = static_cast<char*>(t.data) + off * static_cast<int64_t>(elem);
    part.shape = Shape{std::min(chunk, n - off)};
    be.upload(part, t.dtype == DType::kI32 ? static_cast<const void*>(ints.data()) : f.data());
  }
}

struct Row {
  std::string op;
  double ms, bytes;
};

}  // namespace

void bench_elementwise(Backend& be) {
  const int64_t N = 16384, D = 1536, E = 64, K = 4, NK = N * K, I = 512;
  const int64_t H = 16, dn = 64, dr = 32, dv = 64, rkv = 256, dqk = dn + dr;
  const int64_t R = 4096, V = 32768;  // cross-entropy rows timed
  Arena a;
  const auto add = [&](const char* name, Shape s, DType t = DType::kF32) { a.add(name, s, t); };
  add("x", Shape{N, D});
  add("y", Shape{N, D});
  add("perm_f32", Shape{NK, D});
  add("perm_bf16", Shape{NK, D}, DType::kBF16);
  add("topk_idx", Shape{N, K}, DType::kI32);
  add("topk_w", Shape{N, K});
  add("dtopk_w", Shape{N, K});
  add("offsets", Shape{E + 1}, DType::kI32);
  add("src_row", Shape{NK}, DType::kI32);
  add("slot_pos", Shape{N, K}, DType::kI32);
  add("ea", Shape{NK, I});
  add("eb", Shape{NK, I});
  add("edh", Shape{NK, I});
  add("eh", Shape{NK, I}, DType::kBF16);
  add("eda", Shape{NK, I}, DType::kBF16);
  add("edb", Shape{NK, I}, DType::kBF16);
  add("kv", Shape{N, H * (dn + dv)});
  add("kva", Shape{N, rkv + dr});
  add("k", Shape{N, H, dqk});
  add("v", Shape{N, H, dv});
  add("q", Shape{N, H * dqk});
  add("cos", Shape{2048, dr / 2});
  add("sin", Shape{2048, dr / 2});
  add("logits", Shape{R, V});
  add("targets", Shape{R}, DType::kI32);
  add("dlogits", Shape{R, V}, DType::kBF16);
  add("loss", Shape{1});
  add("valid", Shape{1});
  a.allocate(be.allocator());
  const auto t = [&](const char* name) { return a.get(name); };
  uint64_t seed = 600;
  for (const char* name : {"x", "y", "perm_f32", "topk_w", "ea", "eb", "edh", "kv", "kva", "k", "v", "q", "cos", "sin"})
    fill_pattern(be, t(name), seed++);
  fill_pattern(be, t("logits"), seed++, 3.0);
  fill_pattern(be, t("topk_idx"), seed++, 1.0, static_cast<int32_t>(E));
  fill_pattern(be, t("targets"), seed++, 1.0, static_cast<int32_t>(V));
  be.fill({}, {.out = t("valid"), .value = static_cast<double>(R)});
  be.moe_permute({}, {.offsets = t("offsets"),
                      .src_row = t("src_row"),
                      .slot_pos = t("slot_pos"),
                      .topk_idx = t("topk_idx"),
                      .n_experts = E});
  be.synchronize({});

  const double f32 = 4.0, bf16 = 2.0, tok = static_cast<double>(N * D), perm = static_cast<double>(NK * D);
  const double exp_n = static_cast<double>(NK * I);
  const double kv_bytes = static_cast<double>(N * H) * (dn + dv) * f32;  // kv (and dkv)
  const double k_bytes = static_cast<double>(N * H * dqk) * f32, v_bytes = static_cast<double>(N * H * dv) * f32;
  const double q_rope = static_cast<double>(N * H * dr) * f32 * 2, kva_rope = static_cast<double>(N * dr) * f32 * 2;
  constexpr int kReps = 20;
  std::vector<Row> rows;
  const auto time = [&](const std::string& op, double bytes, auto&& fn) {
    rows.push_back({op, median_ms(kReps, fn), bytes});
  };
  time("copy (f32 [N, D], the ceiling)", 2 * tok * f32, [&] { be.copy({}, {.dst = t("y"), .src = t("x")}); });
  time("moe_gather (bf16 x_perm)", perm * (f32 + bf16),
       [&] { be.moe_gather({}, {.x_perm = t("perm_bf16"), .x = t("x"), .src_row = t("src_row")}); });
  time("moe_gather_bwd", perm * f32 + 2 * tok * f32,
       [&] { be.moe_gather_bwd({}, {.dx = t("y"), .dx_perm = t("perm_f32"), .slot_pos = t("slot_pos")}); });
  time("moe_combine_fwd", perm * f32 + 2 * tok * f32, [&] {
    be.moe_combine_fwd({}, {.y = t("y"), .y_perm = t("perm_f32"), .topk_w = t("topk_w"), .slot_pos = t("slot_pos")});
  });
  time("moe_combine_bwd (bf16 dy_perm)", perm * (f32 + bf16) + tok * f32, [&] {
    be.moe_combine_bwd({}, {.dy_perm = t("perm_bf16"),
                            .dtopk_w = t("dtopk_w"),
                            .dy = t("x"),
                            .y_perm = t("perm_f32"),
                            .topk_w = t("topk_w"),
                            .slot_pos = t("slot_pos")});
  });
  time("swiglu_fwd experts (bf16 h)", exp_n * (2 * f32 + bf16),
       [&] { be.swiglu_fwd({}, {.h = t("eh"), .a = t("ea"), .b = t("eb")}); });
  time("swiglu_bwd experts (bf16 da, db)", exp_n * (3 * f32 + 2 * bf16),
       [&] { be.swiglu_bwd({}, {.da = t("eda"), .db = t("edb"), .dh = t("edh"), .a = t("ea"), .b = t("eb")}); });
  time("mla_kv_split_fwd", kv_bytes + static_cast<double>(N * dr) * f32 + k_bytes + v_bytes, [&] {
    be.mla_kv_split_fwd({}, {.k = t("k"),
                             .v = t("v"),
                             .kv = t("kv"),
                             .kr = t("kva"),
                             .n_heads = H,
                             .d_nope = dn,
                             .d_rope = dr,
                             .d_v = dv,
                             .kr_stride = rkv + dr,
                             .kr_offset = rkv});
  });
  time("mla_kv_split_bwd", k_bytes + v_bytes + kv_bytes + static_cast<double>(N * dr) * f32, [&] {
    be.mla_kv_split_bwd({}, {.dkv = t("kv"),
                             .dkr = t("kva"),
                             .dk = t("k"),
                             .dv = t("v"),
                             .n_heads = H,
                             .d_nope = dn,
                             .d_rope = dr,
                             .d_v = dv,
                             .kr_stride = rkv + dr,
                             .kr_offset = rkv});
  });
  time("rope q (16 heads)", q_rope, [&] {
    be.rope({}, {.x = t("q"),
                 .cos = t("cos"),
                 .sin = t("sin"),
                 .n_heads = H,
                 .head_stride = dqk,
                 .col_offset = dn,
                 .rope_dim = dr,
                 .seq_len = 2048});
  });
  time("rope kv (1 head)", kva_rope, [&] {
    be.rope({}, {.x = t("kva"),
                 .cos = t("cos"),
                 .sin = t("sin"),
                 .n_heads = 1,
                 .head_stride = rkv + dr,
                 .col_offset = rkv,
                 .rope_dim = dr,
                 .seq_len = 2048});
  });
  const double ce = static_cast<double>(R * V);
  time("cross_entropy_fwd (4096 rows)", ce * f32, [&] {
    be.cross_entropy_fwd({},
                         {.loss_sum = t("loss"), .valid = t("valid"), .logits = t("logits"), .targets = t("targets")});
  });
  be.fill({}, {.out = t("valid"), .value = static_cast<double>(R)});
  time("cross_entropy_bwd (4096 rows, bf16)", ce * (f32 + bf16), [&] {
    be.cross_entropy_bwd(
        {}, {.dlogits = t("dlogits"), .logits = t("logits"), .targets = t("targets"), .valid = t("valid")});
  });
  be.synchronize({});  // reports any device-side index issue

  fmt::print("[elementwise timing] bench shapes, median of {} runs\n", kReps);
  fmt::print("  {:<38} {:>9} {:>9} {:>9}\n", "op", "ms", "GB", "GB/s");
  for (const Row& r : rows)
    fmt::print("  {:<38} {:>9.4f} {:>9.3f} {:>9.0f}\n", r.op, r.ms, r.bytes * 1e-9, r.bytes * 1e-6 / r.ms);
}

}  // namespace diffmoe::bench
