// The op case table on the CUDA backend (op_cases/op_case.h), one ctest entry per case and mode:
//   OpCaseCudaVsCpu: the same call on both backends from the same random non-zero inputs (outputs the
//     op overwrites start poisoned, guard bytes after every device tensor, values in front of offset
//     views), each written tensor compared with the case's tolerance and its reason; the backward
//     starts from the CPU forward's saved tensors on both sides, so it is compared on equal inputs.
//   OpCaseCudaDeterminism: two runs give the same bits, or stay within the case's tolerance where the
//     case says why they may differ (f32 atomics).
// Each test starts with DIFFMOE_REQUIRE_CUDA() (tests/cuda_test_util.h): skipped without a usable
// device (CI), a failure under tools/gpu-check.sh (DIFFMOE_REQUIRE_GPU=1).
#include <memory>

#include "backend/backend_registry.h"
#include "cuda_test_util.h"
#include "op_case_checks.h"

namespace diffmoe::opcases {
namespace {

Backend& cpu_backend() {
  static std::unique_ptr<Backend> be = make_backend("cpu");
  return *be;
}
Backend& cuda_backend() {
  static std::unique_ptr<Backend> be = make_backend("cuda");
  return *be;
}

// Both backends in the case's GEMM precision for the scope, back to f32 after (also when a check fails).
class PrecisionScope {
 public:
  explicit PrecisionScope(GemmPrecision p) {
    cpu_backend().set_gemm_precision(p);
    cuda_backend().set_gemm_precision(p);
  }
  ~PrecisionScope() {
    cpu_backend().set_gemm_precision(GemmPrecision::kF32);
    cuda_backend().set_gemm_precision(GemmPrecision::kF32);
  }
  PrecisionScope(const PrecisionScope&) = delete;
  PrecisionScope& operator=(const PrecisionScope&) = delete;
};

void compare_step(const OpInstance& host, const OpInstance& dev, Step s) {
  const OpCase& c = host.op_case();
  for (const std::string& name : host.written_by(s)) {
    expect_close(dev.values(name), host.values(name), dev.dtype_of(name), c.tol_for(name), c.label() + " " + name);
    EXPECT_TRUE(dev.guard_intact(name)) << c.label() << ": the bytes around the device tensor " << name << " changed";
  }
}

class OpCaseCudaVsCpu : public ::testing::TestWithParam<const OpCase*> {};

TEST_P(OpCaseCudaVsCpu, MatchesCpu) {
  DIFFMOE_REQUIRE_CUDA();
  const OpCase& c = *GetParam();
  const PrecisionScope precision(c.precision);
  OpInstance host(c, cpu_backend()), dev(c, cuda_backend());
  host.init();
  dev.init();
  host.fwd();
  dev.fwd();
  dev.sync();  // also reports the device-side index checks
  compare_step(host, dev, Step::kFwd);
  if (!c.has_bwd()) return;
  for (const std::string& name : host.written_by(Step::kFwd)) dev.set_values(name, host.values(name));
  host.bwd();
  dev.bwd();
  dev.sync();
  compare_step(host, dev, Step::kBwd);
}

INSTANTIATE_TEST_SUITE_P(Table, OpCaseCudaVsCpu, ::testing::ValuesIn(select_cases([](const OpCase&) { return true; })),
                         case_param_name);

class OpCaseCudaDeterminism : public ::testing::TestWithParam<const OpCase*> {};

TEST_P(OpCaseCudaDeterminism, TwoRunsAgree) {
  DIFFMOE_REQUIRE_CUDA();
  const OpCase& c = *GetParam();
  const PrecisionScope precision(c.precision);
  OpInstance dev(c, cuda_backend());
  expect_deterministic(dev, c.cuda_nondeterministic);
}

INSTANTIATE_TEST_SUITE_P(Table, OpCaseCudaDeterminism,
                         ::testing::ValuesIn(select_cases([](const OpCase&) { return true; })), case_param_name);

}  // namespace
}  // namespace diffmoe::opcases
