// The CUDA backend: every Backend op on the GPU, in f32 (the reference mode) or in the bf16 GEMM
// mode (GemmPrecision::kBF16: bf16 tensor-core GEMMs and attention, docs/model.md §7), checked
// against the CPU reference by tests/ops/cuda_*.cpp and tools/cuda_model_check. Each op family
// lives in its own .cu file beside this header; the hot kernels (tc_attention.cuh,
// grouped_gemm_tma.cuh) in their own headers. docs/ops.md lists every op's files.
//
// Rules of this backend (beyond op_args.h):
// - dtype: float tensors are f32, or bf16 where op_args.h allows it in the bf16 GEMM mode (CPU:
//   f32 or f64); index tensors are i32; copy and fill also handle f64, bf16 and f8e4m3 storage as
//   on the CPU.
// - Streams: ops run on Context::stream (a cudaStream_t; nullptr = the legacy default stream) and
//   never sync the host, except grouped_gemm and grouped_gemm_wgrad in the f32 mode, which read the
//   group offsets to the host (one small copy + stream sync, gemm_ops.cu), and
//   adamw_multi when its list changes (the first step: a pageable upload of its table, which the
//   driver may stage after waiting for the stream; adamw_multi_table.h).
// - upload/download are blocking: they wait for the whole device first (ops may be on any stream).
// - Index contents are checked on the device (device_issue.h) and reported by synchronize() and
//   download().
// - The backend owns a cuBLAS handle (default math: no TF32, so f32 GEMMs are true f32) with its
//   own workspace, and one scratch workspace for ops that need temporaries (sorts, per-row
//   partial sums). The scratch grows on first use and is then reused: steady-state calls do not
//   allocate. Both are shared by every stream, so one backend drives one stream at a time.
// - GEMM precision (set_gemm_precision, default kF32): under kBF16 the GEMM ops read bf16 operand
//   tensors as they are and round f32 ones to bf16 into a backend-owned buffer of their own
//   (gemm_bf16_scratch); gemm runs on cuBLASLt (lt_gemm.h: its own handle, a 32 MiB workspace and
//   a cache of plans by call shape) with bf16 inputs, f32 accumulation, an f32 or bf16 output and
//   an optional separate addend, the grouped ops run the device-scheduled kernels of grouped_gemm.cuh, and attention
//   the tensor-core kernels of tc_attention.cuh where they cover the shape (they also read bf16 q, k, v in place). The
//   attention's f32 kernels take bf16 q, k, v (any precision) widened into the same buffer, and compute bf16 dq, dk, dv
//   there in f32 (attention_ops.cu). That buffer is sized by the largest call seen: it grows (cudaFree + cudaMalloc,
//   which waits for the device) only when a call needs more than any before, i.e. during the first training step, then
//   steady-state calls do not allocate. Its peak is 2 bytes per element of the largest A plus B of one op (for the
//   bench preset the LM head's weight-gradient operands).
// - Determinism: everything is bitwise run-to-run reproducible except, for shapes the flash
//   attention kernels do not cover (flash_attention.h) or under AttentionKernel::kSimple,
//   attention_bwd's dk/dv (atomicAdd over query rows): f32 atomics whose order varies in the last
//   bits; and the bf16 mode's dense gemm, whose cuBLASLt algorithm is chosen by timing (lt_gemm.h):
//   DIFFMOE_GEMM_AUTOTUNE=0 fixes it.
// - Graphs (Backend::supports_graphs; docs/serving.md "CUDA graphs"): ops are recorded on a backend-owned non-blocking
// stream
//   (the legacy default stream cannot be captured) in cudaStreamCaptureModeThreadLocal — a call from this thread
//   that would wait for the device or allocate (a grouped GEMM's host read of its offsets, a workspace growing) fails
//   the recording loudly instead of being left out of it, while other threads stay free to use CUDA — then
//   instantiated (cudaGraphInstantiate) and launched on the caller's stream (cudaGraphLaunch). Recording needs the
//   bf16 GEMM mode with the device-scheduled grouped kernels, and no profiling (its events would be recorded too).
//   graph_epoch() counts reallocations of the scratch workspaces (scratch, gemm_bf16_scratch), whose addresses a
//   graph keeps. The first call of an op family may initialise something with a blocking call (the sm_90a probe of
//   the grouped kernel, cuBLAS's lazy set-up): callers run a pass eagerly before recording it.
// - Few-rows grouped GEMMs (grouped_gemv.cuh): a grouped_gemm whose caller bounds every group's rows by
//   max_group_rows ≤ few_rows_max() runs there; DIFFMOE_GROUPED_FEW_ROWS=N (0 … 8, read once, at construction; default
//   8) moves the cut, 0 sends every call to the tiled kernels.
// - Profiling: DIFFMOE_CUDA_PROFILE=1 (read once, at construction) times every op with a pair of
//   cudaEvents on its stream (OpScope, opened first thing in each op method) and prints a table
//   per op at print_profile() or destruction (op_profiler.h), then the cuBLASLt algorithms chosen
//   by timing (lt_gemm.h); off, each op pays one branch.
//
// Translation units: the .cu files compile as C++17 (nvcc 13's front end rejects fmt 9's consteval
// format strings in C++20); host-only files (.cpp) compile as C++20 with the project's warnings.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/adamw_multi_table.h"
#include "backend/cuda/cuda_allocator.h"
#include "backend/cuda/cuda_factory.h"
#include "backend/cuda/device_issue.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/op_profiler.h"

