// CUDA GEMMs under GemmPrecision::kBF16 (Backend::set_gemm_precision) against the CPU's GEMMs in
// the same mode (Bf16Mode sets both; the CPU multiplies the bf16-rounded operands with f32 sums,
// cpu/gemm_ops.cpp): gemm (every transpose, alpha, beta = 0 on poisoned C and beta ≠ 0, k = 0),
// grouped_gemm (both layouts of B, empty groups, no rows in use, rows past offsets[G] untouched) and
// grouped_gemm_wgrad (empty groups keep beta·C), at odd sizes, so the per-group bf16 operands start
// at addresses that are not 16-byte aligned; then that switching back to kF32 restores the f32
// results.
// The grouped ops run the device-scheduled tensor-core kernel (grouped_gemm.cuh) in bf16 mode:
// GroupedKernel* cover its three layouts at sizes that are not tile multiples (k = 40, n = 24;
// groups longer than one 128-row tile and several k-tiles with a partial last one), empty groups
// first, in the middle and last, 1-row groups, and bad offsets reported by synchronize().
// GroupedTwoTerms: grouped_gemm with a second term (a2, b2; C = alpha·(A·op(B) + A2·op(B2)) + beta·C,
// the MoE dx_perm = da·W1 + db·W3) against the CPU's two passes, in both precisions: the TMA kernel
// sums both terms in one launch, the mma.sync kernel and the per-group f32 path run two passes.
//
// Tolerance: both sides multiply the same bf16 values (the rounding is the same, nearest even), and a
// product of two bf16 values is exact in f32 (8 + 8 significant bits), so the results differ only by
// f32 sums of k products in another order: |cuda − cpu| ≤ 1e-5·|cpu| + 4e-6·k (the f32 GEMM
// tolerance of cuda_vs_cpu.cpp; cuda_lt_gemm.cpp measures it for these operands). A GPU GEMM that
// did not round its inputs would be off by ~1.6e-3 relative (2^-9 per operand), ~30× that at
// these sizes: the tolerance also shows that the bf16 inputs were used. A bf16 C: the same plus one
// bf16 step (expect_bf16_close).
#include <cmath>
#include <optional>
#include <tuple>

#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

// The f32 tolerance of cuda_vs_cpu.cpp: f32 dot products of length k in different orders (here of
// exact bf16 products, see the file comment).
Tol f32_gemm_tol(int64_t k) {
  return Tol{1e-5, 4e-6 * static_cast<double>(std::max<int64_t>(k, 1)),
             "f32 sums of k exact bf16 products, other order"};
}
constexpr Tol kScaleOnly{1e-6, 1e-7, "k = 0: beta·C only, no bf16 rounding"};

// cuda against the CPU's bf16-mode result within f32_gemm_tol(k) (NaN fails); elements from
// check_end on must also be bitwise equal on both sides (rows an op must not touch: both keep
// them); guard bytes intact.
void expect_gemm(const Dual& d, int64_t k, const std::string& what, int64_t check_end = -1) {
  expect_close(d, f32_gemm_tol(k), what);
  const std::vector<double> got = d.device_values(), want = d.host_values();
  int64_t changed = 0;
  for (size_t i = check_end < 0 ? got.size() : static_cast<size_t>(check_end); i < got.size(); ++i)
    changed += (got[i] == want[i]) ? 0 : 1;
  EXPECT_EQ(changed, 0) << what << ": " << changed << " elements past the rows in use differ";
}

CudaBackend& cuda_backend() { return dynamic_cast<CudaBackend&>(gpu()); }

// A grouped op's C [R, n] before the call: the rows in use (the first `used`) NaN when poison_used (an op that writes
// them with beta = 0 must not read them), the rest values the op must keep.
std::vector<double> grouped_c_values(int64_t R, int64_t n, int64_t used, bool poison_used, uint64_t seed) {
  std::vector<double> c0(static_cast<size_t>(R * n));
  for (int64_t i = 0; i < R * n; ++i)
    c0[static_cast<size_t>(i)] =
        (poison_used && i < used * n) ? std::nan("") : normal_at(seed, 1, static_cast<uint64_t>(i));
  return c0;
}

void run_gemm_case(int64_t m, int64_t n, int64_t k, int ta, int tb, double alpha, double beta, uint64_t seed) {
  Dual a(ta ? Shape{k, m} : Shape{m, k}), b(tb ? Shape{n, k} : Shape{k, n}), c(Shape{m, n});
  a.normal(seed);
  b.normal(seed + 1);
  if (beta == 0.0) c.poison();  // beta = 0 must not read C (NaN stays out)
  else c.normal(seed + 2);
  run_both([&](Backend& be, Side s) {
    be.gemm({},
            {.c = c[s], .a = a[s], .b = b[s], .trans_a = ta == 1, .trans_b = tb == 1, .alpha = alpha, .beta = beta});
  });
  expect_gemm(c, k, fmt::format("bf16 gemm {}x{}x{} ta={} tb={} alpha={} beta={}", m, n, k, ta, tb, alpha, beta));
}

TEST(CudaBf16Gemm, DefaultIsF32OnBothBackends) {
  DIFFMOE_REQUIRE_CUDA();
  EXPECT_EQ(gpu().gemm_precision(), GemmPrecision::kF32);
  EXPECT_EQ(cpu().gemm_precision(), GemmPrecision::kF32);
  {
    const Bf16Mode mode;
    EXPECT_EQ(gpu().gemm_precision(), GemmPrecision::kBF16);
    EXPECT_EQ(cpu().gemm_precision(), GemmPrecision::kBF16);
  }
  EXPECT_EQ(gpu().gemm_precision(), GemmPrecision::kF32);
  EXPECT_EQ(cpu().gemm_precision(), GemmPrecision::kF32);
}

