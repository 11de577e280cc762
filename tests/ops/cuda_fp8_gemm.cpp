// fp8_gemm on the GPU (cuBLASLt's block-scaled FP8 GEMM, Hopper; fp8_gemm_ops.cpp) against the CPU's
// (the exact dequantised product, f64 sums, cpu/fp8_ops.cpp) on the same e4m3 codes and scales:
// the recipe's forms (A in 1×128 tiles with B in 128×128 blocks: Fprop, Dgrad; both in 1×128 tiles:
// Wgrad), sizes that are not multiples of 128 (K = 320: a half K block; K = 16 to 96: less than one
// block), alpha, beta, C in place and a separate addend, a bf16 output, beta = 0 not reading NaNs; the three recipe
// GEMMs end to end (act_quant, weight_quant, fp8_gemm on each backend); the plan cache with new scale tensors per call;
// the refusals of shapes and views cuBLASLt cannot take. Skipped on devices other than 9.x.
//
// Tolerance. Both sides multiply the same exact values (an e4m3 pair's product is exact, and so is
// its dequantised value in f64 on the CPU); they differ in how the products are summed. cuBLASLt adds
// the products of a 128-long K slice on the tensor cores, whose accumulator keeps ~14 significant
// bits (docs/derivations.md §6.3: each addition aligns to the largest term and drops what falls below), then
// promotes each slice's sum to f32 with its scales (fast accumulation off). Worst case: up to 128
// additions per slice, each off by < 2^-13 of the slice's largest aligned term, so
// |Δ| ≤ 2^-6·|alpha|·Σ_k|â_k·b̂_k| per element (plus the output's rounding: 2^-23·|C| in f32, one
// bf16 step in bf16). The test data do not cancel (three in four codes are positive, so C is a
// sizeable fraction of Σ|â·b̂|): a scale taken from a wrong tile or block changes C by far more.
// Typical errors have both signs; the Frobenius norm of the difference is held to 2^-9 of C's
// (f32 output) and 2^-7 (bf16 output, whose own rounding is up to 2^-9 relative per element).
#include <cuda_runtime_api.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"
#include "cuda_test_util.h"
#include "fp8_test_util.h"

