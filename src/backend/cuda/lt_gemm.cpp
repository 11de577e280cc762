// LtGemm (lt_gemm.h): cuBLASLt plans cached by call shape, one workspace, checked calls.
#include "backend/cuda/lt_gemm.h"

#include <fmt/core.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <span>
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
    case CUDA_R_8F_E4M3: return "e4m3";
    default: return "other";
  }
}

// The op and the call's shapes, for error messages (built only when one is thrown).
std::string_view scale_mode_name(cublasLtMatmulMatrixScale_t m) {
  switch (m) {
    case CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F: return "1x128 (VEC128_32F)";
    case CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F: return "128x128 (BLK128x128_32F)";
    default: return "other";
  }
}

std::string describe(const LtGemmCall& c) {
  std::string text = fmt::format(
      "[{}] cuBLASLt column-major D[{}, {}] = {}·op(A)·op(B) + {}·C, k = {}, op(A) {}, op(B) {}, lda {}, ldb {}, "
      "ldc {}, A/B {}, C/D {}{}; alignments A {}, B {}, C {}, D {} bytes",
      c.op, c.m, c.n, c.alpha, c.beta, c.k, c.trans_a ? "T" : "N", c.trans_b ? "T" : "N", c.lda, c.ldb, c.ldc,
      type_name(c.ab_type), type_name(c.cd_type), c.c == c.d ? " (in place)" : "", alignment_of(c.a), alignment_of(c.b),
      alignment_of(c.c), alignment_of(c.d));
  if (c.block_scaled)
    text += fmt::format(
        "; block-scaled FP8: A scales {}, B scales {} (alignments {}, {} bytes; cuBLASLt runs these on "
        "compute capability 9.0 with CUDA >= 12.9)",
        scale_mode_name(c.a_scale_mode), scale_mode_name(c.b_scale_mode), alignment_of(c.a_scale),
        alignment_of(c.b_scale));
  return text;
}

// The shape as one short line, for the tuning reports: "m×n×k", op(A) and op(B), whether beta is 0,
// whether C is D, D's type (what the plan key separates, less leading dimensions and alignments).
std::string shape_text(const LtGemmCall& c) {
  return fmt::format("{}×{}×{} {}{} beta{} {} {} out{}", c.m, c.n, c.k, c.trans_a ? "T" : "N", c.trans_b ? "T" : "N",
                     c.beta == 0.0f ? "=0" : "≠0", c.c == c.d ? "C=D" : "C≠D", type_name(c.cd_type),
                     c.block_scaled ? " fp8 block-scaled" : "");
}

// Whether work enqueued on s now would be captured into a CUDA graph rather than run.
bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(s, &status));
  return status != cudaStreamCaptureStatusNone;
}

// A heuristic preference, destroyed with the scope (only plan creation uses one).
struct Preference {
  cublasLtMatmulPreference_t p = nullptr;
  ~Preference() {
    if (p != nullptr) (void)cublasLtMatmulPreferenceDestroy(p);
  }
};

}  // namespace

LtGemm::LtGemm(bool autotune) : autotune_(autotune) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_.reserve(kWorkspaceBytes);
}

bool LtGemm::autotune_from_env() {
  const char* v = std::getenv("DIFFMOE_GEMM_AUTOTUNE");
  if (v == nullptr || std::strcmp(v, "1") == 0) return true;
  DIFFMOE_CHECK(std::strcmp(v, "0") == 0,
                "[cuda] DIFFMOE_GEMM_AUTOTUNE is '{}': 1 (or unset) times the cuBLASLt "
                "candidates, 0 keeps the heuristic's first choice",
                v);
  return false;
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
  return Key{c.m,
             c.n,
             c.k,
             c.trans_a,
             c.trans_b,
             c.lda,
             c.ldb,
             c.ldc,
             static_cast<int64_t>(c.ab_type),
             static_cast<int64_t>(c.cd_type),
             c.beta == 0.0f,
             c.c == c.d,
             alignment_of(c.a),
             alignment_of(c.b),
             alignment_of(c.c),
             alignment_of(c.d),
             c.block_scaled ? static_cast<int64_t>(c.a_scale_mode) : -1,
             c.block_scaled ? static_cast<int64_t>(c.b_scale_mode) : -1};
}