TEST(CudaBf16Gemm, AllTransposesAlphaBeta) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  uint64_t seed = 100;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (double beta : {0.0, 1.3}) {
        run_gemm_case(37, 29, 53, ta, tb, 0.7, beta, seed += 3);
        run_gemm_case(131, 67, 515, ta, tb, -1.9, beta, seed += 3);  // larger: the bf16 buffer grows
      }
  // k = 0: C = beta·C, no operand read and nothing rounded.
  Dual a0(Shape{37, 0}), b0(Shape{0, 29}), c0(Shape{37, 29});
  c0.normal(23);
  run_both([&](Backend& be, Side s) { be.gemm({}, {.c = c0[s], .a = a0[s], .b = b0[s], .alpha = 1.0, .beta = 0.5}); });
  expect_close(c0, kScaleOnly, "bf16 gemm k=0");
}

TEST(CudaBf16Gemm, BufferSizedByLargestCall) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  run_gemm_case(257, 129, 301, 0, 1, 1.0, 0.0, 200);
  const size_t after_large = cuda_backend().gemm_bf16_scratch_bytes();
  EXPECT_GE(after_large, static_cast<size_t>((257 + 129) * 301) * 2);  // both operands as bf16
  run_gemm_case(37, 29, 53, 1, 0, 0.7, 1.0, 210);                      // smaller: reuses the buffer as it is
  EXPECT_EQ(cuda_backend().gemm_bf16_scratch_bytes(), after_large);
}

// Offsets with two empty groups; rows ≥ offsets[G] (37 … 40) must stay untouched.
const std::vector<double> kOffsets = {0, 9, 9, 20, 20, 37};

TEST(CudaBf16Gemm, GroupedForward) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t R = 41, used = 37, G = 5, k = 19, n = 23;  // odd k: group starts not 16-byte aligned
  for (bool trans_b : {true, false}) {
    for (double beta : {0.0, 1.0}) {
      Dual a(Shape{R, k}), b(trans_b ? Shape{G, n, k} : Shape{G, k, n}), c(Shape{R, n}), off(Shape{G + 1}, DType::kI32);
      a.normal(30);
      b.normal(31);
      off.set(kOffsets);
      c.set(grouped_c_values(R, n, used, beta == 0.0, 32));
      run_both([&](Backend& be, Side s) {
        be.grouped_gemm(
            {}, {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .trans_b = trans_b, .alpha = 0.8, .beta = beta});
      });
      expect_gemm(c, k, fmt::format("bf16 grouped_gemm trans_b={} beta={}", trans_b, beta), used * n);
    }
  }
  // No rows in use (every group empty): nothing converted, C untouched.
  Dual a(Shape{R, k}), b(Shape{G, n, k}), c(Shape{R, n}), off(Shape{G + 1}, DType::kI32);
  a.normal(33);
  b.normal(34);
  c.normal(35);
  off.set({0, 0, 0, 0, 0, 0});
  run_both([&](Backend& be, Side s) {
    be.grouped_gemm({},
                    {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .trans_b = true, .alpha = 0.8, .beta = 0.0});
  });
  expect_close(c, kExact, "bf16 grouped_gemm no rows in use");
}

TEST(CudaBf16Gemm, GroupedWeightGradient) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t R = 41, G = 5, m = 13, n = 11;
  for (double beta : {0.0, 1.0}) {
    Dual a(Shape{R, m}), b(Shape{R, n}), c(Shape{G, m, n}), off(Shape{G + 1}, DType::kI32);
    a.normal(40);
    b.normal(41);
    off.set(kOffsets);
    if (beta == 0.0) c.poison();  // empty groups become 0
    else c.normal(42);            // empty groups keep C
    run_both([&](Backend& be, Side s) {
      be.grouped_gemm_wgrad({}, {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .alpha = 0.5, .beta = beta});
    });
    expect_gemm(c, 17, fmt::format("bf16 grouped_gemm_wgrad beta={}", beta));  // the longest group: 17 rows
    // The empty groups (1 and 3) are beta·C only: exact on both sides.
    const std::vector<double> got = c.device_values(), want = c.host_values();
    for (int64_t g : {int64_t{1}, int64_t{3}})
      for (int64_t i = g * m * n; i < (g + 1) * m * n; ++i)
        ASSERT_EQ(got[static_cast<size_t>(i)], want[static_cast<size_t>(i)]) << "empty group " << g << " element " << i;
  }
}

TEST(CudaBf16Gemm, SwitchingBackRestoresF32) {
  DIFFMOE_REQUIRE_CUDA();
  {
    const Bf16Mode mode;
    run_gemm_case(37, 29, 53, 0, 1, 0.7, 1.3, 300);
  }
  ASSERT_EQ(gpu().gemm_precision(), GemmPrecision::kF32);
  // The f32 tolerances of cuda_vs_cpu.cpp hold again (they fail by orders of magnitude in bf16).
  const int64_t m = 37, n = 29, k = 53;
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      Dual a(ta ? Shape{k, m} : Shape{m, k}), b(tb ? Shape{n, k} : Shape{k, n}), c(Shape{m, n});
      a.normal(310);
      b.normal(311);
      c.normal(312);
      run_both([&](Backend& be, Side s) {
        be.gemm({},
                {.c = c[s], .a = a[s], .b = b[s], .trans_a = ta == 1, .trans_b = tb == 1, .alpha = 0.7, .beta = 1.3});
      });
      expect_close(c, f32_gemm_tol(k), fmt::format("f32 again: gemm ta={} tb={}", ta, tb));
    }
  }
  const int64_t R = 41, G = 5, kg = 19, ng = 23;
  Dual a(Shape{R, kg}), b(Shape{G, ng, kg}), c(Shape{R, ng}), off(Shape{G + 1}, DType::kI32);
  a.normal(320);
  b.normal(321);
  c.normal(322);
  off.set(kOffsets);
  run_both([&](Backend& be, Side s) {
    be.grouped_gemm({},
                    {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .trans_b = true, .alpha = 0.8, .beta = 1.0});
  });
  expect_close(c, f32_gemm_tol(kg), "f32 again: grouped_gemm");
  Dual wa(Shape{R, 13}), wb(Shape{R, 11}), wc(Shape{G, 13, 11});
  wa.normal(330);
  wb.normal(331);
  wc.normal(332);
  run_both([&](Backend& be, Side s) {
    be.grouped_gemm_wgrad({}, {.c = wc[s], .a = wa[s], .b = wb[s], .offsets = off[s], .alpha = 0.5, .beta = 1.0});
  });
  expect_close(wc, f32_gemm_tol(17), "f32 again: grouped_gemm_wgrad");  // largest group: 17 rows
}

