// The dense CUDA gemm on cuBLASLt (the bf16 GEMM mode; src/backend/cuda/lt_gemm.h) against the CPU:
// a separate addend (GemmArgs::addend: C = alpha·op(A)·op(B) + beta·addend) in all four transpose
// combinations at odd sizes, the addend being C itself, beta = 0 not reading a NaN addend, k = 0,
// views off cuBLASLt's default 256-byte alignment, a bf16 output (every transpose, bf16 operands
// read in place), the refusals of a bf16 output, and the plan cache (a repeated call shape makes no
// heuristic query), and the algorithm choice by timing (autotune: every trial call's result right,
// a choice made without a host sync; off: one algorithm, the same bits every call). Also the
// addend in the f32 mode and under f32_exact (SGEMM after a copy).
//
// Tolerance. Both backends run in the bf16 GEMM mode (Bf16Mode) on the same tensors: each rounds
// f32 operands to bf16 itself (nearest even) and reads bf16 ones as they are. A product of two bf16
// values is exact in f32 (8 + 8 significant bits ≤ 24), so both sides sum the same exact products
// in f32, in other orders: the f32 GEMM tolerance of cuda_vs_cpu.cpp, |Δ| ≤ 1e-5·|ref| + 4e-6·k.
// Had the GPU not rounded its inputs, the error would be ~1.6e-3 relative (cuda_bf16_gemm.cpp),
// 100× that bound at these sizes. A bf16 output: the CPU's bf16 output of the same call, within
// that tolerance plus one bf16 step (expect_bf16_close: each side rounds its f32 result once).
#include <cmath>
#include <string>
#include <tuple>

#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

// f32 sums of k exact products in other orders (the file comment; cuda_vs_cpu.cpp's gemm_tol).
Tol exact_products_tol(int64_t k) {
  return Tol{1e-5, 4e-6 * static_cast<double>(std::max<int64_t>(k, 1)),
             "f32 sums of k exact bf16 products, other order"};
}

CudaBackend& cuda_backend() { return dynamic_cast<CudaBackend&>(gpu()); }

// The (m, n, k) of the cases: odd and not tile multiples; the second spans several k-tiles.
const std::vector<std::tuple<int64_t, int64_t, int64_t>> kSizes = {{37, 29, 19}, {131, 67, 515}};

// One addend case: C poisoned (it is only written), the addend normal.
void run_addend_case(int64_t m, int64_t n, int64_t k, bool ta, bool tb, double alpha, double beta, uint64_t seed) {
  const Shape sa = ta ? Shape{k, m} : Shape{m, k}, sb = tb ? Shape{n, k} : Shape{k, n};
  Dual a(sa), b(sb), c(Shape{m, n}), r(Shape{m, n});
  a.normal(seed);
  b.normal(seed + 1);
  r.normal(seed + 2);
  c.poison();
  run_both([&](Backend& be, Side s) {
    be.gemm(
        {},
        {.c = c[s], .a = a[s], .b = b[s], .trans_a = ta, .trans_b = tb, .alpha = alpha, .beta = beta, .addend = r[s]});
  });
  const std::string what = fmt::format("lt gemm + addend {}x{}x{} ta={} tb={} beta={}", m, n, k, ta, tb, beta);
  expect_close(c, exact_products_tol(k), what);
  expect_close(r, kExact, what + ": the addend is only read");
}

TEST(CudaLtGemm, AddendAllTransposes) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  uint64_t seed = 1100;
  for (const auto& [m, n, k] : kSizes)
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {1.0, -0.6}) run_addend_case(m, n, k, ta, tb, 0.7, beta, seed += 3);
}

// addend = C: the in-place GEMM (cuBLASLt's C = D), the same as no addend.
TEST(CudaLtGemm, AddendIsC) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t m = 37, n = 29, k = 19;
  for (bool given : {true, false}) {
    Dual a(Shape{m, k}), b(Shape{n, k}), c(Shape{m, n});
    a.normal(1200);
    b.normal(1201);
    c.normal(1202);
    run_both([&](Backend& be, Side s) {
      be.gemm({}, {.c = c[s],
                   .a = a[s],
                   .b = b[s],
                   .trans_b = true,
                   .alpha = -1.3,
                   .beta = 1.3,
                   .addend = given ? c[s] : Tensor{}});
    });
    expect_close(c, exact_products_tol(k), fmt::format("lt gemm in place, addend {}", given ? "= c" : "not given"));
  }
}