namespace diffmoe::cudatest {
namespace {

bool hopper() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major == 9;
}
#define SKIP_UNLESS_HOPPER()                                                                  \
  do {                                                                                        \
    if (!hopper()) {                                                                          \
      GTEST_SKIP() << "cuBLASLt's block-scaled FP8 GEMM runs on compute capability 9.x only"; \
    }                                                                                         \
  } while (0)

// Random finite codes, three in four positive (so sums do not cancel), and positive scales spread
// over 0.01 .. 10, not powers of two.
Dual random_codes(Shape shape, uint64_t seed) {
  Dual d(shape, DType::kF8E4M3);
  std::vector<double> v(static_cast<size_t>(d.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    const double u = uniform_at(seed, 1, i), sgn = uniform_at(seed, 2, i) < 0.75 ? 1.0 : -1.0;
    v[i] = sgn * e4m3_to_f32(static_cast<uint8_t>(1 + static_cast<int>(u * 125.999)));  // codes 1 .. 126
  }
  d.set(v);
  return d;
}
Dual random_scales(Shape shape, uint64_t seed) {
  Dual d(shape);
  std::vector<double> v(static_cast<size_t>(d.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(0.01 * std::pow(1000.0, uniform_at(seed, 3, i)));
  d.set(v);
  return d;
}

struct Case {
  int64_t m, n, k;
  Fp8Scaling b_scaling;
  DType c_dtype;
  double alpha, beta;
  bool separate_addend;
};

// Σ_k |â_k·b̂_k| for every element of C [m, n] (the tolerance's scale), from the host copies.
std::vector<double> abs_products(const Dual& a, const Dual& sa, const Dual& b, const Dual& sb, const Case& c) {
  const std::vector<double> av = a.host_values(), bv = b.host_values(), sav = sa.host_values(), sbv = sb.host_values();
  const int64_t ld = fp8_block_scale_cols(c.k);
  std::vector<double> ah(av.size()), bh(bv.size()), out(static_cast<size_t>(c.m * c.n));
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t kk = 0; kk < c.k; ++kk)
      ah[static_cast<size_t>(i * c.k + kk)] =
          std::fabs(av[static_cast<size_t>(i * c.k + kk)] * sav[static_cast<size_t>((kk / 128) * c.m + i)]);
  for (int64_t j = 0; j < c.n; ++j)
    for (int64_t kk = 0; kk < c.k; ++kk) {
      const double s = c.b_scaling == Fp8Scaling::kBlock128x128 ? sbv[static_cast<size_t>((j / 128) * ld + kk / 128)]
                                                                : sbv[static_cast<size_t>((kk / 128) * c.n + j)];
      bh[static_cast<size_t>(j * c.k + kk)] = std::fabs(bv[static_cast<size_t>(j * c.k + kk)] * s);
    }
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) {
      double s = 0.0;
      for (int64_t kk = 0; kk < c.k; ++kk)
        s += ah[static_cast<size_t>(i * c.k + kk)] * bh[static_cast<size_t>(j * c.k + kk)];
      out[static_cast<size_t>(i * c.n + j)] = s;
    }
  return out;
}

// The per-element bound and the Frobenius bound of the file comment.
void expect_fp8_close(const Dual& c, const std::vector<double>& mag, double alpha, DType c_dtype,
                      const std::string& what) {
  const std::vector<double> got = c.device_values(), want = c.host_values();
  const double out_round = c_dtype == DType::kBF16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -23);
  int64_t bad = 0;
  double diff2 = 0.0, ref2 = 0.0, worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(got[i] - want[i]);
    const double tol = std::ldexp(std::fabs(alpha) * mag[i], -6) + out_round * std::fabs(want[i]);
    if (!(d <= tol)) ++bad;
    worst = std::max(worst, d / std::max(tol, 1e-300));
    diff2 += d * d;
    ref2 += want[i] * want[i];
  }
  const double rel = std::sqrt(diff2 / ref2),
               rel_bound = c_dtype == DType::kBF16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -9);
  std::printf("[cuda-vs-cpu] %-52s n=%-7zu ‖Δ‖/‖C‖ %.2e (≤ %.1e), worst |Δ|/bound %.3f\n", what.c_str(), got.size(),
              rel, rel_bound, worst);
  EXPECT_EQ(bad, 0) << what << ": elements beyond 2^-6·Σ|â·b̂|";
  EXPECT_LE(rel, rel_bound) << what;
  EXPECT_TRUE(c.guard_intact()) << what;
}

void run_case(const Case& c, uint64_t seed) {
  const Dual a = random_codes(Shape{c.m, c.k}, seed), b = random_codes(Shape{c.n, c.k}, seed + 1);
  const Dual sa = random_scales(Shape{fp8_tiles(c.k), c.m}, seed + 2);
  const Dual sb =
      random_scales(c.b_scaling == Fp8Scaling::kBlock128x128 ? Shape{fp8_tiles(c.n), fp8_block_scale_cols(c.k)}
                                                             : Shape{fp8_tiles(c.k), c.n},
                    seed + 3);
  Dual out(Shape{c.m, c.n}, c.c_dtype), addend(Shape{c.m, c.n}, c.c_dtype);
  addend.normal(seed + 4, 50.0);
  if (c.separate_addend || c.beta == 0.0) out.poison();  // only written
  else out.normal(seed + 4, 50.0);                       // read in place
  run_both([&](Backend& be, Side s) {
    be.fp8_gemm({}, {.c = out[s],
                     .a = a[s],
                     .a_scale = sa[s],
                     .b = b[s],
                     .b_scale = sb[s],
                     .b_scaling = c.b_scaling,
                     .alpha = c.alpha,
                     .beta = c.beta,
                     .addend = c.separate_addend ? addend[s] : Tensor{}});
  });
  expect_fp8_close(out, abs_products(a, sa, b, sb, c), c.alpha, c.c_dtype,
                   fmt::format("fp8_gemm {}x{}x{} {} {} a={} b={}{}", c.m, c.n, c.k,
                               c.b_scaling == Fp8Scaling::kBlock128x128 ? "1x128·128x128" : "1x128·1x128",
                               dtype_name(c.c_dtype), c.alpha, c.beta, c.separate_addend ? " +addend" : ""));
  if (c.separate_addend) expect_close(addend, kExact, "fp8_gemm: the addend is only read");
}