// ---------------------------------------------------------------- the device-scheduled kernel

// Empty groups first, in the middle and last, two 1-row groups, groups of 149 and 131 rows (two
// 128-row m-tiles each), rows 330 … 340 past offsets[G] (must stay untouched).
const std::vector<double> kKernelOffsets = {0, 0, 1, 150, 150, 169, 300, 300, 301, 330};
constexpr int64_t kKernelRows = 341, kKernelGroups = 9, kKernelUsed = 330;

TEST(CudaBf16Gemm, GroupedKernelForwardAndDgrad) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t R = kKernelRows, G = kKernelGroups, used = kKernelUsed;
  uint64_t seed = 500;
  // (n, k): below one tile and not multiples of it; several n-tiles and k-tiles, the last partial.
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{24, 40}, {200, 264}}) {
    for (bool trans_b : {true, false}) {
      for (double beta : {0.0, 1.0}) {
        Dual a(Shape{R, k}), b(trans_b ? Shape{G, n, k} : Shape{G, k, n}), c(Shape{R, n}),
            off(Shape{G + 1}, DType::kI32);
        a.normal(seed += 3);
        b.normal(seed + 1);
        off.set(kKernelOffsets);
        c.set(grouped_c_values(R, n, used, beta == 0.0, seed + 2));
        run_both([&](Backend& be, Side s) {
          be.grouped_gemm(
              {},
              {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .trans_b = trans_b, .alpha = -1.25, .beta = beta});
        });
        expect_gemm(c, k, fmt::format("bf16 grouped kernel n={} k={} trans_b={} beta={}", n, k, trans_b, beta),
                    used * n);
      }
    }
  }
}

TEST(CudaBf16Gemm, GroupedKernelWeightGradient) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t R = kKernelRows, G = kKernelGroups;
  uint64_t seed = 600;
  for (const auto& [m, n] : {std::pair<int64_t, int64_t>{24, 40}, {200, 136}}) {
    for (double beta : {0.0, 1.0}) {
      Dual a(Shape{R, m}), b(Shape{R, n}), c(Shape{G, m, n}), off(Shape{G + 1}, DType::kI32);
      a.normal(seed += 3);
      b.normal(seed + 1);
      off.set(kKernelOffsets);
      if (beta == 0.0) c.poison();
      else c.normal(seed + 2);
      run_both([&](Backend& be, Side s) {
        be.grouped_gemm_wgrad({}, {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .alpha = 0.75, .beta = beta});
      });
      expect_gemm(c, 149, fmt::format("bf16 grouped kernel wgrad m={} n={} beta={}", m, n, beta));  // longest group
      const std::vector<double> got = c.device_values(), want = c.host_values();
      for (int64_t g : {int64_t{0}, int64_t{3}, int64_t{6}})  // the empty groups: beta·C exactly
        for (int64_t i = g * m * n; i < (g + 1) * m * n; ++i)
          ASSERT_EQ(got[static_cast<size_t>(i)], want[static_cast<size_t>(i)])
              << "empty group " << g << " element " << i;
    }
  }
}

// sum_sq (GroupedGemmWgradArgs): the TMA kernel squares the values it stores (bf16 mode, per-warp
// slots added in a fixed order), the per-group f32 path reads C back. Either way sum_sq[0] gains
// Σ C² of the device's own C to f32 rounding (4e-6: the kernel adds 32 squares per f32 partial,
// ≤ 31·2^-24 relative), and the CPU's (same mode) within 1e-5: C agrees to f32 sums of exact
// products, Σ C² to twice that relative.
TEST(CudaBf16Gemm, GroupedWeightGradientSumOfSquares) {
  DIFFMOE_REQUIRE_CUDA();
  for (const bool bf16 : {true, false}) {
    std::optional<Bf16Mode> mode;
    if (bf16) mode.emplace();
    const int64_t R = kKernelRows, G = kKernelGroups;
    uint64_t seed = 650;
    for (const auto& [m, n] : {std::pair<int64_t, int64_t>{24, 40}, {200, 136}, {128, 256}}) {
      for (double beta : {0.0, 1.0}) {
        Dual a(Shape{R, m}), b(Shape{R, n}), c(Shape{G, m, n}), off(Shape{G + 1}, DType::kI32), sq(Shape{1});
        a.normal(seed += 4);
        b.normal(seed + 1);
        off.set(kKernelOffsets);
        if (beta == 0.0) c.poison();
        else c.normal(seed + 2);
        sq.set({2.5});  // it adds
        run_both([&](Backend& be, Side s) {
          be.grouped_gemm_wgrad(
              {}, {.c = c[s], .a = a[s], .b = b[s], .offsets = off[s], .alpha = 0.75, .beta = beta, .sum_sq = sq[s]});
        });
        const std::string what = fmt::format("{} wgrad sum_sq m={} n={} beta={}", bf16 ? "bf16" : "f32", m, n, beta);
        double own = 2.5;
        for (double v : c.device_values()) own += v * v;
        const double got = sq.device_values()[0], cpu = sq.host_values()[0];
        std::printf("[cuda-bf16] %-48s sum_sq %.9g, Σ of its C² %.9g, CPU %.9g\n", what.c_str(), got, own, cpu);
        EXPECT_NEAR(got, own, 4e-6 * own) << what;
        EXPECT_NEAR(got, cpu, 1e-5 * cpu) << what;
        EXPECT_TRUE(sq.guard_intact()) << what;
      }
    }
  }
}

