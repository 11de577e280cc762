// The Backend interface: every kernel-level op the model needs, forward and backward.
// One implementation per folder (cpu/, cuda/), chosen at run time by name; a backend that was not
// built fails loudly (docs/style.md habit 4). Shapes and accumulation rules: op_args.h.
#pragma once
#include <cstdint>
#include <memory>
#include <string_view>

#include "backend/op_args.h"
#include "core/arena.h"

namespace diffmoe {

// Where an op runs: a stream (cudaStream_t on CUDA; unused on the CPU). Ops are asynchronous with
// respect to the host on CUDA; synchronize() waits.
struct Context {
  void* stream = nullptr;
};

// How gemm, grouped_gemm and grouped_gemm_wgrad compute; tensors keep their dtype either way.
// kBF16: A and B are rounded to bf16 (8-bit mantissa, nearest even) and multiplied with f32
// accumulation, alpha/beta in f32 (docs/model.md §7); the GEMMs
// then also take bf16 operands and write a bf16 C (op_args.h GemmArgs). Every backend implements
// both: the CUDA one on tensor cores, the CPU one with cblas_sgemm on bf16-rounded copies. It
// applies to f32 calls; f64 calls (finite-difference checks) compute in f64.
enum class GemmPrecision { kF32, kBF16 };

// A recorded sequence of ops (a CUDA graph), made by Backend::end_capture and run again by Backend::replay. It keeps
// the ops' arguments as they were recorded — device addresses, sizes, scalars — so only the contents of memory may
// change between replays (docs/serving.md "CUDA graphs"). Destroying it frees the graph.
class CapturedOps {
 public:
  virtual ~CapturedOps() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual Device device() const = 0;
  virtual Allocator& allocator() = 0;

  // Host <-> backend memory (blocking; not for the hot path).
  virtual void upload(const Tensor& dst, const void* src) = 0;  // dst.nbytes() bytes
  virtual void download(void* dst, const Tensor& src) = 0;      // src.nbytes() bytes
  virtual void synchronize(Context ctx) = 0;

  // GEMM arithmetic of this backend (GemmPrecision, default kF32). The model plans its bf16
  // activations from it (docs/model.md §7).
  virtual void set_gemm_precision(GemmPrecision p) = 0;
  virtual GemmPrecision gemm_precision() const = 0;
  // Whether the backend is still choosing algorithms by timing real calls (CUDA: the first calls of
  // each cuBLASLt GEMM shape, lt_gemm.h). A benchmark warms up until this is false.
  virtual bool tuning() const { return false; }

  // Graph capture (docs/serving.md "CUDA graphs"): record the ops of a fixed-shape pass once, then run them again with
  // one launch. supports_graphs: whether the ops, as the backend is configured now, can be recorded — none may read
  // device memory to the host, wait for the device or allocate (CUDA: the bf16 GEMM mode, whose grouped GEMMs read
  // their offsets on the device, and not while profiling). A backend without graphs says false; its callers run their
  // ops one by one, and the other four calls throw.
  virtual bool supports_graphs() const { return false; }
  // Starts recording: ops enqueued on the returned context are recorded, not run, until end_capture. The recording is
  // replayed on ctx's stream later; nothing is ordered against ctx's work now.
  virtual Context begin_capture(Context ctx);
  // Ends the recording begin_capture started on `capture` and makes it runnable; throws, naming the call, when an op
  // could not be recorded.
  virtual std::unique_ptr<CapturedOps> end_capture(Context capture);
  // Ends a recording that failed part-way (an op threw) and discards it; never throws.
  virtual void abort_capture(Context capture) noexcept { (void)capture; }
  // Runs the recorded ops on ctx's stream, after the work enqueued there before.
  virtual void replay(Context ctx, const CapturedOps& ops);
  // Counts reallocations of the backend's own workspaces (scratch that ops use internally): ops recorded under another
  // count may point at freed memory and must not be replayed.
  virtual uint64_t graph_epoch() const { return 0; }

  virtual void fill(Context ctx, const FillArgs& a) = 0;
  virtual void copy(Context ctx, const CopyArgs& a) = 0;
  virtual void axpy(Context ctx, const AxpyArgs& a) = 0;
  virtual void scale(Context ctx, const ScaleArgs& a) = 0;
  virtual void sum_squares(Context ctx, const SumSquaresArgs& a) = 0;
  virtual void count_nonfinite(Context ctx, const CountNonfiniteArgs& a) = 0;