void LtGemm::make_plan(Plan& p, const LtGemmCall& c) {
  // Every failure here leaves p's descriptors to ~Plan (plan_for erases the half-made plan).
  CUBLASLT_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), describe(c));
  const cublasOperation_t op_a = c.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = c.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), describe(c));
  CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), describe(c));
  if (c.block_scaled) {
    // The scale modes (part of the key) and the first call's scale tensors (the heuristic sees a complete
    // descriptor; every call sets its own pointers again). Fast accumulation stays off: the tensor cores'
    // partial sums are promoted to f32 (docs/derivations.md §6.3), the only mode cuBLASLt offers with these scales.
    const int8_t fast_accum = 0;
    CUBLASLT_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accum, sizeof(fast_accum)),
        describe(c));
    CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &c.a_scale_mode,
                                                  sizeof(c.a_scale_mode)),
                   describe(c));
    CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &c.b_scale_mode,
                                                  sizeof(c.b_scale_mode)),
                   describe(c));
    set_scale_pointers(p, c);
  }
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
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, c.a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, c.b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c.c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c.d}};
  for (const auto& [attr, ptr] : aligns) {
    const auto align = static_cast<uint32_t>(alignment_of(ptr));
    CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, attr, &align, sizeof(align)), describe(c));
  }
  // With autotune off only the first result is used: ask for one, the query made before autotune.
  const int wanted = autotune_ ? kCandidates : 1;
  std::array<cublasLtMatmulHeuristicResult_t, kCandidates> results{};
  int found = 0;
  ++heuristic_queries_;
  CUBLASLT_CHECK(
      cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.d, pref.p, wanted, results.data(), &found),
      describe(c));
  // Usable: runnable here (state) within our workspace (the preference bounds it; checked anyway, as
  // a call with a too-small workspace fails). Heuristic order kept: candidate 0 is its first choice.
  for (const cublasLtMatmulHeuristicResult_t& r : std::span(results).first(static_cast<size_t>(found)))
    if (r.state == CUBLAS_STATUS_SUCCESS && r.workspaceSize <= workspace_.bytes()) p.candidates.push_back(r.algo);
  DIFFMOE_CHECK(found > 0, "{}: the cuBLASLt heuristic offers no algorithm", describe(c));
  DIFFMOE_CHECK(!p.candidates.empty(),
                "{}: none of the {} algorithms the cuBLASLt heuristic offers is usable (the first: state {}, {} "
                "workspace bytes, {} given)",
                describe(c), found, cublas_status_name(results[0].state), results[0].workspaceSize, workspace_.bytes());
  if (autotune_) {
    p.tuning = Tuning::kTrying;
    p.shape = shape_text(c);
    p.best_ms.assign(p.candidates.size(), std::numeric_limits<float>::infinity());
  }
}

LtGemm::Plan& LtGemm::plan_for(const LtGemmCall& c) {
  const Key key = key_of(c);
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  if (plans_.size() >= kMaxPlans) plans_.clear();  // bounded (lt_gemm.h): refilled by the shapes in use
  it = plans_.try_emplace(key).first;
  try {
    make_plan(it->second, c);
  } catch (...) {
    plans_.erase(it);  // never keep a half-made plan
    throw;
  }
  return it->second;
}

void LtGemm::run(const LtGemmCall& c, cudaStream_t s) {
  DIFFMOE_CHECK(c.m > 0 && c.n > 0 && c.k > 0, "{}: cuBLASLt needs m, n, k > 0", describe(c));
  Plan& p = plan_for(c);
  // Tuned or fixed plans pay one branch. An untuned one first takes in the trials that have
  // finished (which may end tuning), then times this call with the next candidate while any is
  // left to try; captured calls do neither (lt_gemm.h).
  if (p.tuning == Tuning::kTrying && !capturing(s)) {
    collect_trials(p);
    if (p.tuning == Tuning::kTrying && p.issued < p.trials()) {
      run_trial(p, c, s);
      return;
    }
  }
  matmul(p, p.chosen, c, s);
}