TEST(CudaFp8Gemm, AgainstCpu) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  uint64_t seed = 3000;
  for (Fp8Scaling bs : {Fp8Scaling::kBlock128x128, Fp8Scaling::kTile1x128}) {
    run_case({256, 512, 1024, bs, DType::kF32, 1.0, 0.0, false}, seed += 10);
    run_case({264, 200, 320, bs, DType::kF32, 1.0, 0.0, false}, seed += 10);  // edge tiles, half a K block
    run_case({128, 1536, 768, bs, DType::kBF16, 1.0, 0.0, false}, seed += 10);
    run_case({200, 96, 384, bs, DType::kF32, 0.5, 1.0, false}, seed += 10);  // Wgrad's accumulation, in place
    run_case({136, 264, 512, bs, DType::kF32, 1.0, 1.0, true}, seed += 10);  // a residual addend
    run_case({64, 72, 256, bs, DType::kF32, -1.5, -0.5, true}, seed += 10);
    run_case({64, 72, 256, bs, DType::kF32, 1.0, 0.0, true}, seed += 10);  // NaN C and addend unread
    run_case({64, 72, 256, bs, DType::kBF16, 2.0, 0.0, true}, seed += 10);
    // K below one 128 block (the serving engine's FP8 weights take any Linear: the serve test model's are
    // 16 to 64 wide), M of a few padded decode rows.
    run_case({8, 32, 16, bs, DType::kF32, 1.0, 0.0, false}, seed += 10);
    run_case({16, 64, 32, bs, DType::kF32, 1.0, 1.0, true}, seed += 10);
    run_case({8, 48, 96, bs, DType::kF32, 1.0, 0.0, false}, seed += 10);
  }
}

