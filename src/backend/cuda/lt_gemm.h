// The dense GEMMs of the bf16 GEMM mode on cuBLASLt (cublasLtMatmul), owned by the CUDA backend.
// cuBLASLt rather than cublasGemmEx because it takes an addend C apart from the output D (a
// residual added by the GEMM, GemmArgs::addend) and a bf16 D rounded once by its epilogue.
//
// A call is given column-major, as cuBLAS sees it (gemm_ops.cu turns the row-major op into it):
//   D[m, n] = alpha · op(A) · op(B) + beta · C,   op(A) [m, k], op(B) [k, n], f32 accumulation,
// A and B bf16, C and D one type (f32, or bf16 with beta = 0) and one leading dimension.
//
// Each distinct call shape gets a plan: the matmul descriptor, the four matrix layouts and the
// algorithm cuBLASLt's heuristic picked for them. Plans are cached by everything the heuristic's
// choice depends on (sizes, transposes, leading dimensions, types, beta = 0, C = D, and each
// pointer's alignment: the heuristic only offers algorithms that the given alignments allow), so a
// training step's GEMMs query the heuristic once each, in the first step. The cache is bounded
// (kMaxPlans): a caller whose shapes never repeat (generation's prompt lengths) cannot grow it
// without end; when full it is emptied and refilled.
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
#include <string_view>

#include "backend/cuda/cuda_allocator.h"

namespace diffmoe {

// One column-major GEMM for LtGemm::run (see the file comment). C may equal D (in place); with
// beta = 0 C is not read.
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
};

class LtGemm {
 public:
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation on Hopper
  static constexpr size_t kMaxPlans = 256;

  LtGemm();  // creates the cuBLASLt handle and the workspace (needs a current CUDA device)
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Enqueues the GEMM on stream s; m, n, k > 0. Throws, naming the op and the shapes, when a
  // cuBLASLt call fails or the heuristic offers no algorithm.
  void run(const LtGemmCall& call, cudaStream_t s);

  size_t plans() const { return plans_.size(); }                      // cached now
  int64_t heuristic_queries() const { return heuristic_queries_; }    // since construction

 private:
  // What a plan's choice depends on (the file comment), as one comparable key.
  using Key = std::array<int64_t, 16>;
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    Plan() = default;
    ~Plan();
    Plan(const Plan&) = delete;
    Plan& operator=(const Plan&) = delete;
  };
  static Key key_of(const LtGemmCall& call);
  void make_plan(Plan& p, const LtGemmCall& call);  // the descriptors and the heuristic's algorithm

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  std::map<Key, Plan> plans_;
  int64_t heuristic_queries_ = 0;
};

}  // namespace diffmoe
