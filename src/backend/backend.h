// The Backend interface: every kernel-level op the model needs, forward and backward.
// One implementation per folder (cpu/, cuda/), chosen at run time by name; a backend that was not
// built fails loudly (STYLE.md habit 4). Shapes and accumulation rules: op_args.h.
#pragma once
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
// kBF16: A and B are rounded to bf16 (8-bit mantissa) and multiplied on tensor cores with f32
// accumulation, alpha/beta and C in f32 (spec §7 first step: f32 tensors, bf16 GEMM inputs).
enum class GemmPrecision { kF32, kBF16 };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual Device device() const = 0;
  virtual Allocator& allocator() = 0;

  // Host <-> backend memory (blocking; not for the hot path).
  virtual void upload(const Tensor& dst, const void* src) = 0;   // dst.nbytes() bytes
  virtual void download(void* dst, const Tensor& src) = 0;       // src.nbytes() bytes
  virtual void synchronize(Context ctx) = 0;

  // GEMM arithmetic of this backend (GemmPrecision). The default ignores the request: the CPU
  // backend always computes in its tensors' dtype (f32 or f64, spec §7); CUDA implements kBF16.
  // gemm_precision() says what the backend actually uses.
  virtual void set_gemm_precision(GemmPrecision p) { (void)p; }
  virtual GemmPrecision gemm_precision() const { return GemmPrecision::kF32; }
  // Whether the backend is still choosing algorithms by timing real calls (CUDA: the first calls of
  // each cuBLASLt GEMM shape, lt_gemm.h). A benchmark warms up until this is false.
  virtual bool tuning() const { return false; }
  // Whether attention_fwd / attention_bwd of this shape take bf16 q, k, v (AttentionFwdArgs) with
  // the current settings: the CUDA backend in the bf16 GEMM mode where its tensor-core kernels cover
  // the shape and the device; never the CPU. The model plans its saved q, k, v in bf16 where this
  // holds (and f32 elsewhere, e.g. head sizes only the f32 kernels cover).
  virtual bool attention_takes_bf16(const AttentionShape& s) const {
    (void)s;
    return false;
  }

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
  virtual void rope(Context ctx, const RopeArgs& a) = 0;
  virtual void mla_kv_split_fwd(Context ctx, const MlaKvSplitFwdArgs& a) = 0;
  virtual void mla_kv_split_bwd(Context ctx, const MlaKvSplitBwdArgs& a) = 0;
  virtual void diff_lambda_fwd(Context ctx, const DiffLambdaFwdArgs& a) = 0;
  virtual void diff_lambda_bwd(Context ctx, const DiffLambdaBwdArgs& a) = 0;
  virtual void attention_fwd(Context ctx, const AttentionFwdArgs& a) = 0;
  virtual void attention_bwd(Context ctx, const AttentionBwdArgs& a) = 0;
  virtual void latent_attention(Context ctx, const LatentAttentionArgs& a) = 0;
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
  virtual void cross_entropy_fwd(Context ctx, const CrossEntropyFwdArgs& a) = 0;
  virtual void cross_entropy_bwd(Context ctx, const CrossEntropyBwdArgs& a) = 0;
  virtual void adamw(Context ctx, const AdamWArgs& a) = 0;
  virtual void adamw_multi(Context ctx, const AdamWMultiArgs& a) = 0;
};

// "cpu" or "cuda". Throws "[backend] 'cuda' was not built into this binary" when absent.
std::unique_ptr<Backend> make_backend(std::string_view name);
bool backend_available(std::string_view name);

}  // namespace diffmoe
