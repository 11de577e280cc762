// LtGemm (lt_gemm.h): cuBLASLt plans cached by call shape, one workspace, checked calls.
#include "backend/cuda/lt_gemm.h"

#include <fmt/core.h>

#include <string>
#include <utility>

#include "backend/cuda/cuda_check.h"
#include "core/error.h"

namespace diffmoe {

namespace {

// The largest power of two (≤ 256, cuBLASLt's default assumption) that divides the address.
int64_t alignment_of(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  int64_t align = 256;
  while (align > 1 && v % static_cast<uintptr_t>(align) != 0) align /= 2;
  return align;
}

std::string_view type_name(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_32F: return "f32";
    case CUDA_R_16BF: return "bf16";
    default: return "other";
  }
}

// The op and the call's shapes, for error messages (built only when one is thrown).
std::string describe(const LtGemmCall& c) {
  return fmt::format(
      "[{}] cuBLASLt column-major D[{}, {}] = {}·op(A)·op(B) + {}·C, k = {}, op(A) {}, op(B) {}, lda {}, ldb {}, "
      "ldc {}, A/B {}, C/D {}{}; alignments A {}, B {}, C {}, D {} bytes",
      c.op, c.m, c.n, c.alpha, c.beta, c.k, c.trans_a ? "T" : "N", c.trans_b ? "T" : "N", c.lda, c.ldb, c.ldc,
      type_name(c.ab_type), type_name(c.cd_type), c.c == c.d ? " (in place)" : "", alignment_of(c.a),
      alignment_of(c.b), alignment_of(c.c), alignment_of(c.d));
}

// A heuristic preference, destroyed with the scope (only plan creation uses one).
struct Preference {
  cublasLtMatmulPreference_t p = nullptr;
  ~Preference() {
    if (p != nullptr) (void)cublasLtMatmulPreferenceDestroy(p);
  }
};

}  // namespace

LtGemm::LtGemm() {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_.reserve(kWorkspaceBytes);
}

LtGemm::~LtGemm() {
  plans_.clear();  // their descriptors before the handle
  if (handle_ != nullptr) (void)cublasLtDestroy(handle_);
}

LtGemm::Plan::~Plan() {
  for (cublasLtMatrixLayout_t l : {a, b, c, d})
    if (l != nullptr) (void)cublasLtMatrixLayoutDestroy(l);
  if (desc != nullptr) (void)cublasLtMatmulDescDestroy(desc);
}

LtGemm::Key LtGemm::key_of(const LtGemmCall& c) {
  return Key{c.m, c.n, c.k, c.trans_a, c.trans_b, c.lda, c.ldb, c.ldc, static_cast<int64_t>(c.ab_type),
             static_cast<int64_t>(c.cd_type), c.beta == 0.0f, c.c == c.d, alignment_of(c.a), alignment_of(c.b),
             alignment_of(c.c), alignment_of(c.d)};
}

void LtGemm::make_plan(Plan& p, const LtGemmCall& c) {
  // Every failure here leaves p's descriptors to ~Plan (run() erases the half-made plan).
  CUBLASLT_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), describe(c));
  const cublasOperation_t op_a = c.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = c.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), describe(c));
  CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), describe(c));
  // Stored (column-major) shapes: op(A) [m, k] is A [m, k], or A [k, m] when transposed; likewise B.
  const auto stored = [](bool trans, int64_t rows, int64_t cols) {
    return trans ? std::pair{cols, rows} : std::pair{rows, cols};
  };
  const auto [a_rows, a_cols] = stored(c.trans_a, c.m, c.k);
  const auto [b_rows, b_cols] = stored(c.trans_b, c.k, c.n);
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.a, c.ab_type, u(a_rows), u(a_cols), c.lda), describe(c));
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.b, c.ab_type, u(b_rows), u(b_cols), c.ldb), describe(c));
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.c, c.cd_type, u(c.m), u(c.n), c.ldc), describe(c));
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.d, c.cd_type, u(c.m), u(c.n), c.ldc), describe(c));

  Preference pref;
  CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref.p), describe(c));
  const uint64_t workspace = workspace_.bytes();
  CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                      sizeof(workspace)),
                 describe(c));
  // The pointers' real alignments (part of the key): the default assumes 256 bytes, and an
  // algorithm chosen under it may fail or fault on a view that starts elsewhere.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, const void*> aligns[4] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, c.a}, {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, c.b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c.c}, {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c.d}};
  for (const auto& [attr, ptr] : aligns) {
    const auto align = static_cast<uint32_t>(alignment_of(ptr));
    CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, attr, &align, sizeof(align)), describe(c));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  ++heuristic_queries_;
  CUBLASLT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.d, pref.p, 1, &result, &found),
                 describe(c));
  DIFFMOE_CHECK(found > 0 && result.state == CUBLAS_STATUS_SUCCESS,
                "{}: the cuBLASLt heuristic offers no algorithm (returned {}, state {})", describe(c), found,
                cublas_status_name(result.state));
  DIFFMOE_CHECK(result.workspaceSize <= workspace_.bytes(), "{}: the chosen algorithm wants {} workspace bytes, {} given",
                describe(c), result.workspaceSize, workspace_.bytes());
  p.algo = result.algo;
}

void LtGemm::run(const LtGemmCall& c, cudaStream_t s) {
  DIFFMOE_CHECK(c.m > 0 && c.n > 0 && c.k > 0, "{}: cuBLASLt needs m, n, k > 0", describe(c));
  const Key key = key_of(c);
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    if (plans_.size() >= kMaxPlans) plans_.clear();  // bounded (lt_gemm.h): refilled by the shapes in use
    it = plans_.try_emplace(key).first;
    try {
      make_plan(it->second, c);
    } catch (...) {
      plans_.erase(it);  // never keep a half-made plan
      throw;
    }
  }
  const Plan& p = it->second;
  CUBLASLT_CHECK(cublasLtMatmul(handle_, p.desc, &c.alpha, c.a, p.a, c.b, p.b, &c.beta, c.c, p.c, c.d, p.d, &p.algo,
                                workspace_.get(), workspace_.bytes(), s),
                 describe(c));
}

}  // namespace diffmoe