// Bad offsets are checked on the device (no host sync): the op skips the groups they bound and the
// next synchronize() names the first bad entry; the backend stays usable.
TEST(CudaBf16Gemm, GroupedKernelBadOffsetsReported) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t R = 64, G = 3, k = 40, n = 24;
  Dual a(Shape{R, k}), b(Shape{G, n, k}), c(Shape{R, n}), wc(Shape{G, k, n}), off(Shape{G + 1}, DType::kI32);
  a.normal(700);
  b.normal(701);
  struct Case {
    std::vector<double> offsets;
    std::string entry;
  };
  const std::vector<Case> cases = {{{0, 10, 5, 20}, "offsets[2] = 5"},    // decreasing
                                   {{0, -3, 5, 20}, "offsets[1] = -3"},   // negative
                                   {{0, 10, 20, 65}, "offsets[3] = 65"},  // offsets[G] > R
                                   {{4, 10, 20, 30}, "offsets[0] = 4"}};  // offsets[0] ≠ 0
  for (const Case& bad : cases) {
    off.set(bad.offsets);
    c.normal(702);
    expect_error(
        [&] {
          gpu().grouped_gemm({}, {.c = c[Side::kGpu],
                                  .a = a[Side::kGpu],
                                  .b = b[Side::kGpu],
                                  .offsets = off[Side::kGpu],
                                  .trans_b = true});
          gpu().synchronize({});
        },
        {"[grouped_gemm]", bad.entry, "rows = 64"});
    expect_error(
        [&] {
          gpu().grouped_gemm_wgrad(
              {}, {.c = wc[Side::kGpu], .a = a[Side::kGpu], .b = c[Side::kGpu], .offsets = off[Side::kGpu]});
          gpu().synchronize({});
        },
        {"[grouped_gemm_wgrad]", bad.entry});
    EXPECT_TRUE(c.guard_intact() && wc.guard_intact()) << bad.entry << ": wrote past the output";
  }
  gpu().synchronize({});  // reported once; the backend stays usable
}

// Groups of few rows (GroupedGemmArgs::max_group_rows ≤ 8: the few-rows kernel, grouped_gemv.cuh) against the CPU:
// both layouts of B, f32 and bf16 operands (bf16 read as stored, f32 rounded on load), k a multiple of 8 on aligned
// tensors (16-byte loads) and not (k = 19, element loads), n not a multiple of the kernel's columns, groups of 0 to 8
// rows (empty first and in the middle), beta = 0 on poisoned C and beta ≠ 0, a bf16 C; rows past offsets[G] untouched.
// Then a group above the bound is reported by synchronize() like a bad offset.
TEST(CudaBf16Gemm, GroupedFewRows) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const std::vector<double> offsets = {0, 0, 1, 9, 9, 13, 21, 23};  // groups of 0, 1, 8, 0, 4, 8, 2 rows
  const int64_t G = 7, R = 25, used = 23;
  uint64_t seed = 900;
  for (const auto& [k, n] : {std::pair<int64_t, int64_t>{1536, 45}, {96, 256}, {19, 23}})
    for (bool trans_b : {true, false})
      for (int which = 0; which < 4; ++which) {  // bit 0: A bf16, bit 1: B bf16
        for (double beta : {0.0, 0.5}) {
          const Shape sb = trans_b ? Shape{G, n, k} : Shape{G, k, n};
          Dual a(Shape{R, k}), b(sb), c(Shape{R, n}), off(Shape{G + 1}, DType::kI32);
          a.normal(seed += 3);
          b.normal(seed + 1);
          off.set(offsets);
          c.set(grouped_c_values(R, n, used, beta == 0.0, seed + 2));
          const Dual a16 = bf16_copy(a, Shape{R, k}), b16 = bf16_copy(b, sb);
          run_both([&](Backend& be, Side s) {
            be.grouped_gemm({}, {.c = c[s],
                                 .a = (which & 1) ? a16[s] : a[s],
                                 .b = (which & 2) ? b16[s] : b[s],
                                 .offsets = off[s],
                                 .trans_b = trans_b,
                                 .alpha = 0.8,
                                 .beta = beta,
                                 .max_group_rows = 8});
          });
          expect_gemm(
              c, k,
              fmt::format("bf16 grouped few rows k={} n={} trans_b={} operands {} beta={}", k, n, trans_b, which, beta),
              used * n);
        }
        // A bf16 C (beta = 0): the f32 sum rounded once.
        const Shape sb = trans_b ? Shape{G, n, k} : Shape{G, k, n};
        Dual a(Shape{R, k}), b(sb), c16(Shape{R, n}, DType::kBF16), off(Shape{G + 1}, DType::kI32);
        a.normal(seed += 3);
        b.normal(seed + 1);
        off.set(offsets);
        c16.normal(seed + 2);  // the same values on both sides: rows past offsets[G] must keep them
        run_both([&](Backend& be, Side s) {
          be.grouped_gemm({}, {.c = c16[s],
                               .a = a[s],
                               .b = b[s],
                               .offsets = off[s],
                               .trans_b = trans_b,
                               .alpha = 1.0,
                               .beta = 0.0,
                               .max_group_rows = 8});
        });
        expect_bf16_close(c16, f32_gemm_tol(k),
                          fmt::format("bf16 grouped few rows, bf16 C, k={} trans_b={}", k, trans_b));
      }
  // A group of 8 rows with the bound 4: skipped and reported; the backend stays usable.
  const int64_t k = 40, n = 24;
  Dual a(Shape{R, k}), b(Shape{G, n, k}), c(Shape{R, n}), off(Shape{G + 1}, DType::kI32);
  a.normal(950);
  b.normal(951);
  c.normal(952);
  off.set(offsets);
  expect_error(
      [&] {
        gpu().grouped_gemm({}, {.c = c[Side::kGpu],
                                .a = a[Side::kGpu],
                                .b = b[Side::kGpu],
                                .offsets = off[Side::kGpu],
                                .trans_b = true,
                                .max_group_rows = 4});
        gpu().synchronize({});
      },
      {"[grouped_gemm]", "has 8 rows", "max_group_rows = 4"});  // group 2 or 5, whichever block reports first
  EXPECT_TRUE(c.guard_intact());
  gpu().synchronize({});
}