namespace diffmoe {

class CudaBackend;

// Times one op when the backend profiles (DIFFMOE_CUDA_PROFILE=1): a pair of cudaEvents on the op's
// stream around the whole method; nested ops count in the outermost only. Off: one branch.
class OpScope {
 public:
  OpScope(CudaBackend& be, cudaStream_t s, const char* op);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  CudaBackend* be_;  // null when not profiling
};

// Times a part of an op (a kernel, an operand copy) under DIFFMOE_CUDA_PROFILE=2, as its own row
// "· name" of the profile (not added to the total: the op's row has its time too). Off: one branch.
class DetailScope {
 public:
  // name(): the row's name, a callable so that it is built only when details are profiled (a
  // std::string per GEMM call would be host work on every step otherwise).
  template <class Name>
  DetailScope(CudaBackend& be, cudaStream_t s, Name&& name);
  ~DetailScope();
  DetailScope(const DetailScope&) = delete;
  DetailScope& operator=(const DetailScope&) = delete;

 private:
  void begin(CudaBackend& be, cudaStream_t s, const std::string& name);
  CudaBackend* be_ = nullptr;  // null when not profiling details
  size_t stat_ = 0;
  cudaEvent_t start_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

class CudaBackend final : public Backend, public OpProfiler {
 public:
  CudaBackend();  // uses the current CUDA device; throws "[cuda] ..." when there is none
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string_view name() const override { return "cuda"; }
  Device device() const override { return Device::kCUDA; }
  Allocator& allocator() override { return cuda_allocator(); }
  void upload(const Tensor& dst, const void* src) override;
  void download(void* dst, const Tensor& src) override;
  void synchronize(Context ctx) override;
  bool tuning() const override;

