// The op case table on the CPU (op_cases/op_case.h): one ctest entry per case and mode.
//   OpCaseFd:         the backward against central finite differences of the case's loss, in f64
//                     (docs/style.md numerics policy: relative error <= test::kGradTol = 1e-6).
//   OpCaseCpuDeterminism: two runs give the same bits (the CPU backend keeps every sum in a fixed
//                     order), every overwritten output is written in full (it starts poisoned: NaN or
//                     kIntPoison), and the guard bytes after every tensor and the values in front of
//                     offset views stay untouched.
// The forwards against independent formulas, refusals and error messages stay in test_*.cpp.
#include <algorithm>
#include <cmath>

#include "op_case_checks.h"
#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe::opcases {
namespace {

// Elements perturbed per differentiated input: all of a small input, else this many spread evenly
// (first and last included). Each costs two forwards; a wrong or missing term of the backward shows
// in every element it touches, so a spread sample catches it as the full gradient would.
constexpr int64_t kFdSamples = 16;

std::vector<int64_t> fd_indices(int64_t n) {
  std::vector<int64_t> idx;
  if (n <= kFdSamples) {
    for (int64_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    for (int64_t j = 0; j < kFdSamples; ++j) idx.push_back(j * (n - 1) / (kFdSamples - 1));
  }
  return idx;
}

// test::expect_grad's check, ‖analytic − numeric‖ / max(‖analytic‖, ‖numeric‖, 1e-6·√m) ≤ test::kGradTol
// over the m sampled elements. The floor (1e-6 per element) matters only for an exactly-zero gradient
// (attention at T = 1: one key, dq = dk = 0, where the analytic value is f64 rounding ~1e-17 and a
// plain relative error would compare noise with noise); it is far below every non-zero gradient here
// (the smallest, cross-entropy's p/valid, are ~1e-5).
void expect_fd(const std::string& what, const std::vector<double>& analytic, const std::vector<double>& numeric) {
  double diff = 0.0, na = 0.0, nn = 0.0;
  for (size_t i = 0; i < analytic.size(); ++i) {
    diff += (analytic[i] - numeric[i]) * (analytic[i] - numeric[i]);
    na += analytic[i] * analytic[i];
    nn += numeric[i] * numeric[i];
  }
  const double err = std::sqrt(diff) /
                     std::max({std::sqrt(na), std::sqrt(nn), 1e-6 * std::sqrt(static_cast<double>(analytic.size()))});
  std::printf("[fd] %-90s rel_error = %.3e\n", what.c_str(), err);
  EXPECT_LE(err, test::kGradTol) << what;
}

class OpCaseFd : public ::testing::TestWithParam<const OpCase*> {};

TEST_P(OpCaseFd, BackwardMatchesFiniteDifferences) {
  const OpCase& c = *GetParam();
  OpInstance inst(c, test::cpu(), DType::kF64);
  // The analytic gradients: one forward and backward, the gradient tensors starting at zero so that an
  // accumulated gradient, and the untouched gaps of a strided one, read as the gradient itself (the
  // other modes start them random, which checks the accumulation).
  inst.init();
  inst.fwd();
  for (const auto& [x, dx] : c.grads) inst.set_values(dx, std::vector<double>(inst.host(dx).size(), 0.0));
  inst.bwd();
  std::vector<std::vector<double>> analytic;
  for (const auto& [x, dx] : c.grads) analytic.push_back(inst.values(dx));
  // The integer outputs of the forward (a router's selection) at the unperturbed point: the loss is
  // differentiable only where they stay constant, so every perturbed forward must give them again.
  std::vector<std::pair<std::string, std::vector<double>>> selection;
  for (const std::string& name : inst.written_by(Step::kFwd))
    if (inst.dtype_of(name) == DType::kI32 || inst.dtype_of(name) == DType::kI64)
      selection.emplace_back(name, inst.values(name));
  int flips = 0;
  // The step: the loss sums up to ~10⁵ products, whose f64 rounding (~1e-16·Σ|terms| ≈ 1e-11) over h is
  // the differences' noise; h = 1e-4 keeps it near 1e-7 of an O(1) gradient, while the truncation
  // error h²·f'''/6 stays near 1e-9 for these smooth ops (test_util.h's h = 1e-6 suits small tensors).
  constexpr double h = 1e-4;
  const auto loss = [&] {
    inst.init();
    inst.fwd();
    for (const auto& [name, base] : selection) flips += inst.values(name) != base ? 1 : 0;
    return case_loss(inst);
  };
  for (size_t k = 0; k < c.grads.size(); ++k) {
    const auto& [x, dx] = c.grads[k];
    std::vector<double>& xv = inst.host(x);
    std::vector<double> numeric, picked;
    for (const int64_t i : fd_indices(static_cast<int64_t>(xv.size()))) {
      const double x0 = xv[static_cast<size_t>(i)];
      xv[static_cast<size_t>(i)] = x0 + h;
      const double lp = loss();
      xv[static_cast<size_t>(i)] = x0 - h;
      const double lm = loss();
      xv[static_cast<size_t>(i)] = x0;
      numeric.push_back((lp - lm) / (2.0 * h));
      picked.push_back(analytic[k][static_cast<size_t>(i)]);
    }
    expect_fd(c.label() + " d" + x, picked, numeric);
  }
  EXPECT_EQ(flips, 0) << c.label() << ": a step of h changed an integer output (a selection): not differentiable there";
}

INSTANTIATE_TEST_SUITE_P(Table, OpCaseFd,
                         ::testing::ValuesIn(select_cases([](const OpCase& c) { return c.fd_applies(); })),
                         case_param_name);

class OpCaseCpuDeterminism : public ::testing::TestWithParam<const OpCase*> {};

TEST_P(OpCaseCpuDeterminism, TwoRunsBitwiseAndGuardsIntact) {
  const OpCase& c = *GetParam();
  test::cpu().set_gemm_precision(c.precision);
  OpInstance inst(c, test::cpu());
  expect_deterministic(inst, nullptr);
  for (const TensorSpec& t : c.tensors) {
    EXPECT_TRUE(inst.guard_intact(t.name)) << c.label() << ": bytes around " << t.name;
    if (t.role != Role::kOutput) continue;
    int64_t poisoned = 0;
    for (const double v : inst.values(t.name)) poisoned += std::isnan(v) || v == kIntPoison ? 1 : 0;
    EXPECT_EQ(poisoned, 0) << c.label() << ": " << poisoned << " elements of " << t.name << " were not written";
  }
  test::cpu().set_gemm_precision(GemmPrecision::kF32);
}

INSTANTIATE_TEST_SUITE_P(Table, OpCaseCpuDeterminism,
                         ::testing::ValuesIn(select_cases([](const OpCase&) { return true; })), case_param_name);

}  // namespace
}  // namespace diffmoe::opcases