// ---------------------------------------------------------------- bf16 operands (weight copies)

TEST(CudaBf16Gemm, Bf16OperandsAreReadInPlace) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t m = 67, n = 45, k = 83;
  uint64_t seed = 800;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int which = 1; which <= 3; ++which) {  // 1: A bf16, 2: B bf16, 3: both
        const Shape sa = ta ? Shape{k, m} : Shape{m, k}, sb = tb ? Shape{n, k} : Shape{k, n};
        Dual a(sa), b(sb), c(Shape{m, n});
        a.normal(seed += 3);
        b.normal(seed + 1);
        c.poison();
        const Dual a16 = bf16_copy(a, sa), b16 = bf16_copy(b, sb);
        run_both([&](Backend& be, Side s) {  // the same bf16 operand tensors on both sides
          be.gemm({}, {.c = c[s],
                       .a = (which & 1) ? a16[s] : a[s],
                       .b = (which & 2) ? b16[s] : b[s],
                       .trans_a = ta == 1,
                       .trans_b = tb == 1,
                       .alpha = 0.9,
                       .beta = 0.0});
        });
        expect_gemm(c, k,
                    fmt::format("bf16 operands gemm ta={} tb={} bf16={}", ta, tb,
                                which == 1   ? "A"
                                : which == 2 ? "B"
                                             : "A,B"));
      }
}

TEST(CudaBf16Gemm, GroupedBf16Operands) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t R = kKernelRows, G = kKernelGroups, used = kKernelUsed;
  uint64_t seed = 900;
  // k = 40 / n = 24 (rows a multiple of 8: read in place) and k = 19 / n = 13 (padded copies).
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{24, 40}, {13, 19}}) {
    for (bool trans_b : {true, false}) {
      const Shape sb = trans_b ? Shape{G, n, k} : Shape{G, k, n};
      Dual a(Shape{R, k}), b(sb), c(Shape{R, n}), off(Shape{G + 1}, DType::kI32);
      a.normal(seed += 3);
      b.normal(seed + 1);
      off.set(kKernelOffsets);
      c.set(grouped_c_values(R, n, used, true, seed + 2));
      const Dual a16 = bf16_copy(a, Shape{R, k}), b16 = bf16_copy(b, sb);
      run_both([&](Backend& be, Side s) {
        be.grouped_gemm(
            {},
            {.c = c[s], .a = a16[s], .b = b16[s], .offsets = off[s], .trans_b = trans_b, .alpha = 1.5, .beta = 0.0});
      });
      expect_gemm(c, k, fmt::format("bf16 operands grouped n={} k={} trans_b={}", n, k, trans_b), used * n);
    }
    Dual wa(Shape{R, n}), wb(Shape{R, k}), wc(Shape{G, n, k}), off(Shape{G + 1}, DType::kI32);
    wa.normal(seed += 3);
    wb.normal(seed + 1);
    wc.normal(seed + 2);
    off.set(kKernelOffsets);
    const Dual wb16 = bf16_copy(wb, Shape{R, k});
    run_both([&](Backend& be, Side s) {
      be.grouped_gemm_wgrad({}, {.c = wc[s], .a = wa[s], .b = wb16[s], .offsets = off[s], .alpha = 0.5, .beta = 1.0});
    });
    expect_gemm(wc, 149, fmt::format("bf16 operands grouped wgrad m={} n={}", n, k));  // the longest group
  }
}