  virtual void embedding_fwd(Context ctx, const EmbeddingFwdArgs& a) = 0;
  virtual void embedding_bwd(Context ctx, const EmbeddingBwdArgs& a) = 0;
  virtual void rmsnorm_fwd(Context ctx, const RmsNormFwdArgs& a) = 0;
  virtual void rmsnorm_bwd(Context ctx, const RmsNormBwdArgs& a) = 0;
  virtual void gemm(Context ctx, const GemmArgs& a) = 0;
  virtual void grouped_gemm(Context ctx, const GroupedGemmArgs& a) = 0;
  virtual void grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) = 0;
  virtual void act_quant(Context ctx, const ActQuantArgs& a) = 0;
  virtual void weight_quant(Context ctx, const WeightQuantArgs& a) = 0;
  virtual void weight_dequant(Context ctx, const WeightDequantArgs& a) = 0;
  virtual void fp8_gemm(Context ctx, const Fp8GemmArgs& a) = 0;
  virtual void fp8_grouped_gemm(Context ctx, const Fp8GroupedGemmArgs& a) = 0;
  virtual void fp8_grouped_gemm_wgrad(Context ctx, const Fp8GroupedGemmWgradArgs& a) = 0;
  virtual void rope(Context ctx, const RopeArgs& a) = 0;
  virtual void mla_kv_split_fwd(Context ctx, const MlaKvSplitFwdArgs& a) = 0;
  virtual void mla_kv_split_bwd(Context ctx, const MlaKvSplitBwdArgs& a) = 0;
  virtual void diff_lambda_fwd(Context ctx, const DiffLambdaFwdArgs& a) = 0;
  virtual void diff_lambda_bwd(Context ctx, const DiffLambdaBwdArgs& a) = 0;
  virtual void attention_fwd(Context ctx, const AttentionFwdArgs& a) = 0;
  virtual void attention_bwd(Context ctx, const AttentionBwdArgs& a) = 0;
  virtual void latent_attention(Context ctx, const LatentAttentionArgs& a) = 0;
  virtual void paged_cache_write(Context ctx, const PagedCacheWriteArgs& a) = 0;
  virtual void paged_latent_attention(Context ctx, const PagedLatentAttentionArgs& a) = 0;
  virtual void swiglu_fwd(Context ctx, const SwigluFwdArgs& a) = 0;
  virtual void swiglu_bwd(Context ctx, const SwigluBwdArgs& a) = 0;
  virtual void router_fwd(Context ctx, const RouterFwdArgs& a) = 0;
  virtual void router_bwd(Context ctx, const RouterBwdArgs& a) = 0;
  virtual void aux_loss_fwd(Context ctx, const AuxLossFwdArgs& a) = 0;
  virtual void aux_loss_bwd(Context ctx, const AuxLossBwdArgs& a) = 0;
  virtual void moe_permute(Context ctx, const MoePermuteArgs& a) = 0;
  virtual void moe_gather(Context ctx, const MoeGatherArgs& a) = 0;
  virtual void moe_gather_bwd(Context ctx, const MoeGatherBwdArgs& a) = 0;
  virtual void moe_combine_fwd(Context ctx, const MoeCombineFwdArgs& a) = 0;
  virtual void moe_combine_bwd(Context ctx, const MoeCombineBwdArgs& a) = 0;
  virtual void moe_bias_update(Context ctx, const MoeBiasUpdateArgs& a) = 0;
  virtual void ep_dispatch_plan(Context ctx, const EpDispatchPlanArgs& a) = 0;
  virtual void cross_entropy_fwd(Context ctx, const CrossEntropyFwdArgs& a) = 0;
  virtual void cross_entropy_bwd(Context ctx, const CrossEntropyBwdArgs& a) = 0;
  virtual void adamw(Context ctx, const AdamWArgs& a) = 0;
  virtual void adamw_multi(Context ctx, const AdamWMultiArgs& a) = 0;
};

inline Context Backend::begin_capture(Context) {
  DIFFMOE_FAIL("[{}] this backend cannot record ops (no graphs)", name());
}
inline std::unique_ptr<CapturedOps> Backend::end_capture(Context) {
  DIFFMOE_FAIL("[{}] this backend cannot record ops (no graphs)", name());
}
inline void Backend::replay(Context, const CapturedOps&) {
  DIFFMOE_FAIL("[{}] this backend cannot replay ops (no graphs)", name());
}

// Backends are created by make_backend (backend/backend_registry.h, library diffmoe_backends): this
// interface knows no concrete backend.

}  // namespace diffmoe