// beta = 0 reads neither C nor the addend (both NaN-poisoned); k = 0 is beta·addend (exact: one f64
// product rounded once on both sides), or zeros when beta = 0 (the NaN addend not read).
TEST(CudaLtGemm, BetaZeroDoesNotReadTheAddend) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t m = 37, n = 29, k = 19;
  Dual a(Shape{k, m}), b(Shape{k, n}), c(Shape{m, n}), r(Shape{m, n});
  a.normal(1300);
  b.normal(1301);
  c.poison();
  r.poison();
  run_both([&](Backend& be, Side s) {
    be.gemm({}, {.c = c[s], .a = a[s], .b = b[s], .trans_a = true, .alpha = 0.9, .beta = 0.0, .addend = r[s]});
  });
  expect_close(c, exact_products_tol(k), "lt gemm beta=0, NaN addend");

  Dual a0(Shape{m, 0}), b0(Shape{0, n}), c0(Shape{m, n}), r0(Shape{m, n});
  for (double beta : {0.5, 0.0}) {
    c0.poison();
    if (beta == 0.0) r0.poison();
    else r0.normal(1302);
    run_both([&](Backend& be, Side s) {
      be.gemm({}, {.c = c0[s], .a = a0[s], .b = b0[s], .alpha = 1.0, .beta = beta, .addend = r0[s]});
    });
    expect_close(c0, kExact, fmt::format("lt gemm k=0 beta={}: beta·addend", beta));
  }
}

// Views that start 2 or 4 bytes past a 256-byte boundary: the plans are made for the pointers'
// real alignments (cuBLASLt's heuristic assumes 256 bytes unless told).
TEST(CudaLtGemm, UnalignedViews) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t m = 37, n = 29, k = 19, off = 1;
  const Shape sa{m, k}, sb{n, k}, sc{m, n};
  Dual a(Shape{m * k + off}), b(Shape{n * k + off}), c(Shape{m * n + off}), r(Shape{m * n + off});
  a.normal(1400);
  b.normal(1401);
  r.normal(1402);
  c.poison();
  const Dual a16 = bf16_copy(a, Shape{m * k + off});  // bf16 A read in place from 2 bytes in
  run_both([&](Backend& be, Side s) {                 // the same views on both sides
    be.gemm({}, {.c = offset_view(c, s, sc, off),
                 .a = offset_view(a16, s, sa, off),
                 .b = offset_view(b, s, sb, off),
                 .trans_b = true,
                 .alpha = 0.8,
                 .beta = 1.0,
                 .addend = offset_view(r, s, sc, off)});
  });
  const std::vector<double> got = c.device_values(), want = c.host_values();
  const Tol tol = exact_products_tol(k);
  int64_t bad = 0;
  for (size_t i = static_cast<size_t>(off); i < want.size(); ++i)
    if (!(std::fabs(got[i] - want[i]) <= tol.atol + tol.rtol * std::fabs(want[i]))) ++bad;
  EXPECT_EQ(bad, 0) << "lt gemm on views 2 (bf16) / 4 (f32) bytes off alignment: " << bad
                    << " elements out of tolerance";
  EXPECT_TRUE(std::isnan(got[0])) << "the element before the output view was written";
  EXPECT_TRUE(c.guard_intact());
}

// A bf16 C: the CPU's bf16 C of the same call (expect_bf16_close), in every transpose combination;
// f32 or bf16 operands.
TEST(CudaLtGemm, Bf16OutputAllTransposes) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  uint64_t seed = 1500;
  for (const auto& [m, n, k] : kSizes)
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (bool bf16_operands : {false, true}) {
          const Shape sa = ta ? Shape{k, m} : Shape{m, k}, sb = tb ? Shape{n, k} : Shape{k, n};
          Dual a(sa), b(sb), c16(Shape{m, n}, DType::kBF16);
          a.normal(seed += 3);
          b.normal(seed + 1);
          c16.poison();
          const Dual a16 = bf16_copy(a, sa), b16 = bf16_copy(b, sb);
          run_both([&](Backend& be, Side s) {
            be.gemm({}, {.c = c16[s],
                         .a = bf16_operands ? a16[s] : a[s],
                         .b = bf16_operands ? b16[s] : b[s],
                         .trans_a = ta,
                         .trans_b = tb,
                         .alpha = -1.9,
                         .beta = 0.0});
          });
          expect_bf16_close(c16, exact_products_tol(k),
                            fmt::format("lt gemm -> bf16 {}x{}x{} ta={} tb={} {} operands", m, n, k, ta, tb,
                                        bf16_operands ? "bf16" : "f32"));
        }
  // k = 0: zeros, nothing read.
  Dual a0(Shape{5, 0}), b0(Shape{0, 7}), z16(Shape{5, 7}, DType::kBF16);
  z16.poison();
  run_both([&](Backend& be, Side s) { be.gemm({}, {.c = z16[s], .a = a0[s], .b = b0[s]}); });
  expect_close(z16, kExact, "lt gemm -> bf16, k = 0: zeros");
}