// One two-term grouped GEMM case on both backends: A [R,k], A2 [R,k2], B/B2 by trans_b; the rows in
// use of C NaN-poisoned when beta = 0, rows ≥ offsets[G] kept (compared bitwise by expect_gemm).
// bf16_mask (bf16 mode only, both sides): bit 0 A, 1 B, 2 A2, 3 B2 passed as bf16 copies.
struct TwoTermCase {
  int64_t n, k, k2;
  bool trans_b;
  double beta;
  int bf16_mask = 0;
};
Dual run_two_terms(const TwoTermCase& tc, const std::vector<double>& offsets, int64_t R, uint64_t seed) {
  const int64_t G = static_cast<int64_t>(offsets.size()) - 1, used = static_cast<int64_t>(offsets.back());
  const auto b_shape = [&](int64_t k) { return tc.trans_b ? Shape{G, tc.n, k} : Shape{G, k, tc.n}; };
  Dual a(Shape{R, tc.k}), b(b_shape(tc.k)), a2(Shape{R, tc.k2}), b2(b_shape(tc.k2)), c(Shape{R, tc.n});
  Dual off(Shape{G + 1}, DType::kI32);
  a.normal(seed);
  b.normal(seed + 1);
  a2.normal(seed + 2);
  b2.normal(seed + 3);
  off.set(offsets);
  c.set(grouped_c_values(R, tc.n, used, tc.beta == 0.0, seed + 4));
  const Dual a16 = bf16_copy(a, Shape{R, tc.k}), b16 = bf16_copy(b, b_shape(tc.k));
  const Dual a2_16 = bf16_copy(a2, Shape{R, tc.k2}), b2_16 = bf16_copy(b2, b_shape(tc.k2));
  run_both([&](Backend& be, Side s) {
    const auto pick = [&](const Dual& f32, const Dual& b16_copy, int bit) {
      return (tc.bf16_mask & bit) != 0 ? b16_copy[s] : f32[s];
    };
    be.grouped_gemm({}, {.c = c[s],
                         .a = pick(a, a16, 1),
                         .b = pick(b, b16, 2),
                         .offsets = off[s],
                         .trans_b = tc.trans_b,
                         .alpha = -1.25,
                         .beta = tc.beta,
                         .a2 = pick(a2, a2_16, 4),
                         .b2 = pick(b2, b2_16, 8)});
  });
  return c;
}

TEST(CudaBf16Gemm, GroupedTwoTerms) {
  DIFFMOE_REQUIRE_CUDA();
  uint64_t seed = 1000;
  {
    const Bf16Mode mode;
    for (bool trans_b : {true, false})
      for (double beta : {0.0, 1.0})
        // k2 ≠ k: odd k2 (padded copy), several n-tiles and k-tiles with partial last ones in both
        // terms, odd n and k < k2, whole k-tiles (the second term starts on a fresh ring stage).
        for (const auto& [n, k, k2] :
             {std::tuple<int64_t, int64_t, int64_t>{24, 40, 19}, {200, 264, 72}, {13, 19, 40}, {24, 64, 128}}) {
          const TwoTermCase tc{.n = n, .k = k, .k2 = k2, .trans_b = trans_b, .beta = beta};
          const Dual c = run_two_terms(tc, kKernelOffsets, kKernelRows, seed += 5);
          // The TMA kernel sums both terms in one accumulator, the CPU in two passes: k + k2 terms.
          expect_gemm(c, k + k2,
                      fmt::format("bf16 two-term grouped n={} k={}+{} trans_b={} beta={}", n, k, k2, trans_b, beta),
                      kKernelUsed * n);
        }
    // bf16 operands: read in place (rows a multiple of 8) or copied (padded), mixed with f32 ones, so
    // the bf16 buffer holds 0 … 4 copies at their offsets.
    for (bool trans_b : {true, false})
      for (const auto& [n, k, k2] : {std::tuple<int64_t, int64_t, int64_t>{24, 40, 64}, {13, 19, 21}})
        for (int mask : {0b0101, 0b1010, 0b1111}) {
          const TwoTermCase tc{.n = n, .k = k, .k2 = k2, .trans_b = trans_b, .beta = 1.0, .bf16_mask = mask};
          const Dual c = run_two_terms(tc, kKernelOffsets, kKernelRows, seed += 5);
          expect_gemm(
              c, k + k2,
              fmt::format("bf16 two-term operands n={} k={}+{} trans_b={} bf16 mask={}", n, k, k2, trans_b, mask),
              kKernelUsed * n);
        }
    // No rows in use: C untouched.
    const TwoTermCase none{.n = 24, .k = 40, .k2 = 19, .trans_b = false, .beta = 1.0};
    expect_close(run_two_terms(none, {0, 0, 0, 0, 0, 0}, 41, seed += 5), kExact,
                 "bf16 two-term grouped no rows in use");
  }
  // f32 (per-group SGEMMs, two passes on both sides): f32 sums of k + k2 products.
  for (bool trans_b : {true, false})
    for (double beta : {0.0, 1.0}) {
      const TwoTermCase tc{.n = 23, .k = 19, .k2 = 7, .trans_b = trans_b, .beta = beta};
      const Dual c = run_two_terms(tc, kOffsets, 41, seed += 5);
      expect_close(c, f32_gemm_tol(tc.k + tc.k2),
                   fmt::format("f32 two-term grouped trans_b={} beta={}", trans_b, beta));
    }
}

// The router's logits GEMM asks for f32 in the bf16 mode (docs/model.md §5): f32 tolerances, not bf16 ones.
TEST(CudaBf16Gemm, F32ExactStaysF32) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t m = 67, n = 64, k = 96;
  Dual a(Shape{m, k}), b(Shape{n, k}), c(Shape{m, n});
  a.normal(960);
  b.normal(961);
  c.poison();
  run_both(
      [&](Backend& be, Side s) { be.gemm({}, {.c = c[s], .a = a[s], .b = b[s], .trans_b = true, .f32_exact = true}); });
  expect_close(c, f32_gemm_tol(k), "f32_exact gemm in the bf16 mode");
}

// moe_gather into a bf16 x_perm (the expert GEMMs' rows in the bf16 mode): each row is the source
// row rounded to bf16 on both sides, so the CPU's bf16 rows exactly. D = 72: float4 pieces (8-byte
// bf16 stores); D = 37: the scalar path.
TEST(CudaBf16Gemm, GatherIntoBf16) {
  DIFFMOE_REQUIRE_CUDA();
  for (const int64_t D : {int64_t{72}, int64_t{37}}) {
    const int64_t N = 37, rows = 111;
    Dual x(Shape{N, D}), src(Shape{rows}, DType::kI32), out(Shape{rows, D}, DType::kBF16);
    x.normal(970);
    src.ints(971, 0, static_cast<int32_t>(N));
    out.poison();
    run_both([&](Backend& be, Side s) { be.moe_gather({}, {.x_perm = out[s], .x = x[s], .src_row = src[s]}); });
    expect_close(out, kExact, fmt::format("moe_gather into bf16, D = {}", D));
  }
}