// fp8_grouped_gemm (grouped_gemm_fp8.cuh: TMA + wgmma, partial sums promoted per 128-wide k-tile) against
// the CPU's exact per-group products, with the file comment's tolerance per group: groups of 0, 1, 37 and
// 300 rows (m-tiles that end inside a tile and run into the next group), rows past offsets[G] that must
// keep their values, N with a partial n-tile, K with a partial k-tile, a second term with its own K2,
// f32 and bf16 C. Each k-tile of every group has its own A and B scales, so a scale taken from the wrong
// row, tile, block or group moves C far beyond the bound.
void run_grouped_case(int64_t n, int64_t k, int64_t k2, DType c_dtype, uint64_t seed) {
  const std::vector<int32_t> rows = {200, 0, 37, 1, 300, 0, 129};
  const int64_t G = static_cast<int64_t>(rows.size());
  std::vector<double> off(1, 0.0);
  for (const int32_t r : rows) off.push_back(off.back() + r);
  const int64_t used = static_cast<int64_t>(off.back()), R = used + 5;  // 5 rows past offsets[G]
  Dual offsets(Shape{G + 1}, DType::kI32);
  offsets.set(off);
  const Dual a = random_codes(Shape{R, k}, seed), b = random_codes(Shape{G, n, k}, seed + 1);
  const Dual sa = random_scales(Shape{fp8_tiles(k), R}, seed + 2);
  const Dual sb = random_scales(Shape{G, fp8_tiles(n), fp8_block_scale_cols(k)}, seed + 3);
  const int64_t k2_or_1 = k2 > 0 ? k2 : 16;  // the second term's tensors exist (unused) when k2 = 0
  const Dual a2 = random_codes(Shape{R, k2_or_1}, seed + 4), b2 = random_codes(Shape{G, n, k2_or_1}, seed + 5);
  const Dual sa2 = random_scales(Shape{fp8_tiles(k2_or_1), R}, seed + 6);
  const Dual sb2 = random_scales(Shape{G, fp8_tiles(n), fp8_block_scale_cols(k2_or_1)}, seed + 7);
  Dual out(Shape{R, n}, c_dtype);
  out.normal(seed + 8, 50.0);  // rows ≥ offsets[G] keep these values on both sides
  run_both([&](Backend& be, Side s) {
    Fp8GroupedGemmArgs args{
        .c = out[s], .a = a[s], .a_scale = sa[s], .b = b[s], .b_scale = sb[s], .offsets = offsets[s]};
    if (k2 > 0) {
      args.a2 = a2[s];
      args.a2_scale = sa2[s];
      args.b2 = b2[s];
      args.b2_scale = sb2[s];
    }
    be.fp8_grouped_gemm({}, args);
  });
  // Σ|â·b̂| per element, each row with its group's B (0 past offsets[G], where C must be exact).
  std::vector<double> mag(static_cast<size_t>(R * n), 0.0);
  const auto add_mag = [&](const Dual& ta, const Dual& tsa, const Dual& tb, const Dual& tsb, int64_t kk_n) {
    const std::vector<double> av = ta.host_values(), sav = tsa.host_values(), bv = tb.host_values(),
                              sbv = tsb.host_values();
    const int64_t ld = fp8_block_scale_cols(kk_n), blocks = fp8_tiles(n) * ld;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = static_cast<int64_t>(off[static_cast<size_t>(g)]);
           r < static_cast<int64_t>(off[static_cast<size_t>(g) + 1]); ++r)
        for (int64_t j = 0; j < n; ++j) {
          double m = 0.0;
          for (int64_t kk = 0; kk < kk_n; ++kk)
            m += std::fabs(av[static_cast<size_t>(r * kk_n + kk)] * sav[static_cast<size_t>((kk / 128) * R + r)] *
                           bv[static_cast<size_t>((g * n + j) * kk_n + kk)] *
                           sbv[static_cast<size_t>(g * blocks + (j / 128) * ld + kk / 128)]);
          mag[static_cast<size_t>(r * n + j)] += m;
        }
  };
  add_mag(a, sa, b, sb, k);
  if (k2 > 0) add_mag(a2, sa2, b2, sb2, k2);
  expect_fp8_close(out, mag, 1.0, c_dtype,
                   fmt::format("fp8_grouped_gemm G={} R={} n={} k={}{} {}", G, R, n, k,
                               k2 > 0 ? fmt::format("+{}", k2) : "", dtype_name(c_dtype)));
}

TEST(CudaFp8Gemm, GroupedAgainstCpu) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  uint64_t seed = 3500;
  run_grouped_case(256, 384, 0, DType::kF32, seed += 10);
  run_grouped_case(200, 320, 0, DType::kF32, seed += 10);  // a partial n-tile and k-tile
  run_grouped_case(512, 1536, 0, DType::kBF16, seed += 10);
  run_grouped_case(1536, 512, 512, DType::kBF16, seed += 10);  // the MoE Dgrad's two terms
  run_grouped_case(136, 256, 96, DType::kF32, seed += 10);     // K2 below one k-tile
  run_grouped_case(64, 16, 48, DType::kF32, seed += 10);
  run_grouped_case(128, 128, 0, DType::kF32, seed += 10);   // one k-tile: the partial sums' shortest tail
  run_grouped_case(256, 640, 0, DType::kBF16, seed += 10);  // five: an odd count past the steady-state loop
}