  void fill(Context ctx, const FillArgs& a) override;  // basic_ops.cu
  void copy(Context ctx, const CopyArgs& a) override;
  void axpy(Context ctx, const AxpyArgs& a) override;
  void scale(Context ctx, const ScaleArgs& a) override;
  void sum_squares(Context ctx, const SumSquaresArgs& a) override;
  void count_nonfinite(Context ctx, const CountNonfiniteArgs& a) override;
  void embedding_fwd(Context ctx, const EmbeddingFwdArgs& a) override;
  void embedding_bwd(Context ctx, const EmbeddingBwdArgs& a) override;
  void rmsnorm_fwd(Context ctx, const RmsNormFwdArgs& a) override;  // norm_ops.cu
  void rmsnorm_bwd(Context ctx, const RmsNormBwdArgs& a) override;
  void gemm(Context ctx, const GemmArgs& a) override;  // gemm_ops.cu
  void grouped_gemm(Context ctx, const GroupedGemmArgs& a) override;
  void grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) override;
  void act_quant(Context ctx, const ActQuantArgs& a) override;  // fp8_quant_ops.cu
  void weight_quant(Context ctx, const WeightQuantArgs& a) override;
  void weight_dequant(Context ctx, const WeightDequantArgs& a) override;
  void fp8_gemm(Context ctx, const Fp8GemmArgs& a) override;                            // fp8_gemm_ops.cpp
  void fp8_grouped_gemm(Context ctx, const Fp8GroupedGemmArgs& a) override;             // fp8_grouped_gemm_ops.cu
  void fp8_grouped_gemm_wgrad(Context ctx, const Fp8GroupedGemmWgradArgs& a) override;  // fp8_grouped_gemm_ops.cu
  void rope(Context ctx, const RopeArgs& a) override;                                   // rope_ops.cu
  void mla_kv_split_fwd(Context ctx, const MlaKvSplitFwdArgs& a) override;              // attention_ops.cu
  void mla_kv_split_bwd(Context ctx, const MlaKvSplitBwdArgs& a) override;
  void diff_lambda_fwd(Context ctx, const DiffLambdaFwdArgs& a) override;
  void diff_lambda_bwd(Context ctx, const DiffLambdaBwdArgs& a) override;
  void attention_fwd(Context ctx, const AttentionFwdArgs& a) override;
  void attention_bwd(Context ctx, const AttentionBwdArgs& a) override;
  void latent_attention(Context ctx, const LatentAttentionArgs& a) override;   // latent_attention_ops.cu
  void paged_cache_write(Context ctx, const PagedCacheWriteArgs& a) override;  // paged_attention_ops.cu
  void paged_latent_attention(Context ctx, const PagedLatentAttentionArgs& a) override;
  void swiglu_fwd(Context ctx, const SwigluFwdArgs& a) override;  // swiglu_ops.cu
  void swiglu_bwd(Context ctx, const SwigluBwdArgs& a) override;
  void router_fwd(Context ctx, const RouterFwdArgs& a) override;  // moe_ops.cu
  void router_bwd(Context ctx, const RouterBwdArgs& a) override;
  void aux_loss_fwd(Context ctx, const AuxLossFwdArgs& a) override;
  void aux_loss_bwd(Context ctx, const AuxLossBwdArgs& a) override;
  void moe_permute(Context ctx, const MoePermuteArgs& a) override;
  void moe_gather(Context ctx, const MoeGatherArgs& a) override;
  void moe_gather_bwd(Context ctx, const MoeGatherBwdArgs& a) override;
  void moe_combine_fwd(Context ctx, const MoeCombineFwdArgs& a) override;
  void moe_combine_bwd(Context ctx, const MoeCombineBwdArgs& a) override;
  void moe_bias_update(Context ctx, const MoeBiasUpdateArgs& a) override;
  void ep_dispatch_plan(Context ctx, const EpDispatchPlanArgs& a) override;
  void cross_entropy_fwd(Context ctx, const CrossEntropyFwdArgs& a) override;  // loss_ops.cu
  void cross_entropy_bwd(Context ctx, const CrossEntropyBwdArgs& a) override;
  void adamw(Context ctx, const AdamWArgs& a) override;  // optim_ops.cu
  void adamw_multi(Context ctx, const AdamWMultiArgs& a) override;
  bool supports_graphs() const override;  // cuda_graph.cpp
  Context begin_capture(Context ctx) override;
  std::unique_ptr<CapturedOps> end_capture(Context capture) override;
  void abort_capture(Context capture) noexcept override;
  void replay(Context ctx, const CapturedOps& ops) override;
  uint64_t graph_epoch() const override { return graph_epoch_; }
  void set_gemm_precision(GemmPrecision p) override { gemm_precision_ = p; }
  GemmPrecision gemm_precision() const override { return gemm_precision_; }

  // ---- for the op files
  static cudaStream_t stream(Context ctx) { return static_cast<cudaStream_t>(ctx.stream); }
  cublasHandle_t cublas(cudaStream_t s);   // the handle, bound to stream s
  LtGemm& lt_gemm() { return *lt_gemm_; }  // the bf16 mode's dense GEMMs (cuBLASLt)
  const LtGemm& lt_gemm() const { return *lt_gemm_; }
  void* scratch(size_t bytes);            // the shared scratch workspace, >= bytes
  void* gemm_bf16_scratch(size_t bytes);  // the operand conversions' buffer, >= bytes (grows only)
  size_t gemm_bf16_scratch_bytes() const { return gemm_bf16_scratch_.bytes(); }
  DeviceIssue* issue() const { return static_cast<DeviceIssue*>(issue_.get()); }
  int multiprocessors() const { return sm_count_; }
  // Whether grouped_gemm reads its group offsets to the host now (the f32 mode's per-group path, or a device whose
  // shared memory the grouped kernels do not fit): such calls cannot be recorded into a graph (gemm_ops.cu).
  bool grouped_gemm_reads_offsets() const;
  int64_t adamw_table_uploads() const { return adamw_table_.uploads(); }  // adamw_multi's (tests)
  size_t max_shared_bytes() const { return max_smem_optin_; }             // per block, after opt-in
  // Copies an i32 device tensor to host memory owned by the backend (stream sync): grouped GEMMs.
  const int32_t* read_to_host(const Tensor& t, cudaStream_t s);

