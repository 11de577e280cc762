// The checks every mode of the op case table runs (op_cases/op_case.h): value-parameterized gtest
// suites over the table, one ctest entry per case, named op_branch_shape. op_cases_test.cpp: the
// finite-difference and CPU determinism modes; op_cases_cuda.cpp: CUDA vs CPU and CUDA determinism.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "op_case.h"

namespace diffmoe::opcases {

// The cases a mode runs, and their gtest names.
inline std::vector<const OpCase*> select_cases(const std::function<bool(const OpCase&)>& keep) {
  std::vector<const OpCase*> out;
  for (const OpCase& c : op_cases())
    if (!c.bench_only && keep(c)) out.push_back(&c);
  return out;
}
inline std::string case_param_name(const ::testing::TestParamInfo<const OpCase*>& info) {
  return info.param->test_name();
}

// One bf16 step (unit in the last place) at |v|: 2^(e − 7) for |v| in [2^e, 2^(e+1)).
inline double bf16_step(double v) { return v == 0.0 ? 0.0 : std::ldexp(1.0, std::ilogb(std::fabs(v)) - 7); }

// |got − want| ≤ atol + rtol·|want| (+ one bf16 step for bf16: both sides round once to nearest, so two
// results on either side of a rounding boundary differ by a step) for every element; NaN never passes.
// Prints the worst difference for the record.
inline void expect_close(const std::vector<double>& got, const std::vector<double>& want, DType dtype, const Tol& tol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0, worst_i = -1;
  double worst_excess = -std::numeric_limits<double>::infinity(), max_abs = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = want[i], diff = std::fabs(a - b);
    double allowed = tol.atol + tol.rtol * std::fabs(b);
    if (dtype == DType::kBF16) allowed += bf16_step(std::max(std::fabs(a), std::fabs(b)));
    if (!std::isnan(diff)) max_abs = std::max(max_abs, diff);
    const double excess = std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff - allowed;
    if (!(diff <= allowed)) ++bad;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst_i = static_cast<int64_t>(i);
    }
  }
  std::printf("[op case] %-60s n=%-8zu max|diff| %.3e (rtol %.0e, atol %.0e: %s)\n", what.c_str(), got.size(), max_abs,
              tol.rtol, tol.atol, tol.why);
  if (worst_i >= 0) {
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements out of tolerance (" << tol.why
                      << "); worst at " << worst_i << ": got " << got[static_cast<size_t>(worst_i)] << ", want "
                      << want[static_cast<size_t>(worst_i)];
  }
}

// Bitwise-equal values (NaN never equal).
inline void expect_bitwise(const std::vector<double>& a, const std::vector<double>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int64_t differ = 0, first = -1;
  for (size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i] && std::signbit(a[i]) == std::signbit(b[i]))) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++differ;
    }
  EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << a.size() << " elements differ between two runs; first at "
                       << first;
}

// Every output of the case on one backend: runs the forward (and the backward) from a fresh init and
// returns the values of every tensor the steps write, in the case's order.
inline std::vector<std::vector<double>> run_outputs(OpInstance& inst) {
  inst.init();
  inst.fwd();
  if (inst.op_case().has_bwd()) inst.bwd();
  inst.sync();
  std::vector<std::vector<double>> out;
  for (const Step s : {Step::kFwd, Step::kBwd})
    for (const std::string& name : inst.written_by(s)) out.push_back(inst.values(name));
  return out;
}

// Determinism on one backend: two runs from the same inputs give the same bits, or (when the case says
// why they may not, `nondeterministic`) agree within the case's tolerances.
inline void expect_deterministic(OpInstance& inst, const char* nondeterministic) {
  const OpCase& c = inst.op_case();
  const std::vector<std::vector<double>> first = run_outputs(inst), second = run_outputs(inst);
  std::vector<std::string> names = inst.written_by(Step::kFwd);
  for (const std::string& n : inst.written_by(Step::kBwd)) names.push_back(n);
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string what = c.label() + " " + names[i] + " run to run";
    if (nondeterministic != nullptr) {
      std::printf("[op case] %s: not bitwise (%s)\n", what.c_str(), nondeterministic);
      expect_close(second[i], first[i], inst.dtype_of(names[i]), c.tol_for(names[i]), what);
    } else {
      expect_bitwise(second[i], first[i], what);
    }
  }
}

}  // namespace diffmoe::opcases