// An FP8 grouped call whose shape the kernel cannot take is refused with the reason, before any launch.
TEST(CudaFp8Gemm, GroupedRefusesShapesTheKernelCannotTake) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  const int64_t G = 2, R = 64;
  Dual offsets(Shape{G + 1}, DType::kI32);
  offsets.set({0, 30, 64});
  for (const auto& [n, k, why] : {std::tuple{64, 40, "multiples of 16"}, std::tuple{60, 64, "multiple of 8"}}) {
    const Dual a = random_codes(Shape{R, k}, 1), b = random_codes(Shape{G, n, k}, 2);
    const Dual sa = random_scales(Shape{fp8_tiles(k), R}, 3),
               sb = random_scales(Shape{G, fp8_tiles(n), fp8_block_scale_cols(k)}, 4);
    Dual out(Shape{R, n});
    try {
      gpu().fp8_grouped_gemm({}, {.c = out[Side::kGpu],
                                  .a = a[Side::kGpu],
                                  .a_scale = sa[Side::kGpu],
                                  .b = b[Side::kGpu],
                                  .b_scale = sb[Side::kGpu],
                                  .offsets = offsets[Side::kGpu]});
      ADD_FAILURE() << "n " << n << " k " << k << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("fp8_grouped_gemm"), std::string::npos) << e.what();
    }
  }
}

// fp8_grouped_gemm_wgrad (grouped_gemm_fp8_wgrad_kernel: per-row and per-column scales staged with each k-tile)
// against the CPU on the same codes: groups of 0, 1, 200, 300 rows (1 to 3 tile slots), m and n with partial
// tiles, beta 0 and 1, Σ C².
TEST(CudaFp8Gemm, GroupedWgradAgainstCpu) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  const std::vector<double> off = {0, 200, 200, 201, 501, 629};
  const int64_t G = static_cast<int64_t>(off.size()) - 1, R = 640, slots = fp8_group_tiles(R, G);
  uint64_t seed = 3700;
  for (const auto& [m, n] : {std::pair<int64_t, int64_t>{512, 1536}, {200, 136}, {1536, 512}})
    for (const double beta : {0.0, 1.0}) {
      seed += 10;
      Dual offsets(Shape{G + 1}, DType::kI32);
      offsets.set(off);
      const Dual a = random_codes(Shape{m, kFp8Tile * slots}, seed),
                 b = random_codes(Shape{n, kFp8Tile * slots}, seed + 1);
      const Dual sa = random_scales(Shape{slots, m}, seed + 2), sb = random_scales(Shape{slots, n}, seed + 3);
      Dual c(Shape{G, m, n}), sum_sq(Shape{1});
      c.normal(seed + 4, 50.0);
      sum_sq.set({0.25});
      run_both([&](Backend& be, Side s) {
        be.fp8_grouped_gemm_wgrad({}, {.c = c[s],
                                       .a = a[s],
                                       .a_scale = sa[s],
                                       .b = b[s],
                                       .b_scale = sb[s],
                                       .offsets = offsets[s],
                                       .beta = beta,
                                       .sum_sq = sum_sq[s]});
      });
      // Σ|â·b̂| per element over the group's tile slots.
      const std::vector<double> av = a.host_values(), bv = b.host_values(), sav = sa.host_values(),
                                sbv = sb.host_values();
      const int64_t w = kFp8Tile * slots;
      std::vector<double> mag(static_cast<size_t>(G * m * n), 0.0);
      int64_t slot = 0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t kk_n =
            fp8_tiles(static_cast<int64_t>(off[static_cast<size_t>(g) + 1] - off[static_cast<size_t>(g)])) * kFp8Tile;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double s = 0.0;
            for (int64_t kk = 0; kk < kk_n; ++kk) {
              const int64_t col = slot * kFp8Tile + kk, t = slot + kk / kFp8Tile;
              s += std::fabs(av[static_cast<size_t>(i * w + col)] * sav[static_cast<size_t>(t * m + i)] *
                             bv[static_cast<size_t>(j * w + col)] * sbv[static_cast<size_t>(t * n + j)]);
            }
            mag[static_cast<size_t>((g * m + i) * n + j)] = s;
          }
        slot += kk_n / kFp8Tile;
      }
      const std::string what = fmt::format("fp8_grouped_gemm_wgrad G={} m={} n={} beta={}", G, m, n, beta);
      expect_fp8_close(c, mag, 1.0, DType::kF32, what);
      // Σ C² of the values the kernel stored (the CPU's own C differs within the bound above).
      double want = 0.25;
      for (const double v : c.device_values()) want += v * v;
      EXPECT_NEAR(sum_sq.device_values()[0], want, 1e-5 * want) << what << ": Σ C²";
    }
}