  // ---- op profile (op_profiler.h); OpScope records, every op method opens one
  bool profiling() const override { return profiling_; }
  int64_t few_rows_max() const { return few_rows_max_; }  // DIFFMOE_GROUPED_FEW_ROWS
  void print_profile() override;
  void reset_profile() override;
  void profile_begin(cudaStream_t s, const char* op);
  void profile_end();
  bool profiling_details() const { return profile_details_; }  // DIFFMOE_CUDA_PROFILE=2
  size_t profile_detail_stat(const std::string& name);         // the row of a DetailScope
  cudaEvent_t profile_event();                                 // a free event (or a new one)
  void profile_push(size_t stat, cudaEvent_t start, cudaEvent_t stop);

  // ---- attention kernel choice (attention_ops.cu): the fused flash-style kernels where they cover
  // the shape (flash_attention.h), else the simple ones; kSimple forces the simple ones (tests, timing).
  enum class AttentionKernel { kFlash, kSimple };
  void set_attention_kernel(AttentionKernel k) { attention_kernel_ = k; }
  AttentionKernel attention_kernel() const { return attention_kernel_; }

 private:
  void check_issue();  // throws if a kernel recorded a bad index (after a sync)

  int device_ = 0, sm_count_ = 0;
  size_t max_smem_optin_ = 0;
  cublasHandle_t cublas_ = nullptr;
  cudaStream_t cublas_stream_ = nullptr;  // the stream the handle is bound to
  bool cublas_stream_set_ = false;
  DeviceBuffer cublas_workspace_;
  std::unique_ptr<LtGemm> lt_gemm_;  // made in the constructor, once a device is known to exist
  DeviceBuffer scratch_;
  DeviceBuffer gemm_bf16_scratch_;
  GemmPrecision gemm_precision_ = GemmPrecision::kF32;
  DeviceBuffer issue_;
  std::vector<int32_t> host_staging_;
  AdamWMultiTable adamw_table_;  // adamw_multi's entry table, uploaded when the list changes
  AttentionKernel attention_kernel_ = AttentionKernel::kFlash;
  cudaStream_t capture_stream_ = nullptr;  // graphs are recorded here (cuda_graph.cpp); made on first use
  uint64_t graph_epoch_ = 0;               // scratch_ / gemm_bf16_scratch_ reallocations

  struct ProfileStat {
    const char* op;       // an op's name, or a DetailScope's (in profile_detail_names_)
    bool detail = false;  // a DetailScope row: not part of the total
    int64_t calls = 0;
    double ms = 0.0;
  };
  struct PendingOp {
    size_t stat;  // index into profile_stats_
    cudaEvent_t start, stop;
  };
  void profile_flush();             // waits for the pending events and adds their times to the stats
  void print_gemm_choices() const;  // print_profile's lines on the cuBLASLt algorithms chosen by timing
  bool profiling_ = false, profile_details_ = false;
  int64_t few_rows_max_ = 8;
  std::deque<std::string> profile_detail_names_;  // stable storage for the detail rows' names
  int profile_depth_ = 0;
  size_t profile_open_ = 0;  // stat of the op being recorded (outermost)
  cudaEvent_t profile_start_ = nullptr;
  cudaStream_t profile_stream_ = nullptr;
  bool profile_unprinted_ = false;
  std::vector<ProfileStat> profile_stats_;
  std::vector<PendingOp> profile_pending_;
  std::vector<cudaEvent_t> profile_free_events_;
};

template <class Name>
DetailScope::DetailScope(CudaBackend& be, cudaStream_t s, Name&& name) {
  if (be.profiling_details()) begin(be, s, std::string(name()));
}

}  // namespace diffmoe
