// The dense GEMMs of the bf16 GEMM mode on cuBLASLt (cublasLtMatmul), owned by the CUDA backend.
// cuBLASLt rather than cublasGemmEx because it takes an addend C apart from the output D (a
// residual added by the GEMM, GemmArgs::addend) and a bf16 D rounded once by its epilogue.
//
// A call is given column-major, as cuBLAS sees it (gemm_ops.cu turns the row-major op into it):
//   D[m, n] = alpha · op(A) · op(B) + beta · C,   op(A) [m, k], op(B) [k, n], f32 accumulation,
// A and B bf16, C and D one type (f32, or bf16 with beta = 0) and one leading dimension.
//
// Each distinct call shape gets a plan: the matmul descriptor, the four matrix layouts and the
// algorithms cuBLASLt's heuristic offers for them. Plans are cached by everything the heuristic's
// answer depends on (sizes, transposes, leading dimensions, types, beta = 0, C = D, and each
// pointer's alignment: the heuristic only offers algorithms that the given alignments allow), so a
// training step's GEMMs query the heuristic once each, in the first step. The cache is bounded
// (kMaxPlans): a caller whose shapes never repeat (generation's prompt lengths) cannot grow it
// without end; when full it is emptied and refilled.
//
// Which algorithm runs: measured ("autotune"; on unless DIFFMOE_GEMM_AUTOTUNE=0). The heuristic's
// first choice is an estimate, and for some shapes a poor one (a profile showed f32 calls with an
// addend C != D and beta = 1 at 310 TFLOP/s where the same shape with beta = 0 ran 580). So a plan
// keeps the heuristic's top kCandidates usable algorithms, in its order, and times them on the
// shape's real calls: while the plan is untuned each call runs the next candidate round-robin
// (kTrials calls each) between two cudaEvents on its stream, and each later call of the shape first
// polls those events without waiting (cudaEventQuery). Once every candidate has kTrials times, the
// one with the smallest minimum is kept for the plan's life. No scratch buffers and no host sync:
// every candidate computes the same GEMM, so the trial calls' outputs are the real outputs.
// - A shape's first call runs candidate 0, the heuristic's choice, so a shape that never repeats
//   runs as before (plus two events); its first kCandidates·kTrials calls try the others, some of
//   them slower. A training step's shapes repeat: a shape called once a step (the head's GEMMs)
//   settles within ~16 steps, one called per layer within two (bench_step warms up until
//   Backend::tuning() is false).
// - A call enqueued while its stream is being captured (CUDA graphs) runs the current choice
//   (candidate 0 while untuned) untimed: events in a graph would time its replays, not this call.
// - The plan cache bound still holds: tuning state lives in the plans (at most kCandidates·kTrials
//   event pairs each), and an evicted shape is tuned again when it comes back.
// - Reproducibility: the algorithm, and with it the summation order, depends on timings, so results
//   can differ in the last bits between runs (and between two LtGemms in one run). Set
//   DIFFMOE_GEMM_AUTOTUNE=0 for a fixed choice: the heuristic's first, as before autotune.
//
// One workspace (kWorkspaceBytes, allocated once, 256-byte aligned by cudaMalloc) serves every
// call; like the cuBLAS handle's, it is shared by every stream, so one backend drives one stream at
// a time (cuda_backend.h). Host-only code: compiled as C++20 with the project's warnings; the
// header stays C++17 for the .cu files that include it.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "backend/cuda/cuda_allocator.h"