// The recipe's three GEMMs of a Linear y = x Wᵀ end to end on each backend: act_quant / weight_quant
// (bitwise equal, cuda_fp8_quant.cpp) and fp8_gemm, within the GEMM tolerance.
TEST(CudaFp8Gemm, RecipeEndToEnd) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  const int64_t t = 512, d = 384, o = 256;  // tokens, in, out
  Dual x(Shape{t, d}), w(Shape{o, d}), dy(Shape{t, o});
  x.normal(41, 0.5, 1.0);  // means well away from 0: sums that do not cancel (the file comment)
  w.normal(42, 0.02, 0.05);
  dy.normal(43, 5e-4, 1e-3);
  Dual xq(Shape{t, d}, DType::kF8E4M3), xs(Shape{fp8_tiles(d), t}), xq_t(Shape{d, t}, DType::kF8E4M3),
      xs_t(Shape{fp8_tiles(t), d});
  Dual dyq(Shape{t, o}, DType::kF8E4M3), dys(Shape{fp8_tiles(o), t}), dyq_t(Shape{o, t}, DType::kF8E4M3),
      dys_t(Shape{fp8_tiles(t), o});
  Dual wq(Shape{o, d}, DType::kF8E4M3), ws(Shape{fp8_tiles(o), fp8_block_scale_cols(d)}),
      wq_t(Shape{d, o}, DType::kF8E4M3), ws_t(Shape{fp8_tiles(d), fp8_block_scale_cols(o)});
  Dual y(Shape{t, o}), dx(Shape{t, d}, DType::kBF16), dw(Shape{o, d});
  y.poison();
  dx.poison();
  dw.normal(44, 1e-3);
  run_both([&](Backend& be, Side s) {
    be.act_quant({}, {.q = xq[s], .scale = xs[s], .q_t = xq_t[s], .scale_t = xs_t[s], .x = x[s]});
    be.act_quant({}, {.q = dyq[s], .scale = dys[s], .q_t = dyq_t[s], .scale_t = dys_t[s], .x = dy[s]});
    be.weight_quant({}, {.q = wq[s], .scale = ws[s], .q_t = wq_t[s], .scale_t = ws_t[s], .w = w[s]});
    be.fp8_gemm({}, {.c = y[s], .a = xq[s], .a_scale = xs[s], .b = wq[s], .b_scale = ws[s]});
    be.fp8_gemm({}, {.c = dx[s], .a = dyq[s], .a_scale = dys[s], .b = wq_t[s], .b_scale = ws_t[s]});
    be.fp8_gemm({}, {.c = dw[s],
                     .a = dyq_t[s],
                     .a_scale = dys_t[s],
                     .b = xq_t[s],
                     .b_scale = xs_t[s],
                     .b_scaling = Fp8Scaling::kTile1x128,
                     .beta = 1.0});
  });
  for (const Dual* q : {&xq, &xq_t, &dyq, &dyq_t, &wq, &wq_t}) expect_close(*q, kExact, "recipe: quantised operand");
  expect_fp8_close(y, abs_products(xq, xs, wq, ws, {t, o, d, Fp8Scaling::kBlock128x128, DType::kF32, 1, 0, false}), 1.0,
                   DType::kF32, "recipe Fprop y = x Wᵀ");
  expect_fp8_close(dx,
                   abs_products(dyq, dys, wq_t, ws_t, {t, d, o, Fp8Scaling::kBlock128x128, DType::kBF16, 1, 0, false}),
                   1.0, DType::kBF16, "recipe Dgrad dx = dy W (bf16)");
  expect_fp8_close(dw,
                   abs_products(dyq_t, dys_t, xq_t, xs_t, {o, d, t, Fp8Scaling::kTile1x128, DType::kF32, 1, 1, false}),
                   1.0, DType::kF32, "recipe Wgrad dW += dyᵀ x");
}

