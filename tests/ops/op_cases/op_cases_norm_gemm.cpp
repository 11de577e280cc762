// Op cases: RMSNorm (forward and backward, every launch branch of cuda/norm_ops.cu), the dense GEMM
// (every transpose, beta 0 and not, k = 0) and the grouped expert GEMMs (forward, weight gradient). Method and modes:
// op_case.h.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "op_case.h"

namespace diffmoe::opcases {
namespace {

// Forward, both paths: y in f64 rounded once, as on the CPU; Σx² adds in another order (and the
// vector path's f64 rsqrt is within an f64 ulp), so r may differ by one f32 ulp (1.2e-7 relative).
constexpr Tol kNormTol{1e-6, 1e-7, "f64 arithmetic rounded once; r within an f32 ulp"};
// Backward dx = r·(g − x̂·m): the vector path computes it in f32 with ~5 roundings of terms of size
// |r·g| ≤ ~10 for these inputs (6e-8 each), plus one for the accumulation.
constexpr Tol kNormBwdTol{1e-5, 1e-6, "f32 arithmetic on terms of size <= 10, a few roundings"};
// dw += out_scale·Σ_rows dy·x̂: each term carries ~2 f32 roundings (1.2e-7 relative) with random
// signs, chunk sums round once more in f32: the error grows like 1.2e-7·√rows·|dy·x̂| (≈ 1 here).
Tol norm_dw_tol(int64_t rows) {
  return Tol{1e-5, 1e-6 * std::sqrt(static_cast<double>(std::max<int64_t>(rows, 1))),
             "f32 terms summed over rows: error ~1e-7*sqrt(rows), atol 1e-6*sqrt(rows)"};
}

// norm_ops.cu has a vector path (widths and strides multiples of 4, 16-byte aligned pointers,
// width ≤ 8192; a warp per row up to 512 columns, else a block of 128 or 512 threads, 1…4 packs
// of 4 columns per thread) and a general path (f64, scalar) for everything else.
struct NormShape {
  int64_t rows, width, xs = 0, ys = 0;  // strides; 0 = width
  double out_scale = 1.0;
  bool shift_x = false;   // x one float off its alignment (forward)
  bool shift_dy = false;  // dy one float off its alignment (backward)
  bool accumulate = false, in_place = false;
  const char* branch = "";
  bool bench_only = false;
};

OpCase rmsnorm_case(const NormShape& s, uint64_t seed) {
  const int64_t xs = s.xs ? s.xs : s.width, ys = s.ys ? s.ys : s.width, rows = s.rows, width = s.width;
  const int64_t xn = std::max<int64_t>(rows * xs, 1), yn = std::max<int64_t>(rows * ys, 1);
  const auto init = [&](Init i) { return s.bench_only ? tiled(i) : i; };
  OpCase c{.op = "rmsnorm", .branch = s.branch, .shape = fmt::format("{}x{}", rows, width)};
  if (s.xs || s.ys) c.shape += fmt::format(" xs{} ys{}", xs, ys);
  if (s.accumulate) c.shape += " accumulate";
  if (s.in_place) c.shape += " in-place";
  c.seed = seed;
  c.bench_only = s.bench_only;
  // dx: written over x (in place), accumulated, or with gaps between strided rows: all keep values.
  const bool dx_kept = s.accumulate || xs != width || rows == 0;
  c.tensors = {
      {.name = "x",
       .shape = Shape{xn},
       .role = s.in_place ? Role::kUpdate : Role::kInput,
       .step = Step::kBwd,
       .init = init(normal(2.0)),
       .offset = s.shift_x ? 1 : 0},
      {.name = "w", .shape = Shape{width}, .init = normal(0.2, 1.0)},
      // Strided y: the gaps between rows must stay as they are (and with no rows, all of it).
      {.name = "y",
       .shape = Shape{yn},
       .role = ys == width && rows > 0 ? Role::kOutput : Role::kUpdate,
       .init = init(normal())},
      {.name = "rstd", .shape = Shape{rows}, .role = Role::kOutput},
      {.name = "dy", .shape = Shape{yn}, .init = init(normal()), .offset = s.shift_dy ? 1 : 0, .bwd_only = true},
      {.name = "dw", .shape = Shape{width}, .role = Role::kUpdate, .step = Step::kBwd, .init = normal()},
  };
  if (!s.in_place)
    c.tensors.push_back({.name = "dx",
                         .shape = Shape{xn},
                         .role = dx_kept ? Role::kUpdate : Role::kOutput,
                         .step = Step::kBwd,
                         .init = init(normal())});
  c.fwd = [s, rows, width](Backend& be, const Tensors& t) {
    be.rmsnorm_fwd({}, {.y = t("y"),
                        .rstd = t("rstd"),
                        .x = t("x"),
                        .w = t("w"),
                        .rows = rows,
                        .width = width,
                        .x_stride = s.xs,
                        .y_stride = s.ys,
                        .eps = 1e-6,
                        .out_scale = s.out_scale});
  };
  c.bwd = [s, rows, width](Backend& be, const Tensors& t) {
    be.rmsnorm_bwd({}, {.dx = s.in_place ? t("x") : t("dx"),
                        .dw = t("dw"),
                        .dy = t("dy"),
                        .x = t("x"),
                        .w = t("w"),
                        .rstd = t("rstd"),
                        .rows = rows,
                        .width = width,
                        .x_stride = s.xs,
                        .y_stride = s.ys,
                        .out_scale = s.out_scale,
                        .dx_accumulate = s.accumulate});
  };
  c.tol = kNormTol;
  c.tol_of = {{"dx", kNormBwdTol}, {"x", kNormBwdTol}, {"dw", norm_dw_tol(rows)}};
  c.grads = {{"x", "dx"}, {"w", "dw"}};
  c.upstream = {{"y", "dy"}};
  if (s.in_place) c.no_fd = "dx written over x: the same formula is checked by the out-of-place cases";
  if (rows == 0) c.no_fd = "no rows: nothing to differentiate";
  return c;
}

// f32 dot products of length k in different orders (cuBLAS vs OpenBLAS), inputs N(0,1): the
// absolute error is a few f32 ulps of Σ|a||b| ≈ k, so atol = 4e-6·k; rtol 1e-5 for the large values.
Tol gemm_tol(int64_t k) {
  return Tol{1e-5, 4e-6 * static_cast<double>(std::max<int64_t>(k, 1)), "f32 sums of k products, other order"};
}

struct GemmShape {
  int64_t m, n, k;
  bool ta, tb;
  double alpha, beta;
  bool bench_only = false;
  GemmPrecision precision = GemmPrecision::kF32;
};

OpCase gemm_case(const GemmShape& g, uint64_t seed) {
  const auto init = [&](Init i) { return g.bench_only ? tiled(i) : i; };
  OpCase c{.op = "gemm",
           .branch = fmt::format("{}{} beta {}{}", g.ta ? "T" : "N", g.tb ? "T" : "N", g.beta,
                                 g.precision == GemmPrecision::kBF16 ? " bf16 mode" : ""),
           .shape = fmt::format("{}x{}x{}", g.m, g.n, g.k)};
  c.seed = seed;
  c.bench_only = g.bench_only;
  c.precision = g.precision;
  c.tensors = {
      {.name = "a", .shape = g.ta ? Shape{g.k, g.m} : Shape{g.m, g.k}, .init = init(normal())},
      {.name = "b", .shape = g.tb ? Shape{g.n, g.k} : Shape{g.k, g.n}, .init = init(normal())},
      // beta = 0 must not read C: it starts poisoned (NaN stays out).
      {.name = "c",
       .shape = Shape{g.m, g.n},
       .role = g.beta == 0.0 ? Role::kOutput : Role::kUpdate,
       .init = init(normal())},
  };
  c.fwd = [g](Backend& be, const Tensors& t) {
    be.gemm(
        {},
        {.c = t("c"), .a = t("a"), .b = t("b"), .trans_a = g.ta, .trans_b = g.tb, .alpha = g.alpha, .beta = g.beta});
  };
  c.tol = g.k == 0 ? Tol{1e-6, 1e-7, "k = 0: C = beta·C, one rounding"} : gemm_tol(g.k);
  if (g.precision == GemmPrecision::kBF16)
    c.cuda_nondeterministic = "the bf16 mode's cuBLASLt algorithm is chosen by timing (lt_gemm.h)";
  c.fwd_flops = 2.0 * static_cast<double>(g.m * g.n * g.k);
  return c;
}

// Grouped GEMMs over experts (op_args.h GroupedGemmArgs): offsets with two empty groups and rows past
// offsets[G] that must stay untouched.
struct GroupedShape {
  int64_t R, G, k, n;  // forward: A [R, k], C [R, n]; weight gradient: A [R, k], B [R, n], C [G, k, n]
  std::vector<double> offsets;
  const char* branch;
  bool bench_only = false;
};

// Rows in use first (NaN when beta = 0: a kernel that reads C there shows it), then rows to keep.
Init grouped_c(int64_t R, int64_t n, int64_t used, bool poison_used) {
  return computed([=](uint64_t seed) {
    std::vector<double> v(static_cast<size_t>(R * n));
    for (int64_t i = 0; i < R * n; ++i)
      v[static_cast<size_t>(i)] =
          poison_used && i < used * n ? std::nan("") : normal_at(seed, 1, static_cast<uint64_t>(i));
    return v;
  });
}

OpCase grouped_gemm_case(const GroupedShape& g, bool trans_b, double beta, uint64_t seed) {
  const int64_t G = g.G, used = static_cast<int64_t>(g.offsets.back());
  const auto init = [&](Init i) { return g.bench_only ? tiled(i) : i; };
  OpCase c{.op = "grouped_gemm",
           .branch = fmt::format("{} beta {}", trans_b ? "B transposed" : "B plain", beta),
           .shape = fmt::format("R{} G{} k{} n{} {}", g.R, G, g.k, g.n, g.branch)};
  c.seed = seed;
  c.bench_only = g.bench_only;
  c.tensors = {
      {.name = "a", .shape = Shape{g.R, g.k}, .init = init(normal())},
      {.name = "b", .shape = trans_b ? Shape{G, g.n, g.k} : Shape{G, g.k, g.n}, .init = init(normal())},
      {.name = "offsets", .shape = Shape{G + 1}, .dtype = DType::kI32, .init = values(g.offsets)},
      {.name = "c",
       .shape = Shape{g.R, g.n},
       .role = Role::kUpdate,
       .init = g.bench_only ? tiled(normal()) : grouped_c(g.R, g.n, used, beta == 0.0)},
  };
  c.fwd = [trans_b, beta](Backend& be, const Tensors& t) {
    be.grouped_gemm({}, {.c = t("c"),
                         .a = t("a"),
                         .b = t("b"),
                         .offsets = t("offsets"),
                         .trans_b = trans_b,
                         .alpha = 0.8,
                         .beta = beta});
  };
  c.tol = gemm_tol(g.k);
  c.fwd_flops = 2.0 * static_cast<double>(used * g.n * g.k);
  return c;
}

OpCase grouped_wgrad_case(const GroupedShape& g, double beta, uint64_t seed) {
  const int64_t G = g.G, used = static_cast<int64_t>(g.offsets.back());
  const auto init = [&](Init i) { return g.bench_only ? tiled(i) : i; };
  int64_t largest = 0;
  for (size_t i = 0; i + 1 < g.offsets.size(); ++i)
    largest = std::max(largest, static_cast<int64_t>(g.offsets[i + 1] - g.offsets[i]));
  OpCase c{.op = "grouped_gemm_wgrad",
           .branch = fmt::format("beta {}", beta),
           .shape = fmt::format("R{} G{} m{} n{} {}", g.R, G, g.k, g.n, g.branch)};
  c.seed = seed;
  c.bench_only = g.bench_only;
  c.tensors = {
      {.name = "a", .shape = Shape{g.R, g.k}, .init = init(normal())},
      {.name = "b", .shape = Shape{g.R, g.n}, .init = init(normal())},
      {.name = "offsets", .shape = Shape{G + 1}, .dtype = DType::kI32, .init = values(g.offsets)},
      // beta = 0: empty groups become 0 (the output starts poisoned); beta = 1: they keep C.
      {.name = "c",
       .shape = Shape{G, g.k, g.n},
       .role = beta == 0.0 ? Role::kOutput : Role::kUpdate,
       .init = init(normal())},
  };
  c.fwd = [beta](Backend& be, const Tensors& t) {
    be.grouped_gemm_wgrad({},
                          {.c = t("c"), .a = t("a"), .b = t("b"), .offsets = t("offsets"), .alpha = 0.5, .beta = beta});
  };
  c.tol = gemm_tol(largest);  // sums over a group's rows
  c.fwd_flops = 2.0 * static_cast<double>(used * g.n * g.k);
  return c;
}

std::vector<double> even_offsets(int64_t rows, int64_t groups) {
  std::vector<double> o;
  for (int64_t g = 0; g <= groups; ++g) o.push_back(static_cast<double>(rows * g / groups));
  return o;
}

}  // namespace

std::vector<OpCase> norm_gemm_cases() {
  std::vector<OpCase> out;
  uint64_t seed = 100;
  const NormShape norms[] = {
      {.rows = 333, .width = 70, .out_scale = 0.9, .branch = "general: width % 4 != 0, several dw row chunks"},
      {.rows = 333, .width = 70, .accumulate = true, .branch = "general: accumulate"},
      {.rows = 50, .width = 37, .xs = 45, .ys = 40, .out_scale = 0.8, .branch = "general: odd width and strides"},
      {.rows = 97, .width = 33, .in_place = true, .branch = "general: dx written over x"},
      {.rows = 0, .width = 5, .branch = "no rows"},
      {.rows = 40, .width = 64, .xs = 66, .branch = "general: x_stride % 4 != 0"},
      {.rows = 45, .width = 64, .xs = 68, .ys = 66, .branch = "general: y_stride % 4 != 0"},
      {.rows = 45, .width = 64, .shift_x = true, .branch = "general: x not 16-byte aligned"},
      {.rows = 60, .width = 64, .shift_dy = true, .branch = "general: dy not 16-byte aligned"},
      {.rows = 3, .width = 8196, .accumulate = true, .branch = "general: wider than the vector path"},
      {.rows = 1000, .width = 128, .out_scale = 0.8, .branch = "vector: warp, 1 pack (differential sub-norm)"},
      {.rows = 3000, .width = 128, .branch = "vector: warp, 1 pack, 94 row chunks"},
      {.rows = 77, .width = 68, .accumulate = true, .branch = "vector: warp, 1 pack, idle lanes, accumulate"},
      {.rows = 500,
       .width = 72,
       .accumulate = true,
       .in_place = true,
       .branch = "vector: warp, in place and accumulate"},
      {.rows = 203, .width = 256, .xs = 288, .ys = 256, .branch = "vector: warp, 2 packs, strided x (kv_norm)"},
      {.rows = 31, .width = 500, .branch = "vector: warp, 4 packs, partial"},
      {.rows = 61, .width = 772, .out_scale = 0.8, .branch = "vector: block 128, 2 packs, partial"},
      {.rows = 150,
       .width = 1536,
       .accumulate = true,
       .branch = "vector: block 128, 3 packs, accumulate (attn/ffn norm)"},
      {.rows = 150, .width = 1536, .in_place = true, .branch = "vector: block 128, dx written over x"},
      {.rows = 64,
       .width = 1536,
       .accumulate = true,
       .in_place = true,
       .branch = "vector: block 128, in place and accumulate"},
      {.rows = 5, .width = 2052, .branch = "vector: block 512, 2 packs, partial"},
      {.rows = 20, .width = 6144, .accumulate = true, .branch = "vector: block 512, 3 packs"},
      {.rows = 40000, .width = 8, .branch = "vector: 40 rows per chunk (rows > 1024*32)"},
      {.rows = 16384, .width = 1536, .branch = "vector: block 128 (bench preset attn/ffn norm)", .bench_only = true},
  };
  for (const NormShape& s : norms) out.push_back(rmsnorm_case(s, seed++));

  const int64_t m = 37, n = 29, k = 53;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true})
      for (const double beta : {0.0, 1.3}) out.push_back(gemm_case({m, n, k, ta, tb, 0.7, beta}, seed++));
  out.push_back(gemm_case({m, n, 0, false, false, 1.0, 0.5}, seed++));
  // The bench preset's projections (16384 tokens, dim 1536): y = x Wᵀ, f32 and the bf16 mode.
  out.push_back(gemm_case({16384, 1536, 1536, false, true, 1.0, 0.0, true}, seed++));
  out.push_back(gemm_case({16384, 1536, 1536, false, true, 1.0, 0.0, true, GemmPrecision::kBF16}, seed++));

  // Offsets with two empty groups; rows >= offsets[G] (37 … 40) must stay untouched.
  const GroupedShape fwd{41, 5, 19, 23, {0, 9, 9, 20, 20, 37}, "two empty groups, 4 rows past"};
  const GroupedShape wgrad{41, 5, 13, 11, {0, 9, 9, 20, 20, 37}, "two empty groups, 4 rows past"};
  for (const bool trans_b : {true, false})
    for (const double beta : {0.0, 1.0}) out.push_back(grouped_gemm_case(fwd, trans_b, beta, seed++));
  for (const double beta : {0.0, 1.0}) out.push_back(grouped_wgrad_case(wgrad, beta, seed++));
  // The bench preset's experts: 64 groups of 1024 routed rows (8·2048·4 / 64), 1536 -> 512.
  const GroupedShape experts{65536, 64, 1536, 512, even_offsets(65536, 64), "bench preset experts", true};
  out.push_back(grouped_gemm_case(experts, true, 0.0, seed++));
  out.push_back(grouped_wgrad_case(
      GroupedShape{65536, 64, 512, 1536, even_offsets(65536, 64), "bench preset experts", true}, 1.0, seed++));
  return out;
}

}  // namespace diffmoe::opcases