namespace diffmoe {

// One column-major GEMM for LtGemm::run (see the file comment). C may equal D (in place); with
// beta = 0 C is not read.
// Block-scaled FP8 (fp8_gemm, op_args.h): A and B CUDA_R_8F_E4M3 with a_scale_mode / b_scale_mode
// CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F or _BLK128x128_32F and their f32 scale tensors; cuBLASLt
// multiplies each 128-long slice of the K sum by its scales and accumulates in f32 (fast
// accumulation off). Hopper takes only op(A) = Aᵀ, op(B) = B ("TN"). The scale pointers are set on
// the cached descriptor at every call, so calls of one shape may pass different scale tensors.
struct LtGemmCall {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;  // D's leading dimension is C's
  const void* a = nullptr;
  const void* b = nullptr;
  const void* c = nullptr;
  void* d = nullptr;
  cudaDataType_t ab_type = CUDA_R_16BF;  // A and B
  cudaDataType_t cd_type = CUDA_R_32F;   // C and D: CUDA_R_32F, or CUDA_R_16BF with beta = 0
  float alpha = 1.0f, beta = 0.0f;
  std::string_view op = "gemm";  // names the calling op in errors
  bool block_scaled = false;     // FP8 with the scale modes and tensors below
  cublasLtMatmulMatrixScale_t a_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  cublasLtMatmulMatrixScale_t b_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  const void* a_scale = nullptr;
  const void* b_scale = nullptr;
};

// What timing chose for one call shape (LtGemm::tune_reports; the CUDA op profile prints them).
struct LtGemmTuneReport {
  std::string shape;       // as cuBLASLt sees it, e.g. "384×256×512 NN beta≠0 C≠D f32 out"
  int candidates = 0;      // usable heuristic results timed
  int chosen = 0;          // the fastest's index; 0 = the heuristic's first choice
  float heuristic_ms = 0;  // candidate 0's fastest timed call (device ms between the events)
  float chosen_ms = 0;     // the chosen candidate's fastest timed call
};

class LtGemm {
 public:
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation on Hopper
  static constexpr size_t kMaxPlans = 256;
  static constexpr int kCandidates = 8;  // the heuristic's top results timed per shape
  static constexpr int kTrials = 2;      // timed calls per candidate: the min drops a first call's one-time costs

  // Creates the cuBLASLt handle and the workspace (needs a current CUDA device). autotune: choose
  // each shape's algorithm by timing (the file comment); by default from the environment.
  explicit LtGemm(bool autotune = autotune_from_env());
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // DIFFMOE_GEMM_AUTOTUNE: unset or "1" on, "0" off; any other value throws.
  static bool autotune_from_env();

  // Enqueues the GEMM on stream s; m, n, k > 0. Throws, naming the op and the shapes, when a
  // cuBLASLt or CUDA call fails or the heuristic offers no algorithm.
  void run(const LtGemmCall& call, cudaStream_t s);

  size_t plans() const { return plans_.size(); }                    // cached now
  int64_t heuristic_queries() const { return heuristic_queries_; }  // since construction
  bool autotune() const { return autotune_; }
  // The cached plans whose choice timing has made, in cache order (empty with autotune off).
  std::vector<LtGemmTuneReport> tune_reports() const;
  bool tuning() const;  // a cached plan still times its candidates

 private:
  // What a plan's choice depends on (the file comment), as one comparable key.
  using Key = std::array<int64_t, 18>;

  // An owned cudaEvent_t. Destroying one still pending on the GPU is valid (CUDA releases its
  // resources once it completes), so a trial's events may die with their plan at any time.
  struct EventDestroy {
    void operator()(cudaEvent_t e) const { (void)cudaEventDestroy(e); }
  };
  using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;

  // One timed call of a candidate: events recorded around its cublasLtMatmul on the call's stream.
  struct Trial {
    size_t candidate = 0;
    Event start, stop;
  };

  enum class Tuning {
    kOff,     // autotune off: the heuristic's first choice, always
    kTrying,  // trials still to enqueue or to measure; calls that are no trial run candidate 0
    kDone,    // chosen by timing
  };

  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's usable results, in its order
    size_t chosen = 0;                             // the candidate untimed calls run
    Tuning tuning = Tuning::kOff;
    // Tuning state (autotune on):
    std::string shape;           // the report's shape text
    size_t issued = 0;           // trials enqueued; trial t times candidate t % candidates.size()
    std::vector<float> best_ms;  // per candidate: its fastest measured trial (+inf: none yet)
    std::vector<Trial> pending;  // enqueued, not yet measured
    size_t trials() const { return candidates.size() * kTrials; }  // to enqueue in all
    Plan() = default;
    ~Plan();
    Plan(const Plan&) = delete;
    Plan& operator=(const Plan&) = delete;
  };

  static Key key_of(const LtGemmCall& call);
  Plan& plan_for(const LtGemmCall& call);                           // the cached plan, or a new one
  void make_plan(Plan& p, const LtGemmCall& call);                  // the descriptors and the heuristic's candidates
  static void collect_trials(Plan& p);                              // measures finished trials; chooses once all are in
  void run_trial(Plan& p, const LtGemmCall& call, cudaStream_t s);  // the next candidate, timed
  void matmul(const Plan& p, size_t candidate, const LtGemmCall& call, cudaStream_t s);
  static void set_scale_pointers(const Plan& p, const LtGemmCall& call);  // block-scaled calls only

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  bool autotune_ = true;
  std::map<Key, Plan> plans_;
  int64_t heuristic_queries_ = 0;
};

}  // namespace diffmoe