TEST(CudaLtGemm, Bf16OutputRefusals) {
  DIFFMOE_REQUIRE_CUDA();
  Dual a(Shape{8, 16}), b(Shape{4, 16}), c(Shape{8, 4}), c16(Shape{8, 4}, DType::kBF16), r16(Shape{8, 4}, DType::kBF16);
  a.normal(1600);
  b.normal(1601);
  const auto gemm16 = [&](double beta, bool f32_exact, const Tensor& addend) {
    gpu().gemm({}, {.c = c16[Side::kGpu],
                    .a = a[Side::kGpu],
                    .b = b[Side::kGpu],
                    .trans_b = true,
                    .beta = beta,
                    .f32_exact = f32_exact,
                    .addend = addend});
  };
  {
    const Bf16Mode mode;
    expect_error([&] { gemm16(1.0, false, {}); }, {"[gemm]", "c is bf16", "beta = 0", "beta = 1"});
    expect_error([&] { gemm16(0.5, false, r16[Side::kGpu]); }, {"[gemm]", "c is bf16", "beta = 0"});
    expect_error([&] { gemm16(0.0, true, {}); }, {"[gemm]", "c is bf16", "f32_exact"});
    // The addend has C's dtype: an f32 addend for an f32 C, not bf16.
    expect_error(
        [&] {
          gpu().gemm({}, {.c = c[Side::kGpu],
                          .a = a[Side::kGpu],
                          .b = b[Side::kGpu],
                          .trans_b = true,
                          .beta = 1.0,
                          .addend = r16[Side::kGpu]});
        },
        {"[gemm]", "addend", "dtype"});
  }
  expect_error([&] { gemm16(0.0, false, {}); }, {"[gemm]", "c is bf16", "bf16 GEMM mode"});  // kF32
  expect_error(
      [&] {  // the CPU's f32 mode refuses it alike (the shared check_gemm_bf16_mode)
        cpu().gemm({}, {.c = c16[Side::kCpu], .a = a[Side::kCpu], .b = b[Side::kCpu], .trans_b = true});
      },
      {"[gemm]", "c is bf16", "bf16 GEMM mode"});
  gpu().synchronize({});  // nothing was enqueued; the backend stays usable
}

// The plan of a call shape is made once (one heuristic query); later calls of that shape, with
// other data at equally aligned addresses, reuse it. Another shape, beta = 0 and a separate addend
// each make a plan of their own.
TEST(CudaLtGemm, PlansAreCachedByShape) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const LtGemm& lt = cuda_backend().lt_gemm();
  const auto call = [&](int64_t m, double beta, bool addend, uint64_t seed) {
    Dual a(Shape{m, 24}), b(Shape{40, 24}), c(Shape{m, 40}), r(Shape{m, 40});
    a.normal(seed);
    b.normal(seed + 1);
    c.normal(seed + 2);
    r.normal(seed + 3);
    gpu().gemm({}, {.c = c[Side::kGpu],
                    .a = a[Side::kGpu],
                    .b = b[Side::kGpu],
                    .trans_b = true,
                    .beta = beta,
                    .addend = addend ? r[Side::kGpu] : Tensor{}});
    gpu().synchronize({});
  };
  call(48, 1.0, true, 1700);  // may have been planned by an earlier test: the baseline follows it
  const int64_t q0 = lt.heuristic_queries();
  const size_t plans0 = lt.plans();
  for (uint64_t i = 0; i < 3; ++i) call(48, 1.0, true, 1710 + 4 * i);
  EXPECT_EQ(lt.heuristic_queries(), q0) << "a repeated call shape queried the heuristic again";
  EXPECT_EQ(lt.plans(), plans0);
  call(1234, 1.0, true, 1730);  // a new m
  EXPECT_EQ(lt.heuristic_queries(), q0 + 1);
  call(1234, 1.0, true, 1740);
  call(1234, 0.0, true, 1750);   // beta = 0: C is D, not read
  call(1234, 1.0, false, 1760);  // in place
  EXPECT_EQ(lt.heuristic_queries(), q0 + 3);
  EXPECT_LE(lt.plans(), LtGemm::kMaxPlans);
}