void LtGemm::collect_trials(Plan& p) {
  for (size_t i = 0; i < p.pending.size();) {
    Trial& t = p.pending[i];
    const cudaError_t status = cudaEventQuery(t.stop.get());
    if (status == cudaErrorNotReady) {
      // Not an error, but the runtime may keep it as the last error, which the next launch check
      // (cudaGetLastError) would report: clear it. Every other call is checked where it is made,
      // so nothing else is lost here.
      (void)cudaGetLastError();
      ++i;
      continue;
    }
    if (status != cudaSuccess) cuda_fail("cudaEventQuery(trial.stop)", __FILE__, __LINE__, status);
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, t.start.get(), t.stop.get()));
    p.best_ms[t.candidate] = std::min(p.best_ms[t.candidate], ms);        // the min: one-time costs and noise only add
    p.pending.erase(p.pending.begin() + static_cast<std::ptrdiff_t>(i));  // destroys its events
  }
  if (p.issued < p.trials() || !p.pending.empty()) return;
  // Every trial measured: the fastest; a tie keeps the heuristic's preference (the lower index).
  size_t best = 0;
  for (size_t i = 1; i < p.best_ms.size(); ++i)
    if (p.best_ms[i] < p.best_ms[best]) best = i;
  p.chosen = best;
  p.tuning = Tuning::kDone;
  std::vector<Trial>().swap(p.pending);  // its capacity too: nothing more is timed
}

void LtGemm::run_trial(Plan& p, const LtGemmCall& c, cudaStream_t s) {
  const auto new_event = [] {
    cudaEvent_t e = nullptr;
    CUDA_CHECK(cudaEventCreate(&e));  // default flags: timing on
    return Event(e);
  };
  Trial t{.candidate = p.issued % p.candidates.size(), .start = new_event(), .stop = new_event()};
  // A failure below destroys t's events with it, and the trial is enqueued again by a later call.
  CUDA_CHECK(cudaEventRecord(t.start.get(), s));
  matmul(p, t.candidate, c, s);
  CUDA_CHECK(cudaEventRecord(t.stop.get(), s));
  p.pending.push_back(std::move(t));
  ++p.issued;
}

void LtGemm::set_scale_pointers(const Plan& p, const LtGemmCall& c) {
  CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &c.a_scale, sizeof(c.a_scale)),
      describe(c));
  CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &c.b_scale, sizeof(c.b_scale)),
      describe(c));
}

void LtGemm::matmul(const Plan& p, size_t candidate, const LtGemmCall& c, cudaStream_t s) {
  if (c.block_scaled) set_scale_pointers(p, c);
  CUBLASLT_CHECK(
      cublasLtMatmul(handle_, p.desc, &c.alpha, c.a, p.a, c.b, p.b, &c.beta, c.c, p.c, c.d, p.d,
                     &p.candidates[candidate], workspace_.get(), workspace_.bytes(), s),
      fmt::format("{}; algorithm: the heuristic's candidate {} of {}", describe(c), candidate, p.candidates.size()));
}

bool LtGemm::tuning() const {
  return std::any_of(plans_.begin(), plans_.end(), [](const auto& kv) { return kv.second.tuning == Tuning::kTrying; });
}

std::vector<LtGemmTuneReport> LtGemm::tune_reports() const {
  std::vector<LtGemmTuneReport> reports;
  for (const auto& [key, p] : plans_) {
    if (p.tuning != Tuning::kDone) continue;
    reports.push_back(LtGemmTuneReport{p.shape, static_cast<int>(p.candidates.size()), static_cast<int>(p.chosen),
                                       p.best_ms[0], p.best_ms[p.chosen]});
  }
  return reports;
}

}  // namespace diffmoe