// mla_kv_split_fwd into bf16 k, v (the attention's operands in the bf16 mode): each value is the f32
// value rounded once on both sides (the split only moves values), so the CPU's bf16 k, v exactly.
// The cases of cuda_vs_cpu.cpp: widths not multiples of 4 (the scalar path) and the presets'
// multiples of 4 (four values per 8-byte bf16 store); then k, v views 2 bytes off an 8-byte
// boundary (the scalar path).
TEST(CudaBf16Gemm, KvSplitIntoBf16) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    int64_t N, H, dn, dr, dv, kr_stride, kr_offset, out_offset;
  };
  for (const Case c :
       {Case{13, 3, 4, 2, 5, 9, 6, 0}, Case{37, 3, 8, 4, 12, 20, 16, 0}, Case{37, 3, 8, 4, 12, 20, 16, 1}}) {
    const int64_t N = c.N, H = c.H, dqk = c.dn + c.dr;
    const Shape k_shape{N, H, dqk}, v_shape{N, H, c.dv};
    Dual kv(Shape{N, H * (c.dn + c.dv)}), kr(Shape{N, c.kr_stride});
    Dual k16(Shape{N * H * dqk + c.out_offset}, DType::kBF16), v16(Shape{N * H * c.dv + c.out_offset}, DType::kBF16);
    kv.normal(975);
    kr.normal(976);
    // NaN where the op writes; the out_offset elements before the views hold a finite sentinel
    // that must survive on both sides (expect_close counts NaN as a mismatch).
    for (Dual* d : {&k16, &v16}) {
      d->poison();
      for (int64_t i = 0; i < c.out_offset; ++i) static_cast<uint16_t*>(d->host().data)[i] = f32_to_bf16(-3.25f);
      d->to_gpu();
    }
    run_both([&](Backend& be, Side s) {
      be.mla_kv_split_fwd({}, {.k = offset_view(k16, s, k_shape, c.out_offset),
                               .v = offset_view(v16, s, v_shape, c.out_offset),
                               .kv = kv[s],
                               .kr = kr[s],
                               .n_heads = H,
                               .d_nope = c.dn,
                               .d_rope = c.dr,
                               .d_v = c.dv,
                               .kr_stride = c.kr_stride,
                               .kr_offset = c.kr_offset});
    });
    const std::string what =
        fmt::format("mla_kv_split_fwd into bf16, dn={} dr={} dv={} offset {}", c.dn, c.dr, c.dv, c.out_offset);
    expect_close(k16, kExact, what + ": k");
    expect_close(v16, kExact, what + ": v");
  }
}