// A repeated shape reuses its plan (no heuristic query) and reads the scale tensors of its own call.
TEST(CudaFp8Gemm, PlanCacheTakesEachCallsScales) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  const Case c{128, 256, 512, Fp8Scaling::kBlock128x128, DType::kF32, 1.0, 0.0, false};
  const Dual a = random_codes(Shape{c.m, c.k}, 51), b = random_codes(Shape{c.n, c.k}, 52);
  auto& be = dynamic_cast<CudaBackend&>(gpu());
  int64_t queries = -1;
  for (uint64_t round = 0; round < 3; ++round) {
    const Dual sa = random_scales(Shape{fp8_tiles(c.k), c.m}, 60 + round),
               sb = random_scales(Shape{fp8_tiles(c.n), fp8_block_scale_cols(c.k)}, 70 + round);
    Dual out(Shape{c.m, c.n});
    out.poison();
    run_both([&](Backend& bk, Side s) {
      bk.fp8_gemm({}, {.c = out[s], .a = a[s], .a_scale = sa[s], .b = b[s], .b_scale = sb[s]});
    });
    expect_fp8_close(out, abs_products(a, sa, b, sb, c), 1.0, DType::kF32,
                     fmt::format("fp8_gemm plan reuse {}", round));
    if (round > 0) {
      EXPECT_EQ(be.lt_gemm().heuristic_queries(), queries) << "a repeated shape queried the heuristic";
    }
    queries = be.lt_gemm().heuristic_queries();
  }
}

// Shapes and views cuBLASLt's FP8 GEMM cannot take are refused with the rule's name.
TEST(CudaFp8Gemm, Refusals) {
  DIFFMOE_REQUIRE_CUDA();
  SKIP_UNLESS_HOPPER();
  const Dual a = random_codes(Shape{16, 40}, 1), b = random_codes(Shape{24, 40}, 2);
  const Dual sa = random_scales(Shape{1, 16}, 3), sb = random_scales(Shape{1, 4}, 4);
  Dual c(Shape{16, 24});
  expect_error(
      [&] {
        gpu().fp8_gemm({}, {.c = c[Side::kGpu],
                            .a = a[Side::kGpu],
                            .a_scale = sa[Side::kGpu],
                            .b = b[Side::kGpu],
                            .b_scale = sb[Side::kGpu]});
      },
      {"[fp8_gemm]", "K = 40", "multiple of 16"});
  const Dual a2 = random_codes(Shape{12, 33}, 5), b2 = random_codes(Shape{24, 32}, 6);
  const Dual sa2 = random_scales(Shape{1, 12}, 7);
  Dual c2(Shape{12, 24});
  expect_error(
      [&] {
        gpu().fp8_gemm({}, {.c = c2[Side::kGpu],
                            .a = offset_view(a2, Side::kGpu, Shape{12, 32}, 1),
                            .a_scale = sa2[Side::kGpu],
                            .b = b2[Side::kGpu],
                            .b_scale = sb[Side::kGpu]});
      },
      {"[fp8_gemm]", "M = 12", "multiples of 8"});
  const Dual a3 = random_codes(Shape{16 * 32 + 1}, 8);
  Dual c3(Shape{16, 24});
  expect_error(
      [&] {
        gpu().fp8_gemm({}, {.c = c3[Side::kGpu],
                            .a = offset_view(a3, Side::kGpu, Shape{16, 32}, 1),
                            .a_scale = sa[Side::kGpu],
                            .b = b2[Side::kGpu],
                            .b_scale = sb[Side::kGpu]});
      },
      {"[fp8_gemm]", "a ", "16-byte"});
}

}  // namespace
}  // namespace diffmoe::cudatest
