// The CPU reference backend (docs/style.md habit 1): plain readable loops, f32 or f64 (chosen by the
// tensors' dtype, f64 for finite-difference checks), OpenMP over rows, OpenBLAS for GEMMs.
// Each op family lives in its own .cpp file beside this header.
// It implements every field of op_args.h: bf16 tensors (f32 calls only) are widened exactly into
// f32 buffers and bf16 outputs rounded once from the f32 result (bf16_staging.h), and
// GemmPrecision::kBF16 rounds the GEMM operands to bf16 and multiplies them in f32 (gemm_ops.cpp).
#pragma once
#include <memory>

#include "backend/backend.h"
#include "backend/cpu/bf16_staging.h"

namespace diffmoe {

class CpuBackend final : public Backend {
 public:
  std::string_view name() const override { return "cpu"; }
  Device device() const override { return Device::kCPU; }
  Allocator& allocator() override { return cpu_allocator(); }
  void upload(const Tensor& dst, const void* src) override;
  void download(void* dst, const Tensor& src) override;
  void synchronize(Context) override {}
  void set_gemm_precision(GemmPrecision p) override { gemm_precision_ = p; }
  GemmPrecision gemm_precision() const override { return gemm_precision_; }

  void fill(Context ctx, const FillArgs& a) override;  // basic_ops.cpp
  void copy(Context ctx, const CopyArgs& a) override;
  void axpy(Context ctx, const AxpyArgs& a) override;
  void scale(Context ctx, const ScaleArgs& a) override;
  void sum_squares(Context ctx, const SumSquaresArgs& a) override;
  void count_nonfinite(Context ctx, const CountNonfiniteArgs& a) override;
  void embedding_fwd(Context ctx, const EmbeddingFwdArgs& a) override;
  void embedding_bwd(Context ctx, const EmbeddingBwdArgs& a) override;
  void rmsnorm_fwd(Context ctx, const RmsNormFwdArgs& a) override;  // norm_ops.cpp
  void rmsnorm_bwd(Context ctx, const RmsNormBwdArgs& a) override;
  void gemm(Context ctx, const GemmArgs& a) override;  // gemm_ops.cpp
  void grouped_gemm(Context ctx, const GroupedGemmArgs& a) override;
  void grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) override;
  void act_quant(Context ctx, const ActQuantArgs& a) override;  // fp8_ops.cpp
  void weight_quant(Context ctx, const WeightQuantArgs& a) override;
  void weight_dequant(Context ctx, const WeightDequantArgs& a) override;
  void fp8_gemm(Context ctx, const Fp8GemmArgs& a) override;
  void fp8_grouped_gemm(Context ctx, const Fp8GroupedGemmArgs& a) override;
  void fp8_grouped_gemm_wgrad(Context ctx, const Fp8GroupedGemmWgradArgs& a) override;
  void rope(Context ctx, const RopeArgs& a) override;                       // rope_ops.cpp
  void mla_kv_split_fwd(Context ctx, const MlaKvSplitFwdArgs& a) override;  // attention_ops.cpp
  void mla_kv_split_bwd(Context ctx, const MlaKvSplitBwdArgs& a) override;
  void diff_lambda_fwd(Context ctx, const DiffLambdaFwdArgs& a) override;
  void diff_lambda_bwd(Context ctx, const DiffLambdaBwdArgs& a) override;
  void attention_fwd(Context ctx, const AttentionFwdArgs& a) override;
  void attention_bwd(Context ctx, const AttentionBwdArgs& a) override;
  void latent_attention(Context ctx, const LatentAttentionArgs& a) override;   // latent_attention_ops.cpp
  void paged_cache_write(Context ctx, const PagedCacheWriteArgs& a) override;  // paged_attention_ops.cpp
  void paged_latent_attention(Context ctx, const PagedLatentAttentionArgs& a) override;
  void swiglu_fwd(Context ctx, const SwigluFwdArgs& a) override;  // swiglu_ops.cpp
  void swiglu_bwd(Context ctx, const SwigluBwdArgs& a) override;
  void router_fwd(Context ctx, const RouterFwdArgs& a) override;  // moe_ops.cpp
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
  void cross_entropy_fwd(Context ctx, const CrossEntropyFwdArgs& a) override;  // loss_ops.cpp
  void cross_entropy_bwd(Context ctx, const CrossEntropyBwdArgs& a) override;
  void adamw(Context ctx, const AdamWArgs& a) override;  // optim_ops.cpp
  void adamw_multi(Context ctx, const AdamWMultiArgs& a) override;

 private:
  GemmPrecision gemm_precision_ = GemmPrecision::kF32;
  CpuScratch scratch_;  // the f32 stand-ins of bf16 tensors and rounded GEMM operands (bf16_staging.h)
};

std::unique_ptr<Backend> make_cpu_backend();

// Calls fn.template operator()<T>() with T = float or double according to `dtype`; any other
// dtype is an error naming `op`. Every CPU op dispatches through this.
template <class Fn>
void dispatch_float(DType dtype, std::string_view op, Fn&& fn) {
  if (dtype == DType::kF32) {
    fn.template operator()<float>();
  } else if (dtype == DType::kF64) {
    fn.template operator()<double>();
  } else {
    DIFFMOE_FAIL("[{}] the CPU backend computes in f32 or f64, got {}", op, dtype_name(dtype));
  }
}

// Every tensor an op touches must live on the CPU; `name` is the field, for the message.
void check_cpu(const Tensor& t, std::string_view op, std::string_view name);

}  // namespace diffmoe