// Element-wise outputs that only GEMMs read (swiglu's h, da, db; moe_combine_bwd's dy_perm; rmsnorm's
// y; the loss's dlogits) in bf16: the CPU's bf16 output of the same call, to within the op's f32
// tolerance plus one bf16 step (expect_bf16_close, cuda_dual.h).
TEST(CudaBf16Gemm, Bf16OutputsOfElementwiseOps) {
  DIFFMOE_REQUIRE_CUDA();
  // SwiGLU: width 40, float4 pieces; width 41, float4 pieces and a scalar tail; width 40 with inputs
  // one element past an aligned start, the scalar path. The bf16 kernels compute in f32 and take
  // the double formula for a < −80 and near the zero of silu'(a): a holds such values. The CPU
  // computes in double and rounds to f32 first: the f32 values agree to a few f32 ulps
  // (swiglu_ops.cu), far below a bf16 step.
  const Tol kSwigluTol{0.0, 0.0, "f32 vs double formula: a few f32 ulps, inside the bf16 step"};
  struct SwigluCase {
    int64_t width, offset;
  };
  for (const SwigluCase sc : {SwigluCase{40, 0}, SwigluCase{41, 0}, SwigluCase{40, 1}}) {
    const int64_t rows = 53, width = sc.width, n = rows * width;
    const Shape shape{rows, width};
    Dual a(Shape{n + 1}), b(Shape{n + 1}), dh(Shape{n + 1});
    a.normal(980, 2.0);
    const float special[] = {-85.0f, -100.0f, -1.27846f, -1.2785f, -1.275f, 120.0f, -88.9f, -81.0f};
    for (size_t i = 0; i < std::size(special); ++i) a.host().ptr<float>()[i * 5 + 1] = special[i];
    a.to_gpu();
    b.normal(981);
    dh.normal(982);
    Dual h16(shape, DType::kBF16), da16(shape, DType::kBF16), db16(shape, DType::kBF16);
    for (Dual* d : {&h16, &da16, &db16}) d->poison();
    run_both([&](Backend& be, Side s) {
      const auto in = [&](const Dual& d) { return offset_view(d, s, shape, sc.offset); };
      be.swiglu_fwd({}, {.h = h16[s], .a = in(a), .b = in(b)});
      be.swiglu_bwd({}, {.da = da16[s], .db = db16[s], .dh = in(dh), .a = in(a), .b = in(b)});
    });
    const std::string what = fmt::format("width {}, input offset {}", width, sc.offset);
    expect_bf16_close(h16, kSwigluTol, "swiglu_fwd h in bf16, " + what);
    expect_bf16_close(da16, kSwigluTol, "swiglu_bwd da in bf16, " + what);
    expect_bf16_close(db16, kSwigluTol, "swiglu_bwd db in bf16, " + what);
  }

  // moe_combine_bwd with a plan of K = 2 slots per token in token order (slot_pos[n,k] = 2n + k);
  // D = 24: float4 pieces (8-byte bf16 stores), D = 23: the scalar path.
  for (const int64_t D : {int64_t{24}, int64_t{23}}) {
    const int64_t N = 29, K = 2;
    Dual dy(Shape{N, D}), y_perm(Shape{N * K, D}), w(Shape{N, K}), slot(Shape{N, K}, DType::kI32);
    Dual dy_perm16(Shape{N * K, D}, DType::kBF16), dtw(Shape{N, K});
    dy.normal(983);
    y_perm.normal(984);
    w.normal(985);
    std::vector<double> sp(static_cast<size_t>(N * K));
    for (size_t i = 0; i < sp.size(); ++i) sp[i] = static_cast<double>(i);
    slot.set(sp);
    dy_perm16.poison();
    run_both([&](Backend& be, Side s) {
      be.moe_combine_bwd({}, {.dy_perm = dy_perm16[s],
                              .dtopk_w = dtw[s],
                              .dy = dy[s],
                              .y_perm = y_perm[s],
                              .topk_w = w[s],
                              .slot_pos = slot[s]});
    });
    expect_bf16_close(dy_perm16, kExact, fmt::format("moe_combine_bwd dy_perm in bf16, D = {}", D));
    expect_close(dtw, Tol{1e-6, 1e-7, "f64 dot rounded once on both sides"},
                 fmt::format("moe_combine_bwd dtopk_w beside a bf16 dy_perm, D = {}", D));
  }

  // rmsnorm_fwd into a bf16 y, on each path of norm_ops.cu: vector with a warp per row (plain, and
  // on the first 40 of 56 columns of a wider x with out_scale), general (x_stride 41), vector with
  // a block per row (768: q_norm's c_q, 1536: the attention x_norm). cuda_vs_cpu.cpp's kNormTol for
  // the f32 values.
  const Tol kNormTol{1e-6, 1e-7, "f64 arithmetic rounded once; r within an f32 ulp"};
  struct NormCase {
    int64_t rows, width, xs;
    double scale;
  };
  for (const NormCase c : {NormCase{31, 40, 40, 1.0}, NormCase{31, 40, 56, 0.35}, NormCase{31, 40, 41, 1.0},
                           NormCase{13, 768, 768, 1.0}, NormCase{9, 1536, 1536, 0.8}}) {
    Dual x(Shape{c.rows, c.xs}), wn(Shape{c.width}), rstd(Shape{c.rows}), y16(Shape{c.rows, c.width}, DType::kBF16);
    x.normal(990, 1.7);
    wn.normal(991, 0.5, 1.0);
    y16.poison();
    run_both([&](Backend& be, Side s) {
      be.rmsnorm_fwd({}, {.y = y16[s],
                          .rstd = rstd[s],
                          .x = x[s],
                          .w = wn[s],
                          .rows = c.rows,
                          .width = c.width,
                          .x_stride = c.xs,
                          .eps = 1e-6,
                          .out_scale = c.scale});
    });
    expect_bf16_close(y16, kNormTol, fmt::format("rmsnorm_fwd y in bf16, width {}, x_stride {}", c.width, c.xs));
  }

  // cross_entropy_bwd into a bf16 dlogits, one ignored target (its row: zeros); V = 300: float4
  // pieces (8-byte bf16 stores), V = 301: element-wise stores, V = 60000: the row streamed from
  // global memory (over the shared memory of a block). cuda_vs_cpu_moe.cpp's tolerance for the f32
  // values.
  const Tol kCeTol{1e-5, 1e-8, "f32 exp vs f64 exp, f64 sums (cuda_vs_cpu_moe.cpp)"};
  for (const int64_t V : {int64_t{300}, int64_t{301}, int64_t{60000}}) {
    const int64_t R = 7;
    Dual logits(Shape{R, V}), targets(Shape{R}, DType::kI32), valid(Shape{1}), dl16(Shape{R, V}, DType::kBF16);
    logits.normal(986, 3.0);
    targets.set({5, 299, -1, 0, 17, 150, 42});
    valid.set({6});
    dl16.poison();
    run_both([&](Backend& be, Side s) {
      be.cross_entropy_bwd(
          {}, {.dlogits = dl16[s], .logits = logits[s], .targets = targets[s], .valid = valid[s], .grad_scale = 0.75});
    });
    expect_bf16_close(dl16, kCeTol, fmt::format("cross_entropy_bwd dlogits in bf16, V = {}", V));
  }
}

// GEMM bf16 tensors need the bf16 mode on both backends, with the same message (the shared
// check_gemm_bf16_mode), and the f32_exact refusal likewise.
TEST(CudaBf16Gemm, Bf16OperandsNeedTheBf16Mode) {
  DIFFMOE_REQUIRE_CUDA();
  Dual a(Shape{8, 16}), b(Shape{4, 16}), c(Shape{8, 4});
  a.normal(950);
  const Dual b16 = bf16_copy(b.normal(951), Shape{4, 16});
  for (const Side s : {Side::kCpu, Side::kGpu}) {
    Backend& be = s == Side::kCpu ? cpu() : gpu();
    expect_error([&] { be.gemm({}, {.c = c[s], .a = a[s], .b = b16[s], .trans_b = true}); },
                 {"[gemm] b is bf16", "need the bf16 GEMM mode"});
    const Bf16Mode mode;
    expect_error([&] { be.gemm({}, {.c = c[s], .a = a[s], .b = b16[s], .trans_b = true, .f32_exact = true}); },
                 {"[gemm] b is bf16", "f32_exact = false"});
  }
  gpu().synchronize({});
}

}  // namespace
}  // namespace diffmoe::cudatest