// ---------------------------------------------------------------- autotune (lt_gemm.h)

// One GEMM shape run many times on an LtGemm of the test's own (the backend's may have tuned the
// shape already): row-major C[m, n] = 0.7·A[m, k]·B[k, n] (+ R), as gemm_ops.cu hands it to
// cuBLASLt (its A is our B, its B our A, its D [n, m] column-major our C). Two outputs: f32 with a
// separate addend R, beta = 1 (C ≠ D: the case whose heuristic choice was slow), and bf16 with
// beta = 0 (every candidate must still round the f32 result once).
class AutotuneCase {
 public:
  static constexpr int64_t kM = 256, kN = 384, kK = 512;

  explicit AutotuneCase(bool bf16_out)
      : bf16_out_(bf16_out),
        a_(normal_dual(Shape{kM, kK}, 1900)),
        b_(normal_dual(Shape{kK, kN}, 1901)),
        r_(normal_dual(Shape{kM, kN}, 1902)),
        ref_(Shape{kM, kN}),
        out_(Shape{kM, kN}, bf16_out ? DType::kBF16 : DType::kF32),
        a16_(bf16_copy(a_, Shape{kM, kK})),
        b16_(bf16_copy(b_, Shape{kK, kN})) {
    // The CPU's bf16-mode result from the same bf16 operands (the file comment's tolerance), in f32
    // on ref_'s host side.
    const Bf16Mode mode;
    cpu().gemm({}, {.c = ref_[Side::kCpu],
                    .a = a16_[Side::kCpu],
                    .b = b16_[Side::kCpu],
                    .alpha = 0.7,
                    .beta = bf16_out ? 0.0 : 1.0,
                    .addend = bf16_out ? Tensor{} : r_[Side::kCpu]});
  }

  LtGemmCall call() const {
    void* d = out_[Side::kGpu].data;
    return LtGemmCall{.m = kN,
                      .n = kM,
                      .k = kK,
                      .lda = kN,
                      .ldb = kK,
                      .ldc = kN,
                      .a = b16_[Side::kGpu].data,
                      .b = a16_[Side::kGpu].data,
                      .c = bf16_out_ ? d : r_[Side::kGpu].data,
                      .d = d,
                      .cd_type = bf16_out_ ? CUDA_R_16BF : CUDA_R_32F,
                      .alpha = 0.7f,
                      .beta = bf16_out_ ? 0.0f : 1.0f,
                      .op = "autotune test"};
  }

  // Runs the call once into a NaN-filled output (an algorithm that skipped an element would show)
  // and returns the device result; the download waits for it, so a trial is measured by the next call.
  std::vector<double> run(LtGemm& lt) {
    out_.poison();
    lt.run(call(), nullptr);
    return out_.device_values();
  }

  // got (run's result) against the CPU: the file comment's f32 tolerance; for the bf16 output, that
  // plus one bf16 step (2^-8 relative: the f32 result rounded once). One step alone
  // alone is too tight at k = 512: where the sum nearly cancels, the two sides' f32 sums already
  // differ by more than a bf16 step of the small result (seen on an H100, heuristic's choice too).
  void expect_right(const std::vector<double>& got, const std::string& what) const {
    const std::vector<double> want = ref_.host_values();
    Tol tol = exact_products_tol(kK);
    if (bf16_out_) tol.rtol += 1.0 / 256;
    int64_t bad = 0;
    for (size_t i = 0; i < want.size(); ++i)
      if (!(std::fabs(got[i] - want[i]) <= tol.atol + tol.rtol * std::fabs(want[i]))) ++bad;  // NaN fails
    EXPECT_EQ(bad, 0) << what << ": " << bad << " elements out of tolerance";
    EXPECT_TRUE(out_.guard_intact()) << what;
  }

 private:
  static Dual normal_dual(const Shape& shape, uint64_t seed) {
    Dual d(shape);
    d.normal(seed);
    return d;
  }

  bool bf16_out_;
  Dual a_, b_, r_;
  Dual ref_;        // host side: the CPU result
  Dual out_;        // device side: cuBLASLt's D
  Dual a16_, b16_;  // a_, b_ rounded to bf16: what cuBLASLt reads
};

// More calls than trials (kCandidates·kTrials), so a later call measures the last trials and chooses.
constexpr int kAutotuneCalls = 40;
static_assert(kAutotuneCalls > LtGemm::kCandidates * LtGemm::kTrials);

// Every call is right, the trial calls of every candidate included, and tuning ends with a choice
// among the candidates, made from event times the library polls without a host sync of its own
// (the test's downloads sync, so each trial has finished by the next call).
TEST(CudaLtGemm, AutotuneTriesTheCandidatesOnRealCalls) {
  DIFFMOE_REQUIRE_CUDA();
  for (bool bf16_out : {false, true}) {
    AutotuneCase tc(bf16_out);
    const std::string what = fmt::format("autotune {}", bf16_out ? "bf16 out, beta = 0" : "f32 out + addend, beta = 1");
    LtGemm lt(/*autotune=*/true);
    for (int i = 0; i < kAutotuneCalls; ++i) tc.expect_right(tc.run(lt), fmt::format("{}, call {}", what, i));
    gpu().synchronize({});
    for (int i = 0; i < 3; ++i) tc.run(lt);
    EXPECT_EQ(lt.heuristic_queries(), 1) << what;
    EXPECT_EQ(lt.plans(), size_t{1}) << what;
    const std::vector<LtGemmTuneReport> reports = lt.tune_reports();
    ASSERT_EQ(reports.size(), size_t{1}) << what << ": not tuned after " << kAutotuneCalls + 3 << " calls";
    const LtGemmTuneReport& r = reports[0];
    std::printf("[cuda-lt] %s: %s, candidate %d of %d, %.4f ms (heuristic's first) -> %.4f ms\n", what.c_str(),
                r.shape.c_str(), r.chosen, r.candidates, static_cast<double>(r.heuristic_ms),
                static_cast<double>(r.chosen_ms));
    EXPECT_GE(r.candidates, 1) << what;
    EXPECT_LE(r.candidates, LtGemm::kCandidates) << what;
    EXPECT_GE(r.chosen, 0) << what;
    EXPECT_LT(r.chosen, r.candidates) << what;
    EXPECT_GT(r.heuristic_ms, 0.0f) << what;
    EXPECT_LE(r.chosen_ms, r.heuristic_ms) << what << ": the chosen candidate is the fastest, candidate 0 included";
  }
}

// autotune off: the heuristic's first choice on every call, so every call gives the same bits, and
// nothing is reported.
TEST(CudaLtGemm, AutotuneOffKeepsOneAlgorithm) {
  DIFFMOE_REQUIRE_CUDA();
  AutotuneCase tc(/*bf16_out=*/false);
  LtGemm lt(/*autotune=*/false);
  const std::vector<double> first = tc.run(lt);
  tc.expect_right(first, "autotune off");
  for (int i = 1; i < kAutotuneCalls; ++i) EXPECT_TRUE(tc.run(lt) == first) << "autotune off: call " << i << " differs";
  EXPECT_TRUE(lt.tune_reports().empty());
  EXPECT_EQ(lt.heuristic_queries(), 1);
}

// Outside cuBLASLt: the f32 mode and f32_exact run SGEMM, which adds in place: the addend is copied
// into C first (the CPU's order), so the f32 tolerance of cuda_vs_cpu.cpp holds (f32 products,
// each rounded once, summed in other orders: the same bound as exact_products_tol).
void run_f32_addend_cases(bool f32_exact) {
  const int64_t m = 37, n = 29, k = 19;
  for (bool ta : {false, true}) {
    Dual a(ta ? Shape{k, m} : Shape{m, k}), b(Shape{k, n}), c(Shape{m, n}), r(Shape{m, n});
    a.normal(1800);
    b.normal(1801);
    r.normal(1802);
    c.poison();
    run_both([&](Backend& be, Side s) {
      be.gemm({}, {.c = c[s],
                   .a = a[s],
                   .b = b[s],
                   .trans_a = ta,
                   .alpha = 0.7,
                   .beta = -1.1,
                   .f32_exact = f32_exact,
                   .addend = r[s]});
    });
    const std::string what = fmt::format("{} gemm + addend ta={}", f32_exact ? "f32_exact" : "f32", ta);
    expect_close(c, Tol{1e-5, 4e-6 * k, "f32 sums of k products, other order"}, what);
    expect_close(r, kExact, what + ": the addend is only read");
  }
}

TEST(CudaLtGemm, AddendInTheF32Paths) {
  DIFFMOE_REQUIRE_CUDA();
  run_f32_addend_cases(false);  // GemmPrecision::kF32
  const Bf16Mode mode;
  run_f32_addend_cases(true);
}

}  // namespace
}  // namespace diffmoe::cudatest
