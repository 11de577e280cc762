// A backend that records ops the way CUDA graphs do (Backend::begin_capture … replay; docs/serving.md "CUDA graphs"),
// on top of another backend: ops enqueued on the context begin_capture returns are not run but kept with their
// arguments by value (device addresses, sizes, scalars), and replay runs them again on those arguments — so a caller
// that changes a graph's inputs other than through memory contents, or reads results of a recording step before
// replaying it, gets stale values, as on a GPU. It lets the CPU tests run the engine's graph path (bucket padding,
// recording, replay, dropping on a workspace move) against its eager steps.
#pragma once
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.h"

namespace diffmoe::serve::test {

class RecordingBackend final : public Backend {
 public:
  explicit RecordingBackend(Backend& inner) : inner_(inner) {}

  // Test controls: whether recording is offered, what tuning() says, and a workspace move (graph_epoch).
  bool offer_graphs = true;
  bool tuning_now = false;
  bool fail_end_capture = false;  // end_capture throws, as a CUDA recording does when an op waited for the device
  void move_workspaces() { ++epoch_; }
  int64_t max_attention_seq = 0;  // attention_fwd refuses T above this, as a kernel with a shared-memory bound (0: any)
  int64_t ops_run = 0;            // ops run eagerly (not recorded)
  int64_t ops_recorded = 0;       // ops put into recordings

  std::string_view name() const override { return "recording"; }
  Device device() const override { return inner_.device(); }
  Allocator& allocator() override { return inner_.allocator(); }
  void upload(const Tensor& dst, const void* src) override { inner_.upload(dst, src); }
  void download(void* dst, const Tensor& src) override { inner_.download(dst, src); }
  void synchronize(Context ctx) override { inner_.synchronize(ctx); }
  void set_gemm_precision(GemmPrecision p) override { inner_.set_gemm_precision(p); }
  GemmPrecision gemm_precision() const override { return inner_.gemm_precision(); }
  bool tuning() const override { return tuning_now; }

  bool supports_graphs() const override { return offer_graphs; }
  Context begin_capture(Context) override {
    DIFFMOE_CHECK(recording_ == nullptr, "[recording] begin_capture while recording");
    recording_ = std::make_unique<Recorded>();
    return Context{.stream = &capture_marker_};
  }
  std::unique_ptr<CapturedOps> end_capture(Context capture) override {
    DIFFMOE_CHECK(recording_ != nullptr && capture.stream == &capture_marker_, "[recording] end_capture: none open");
    DIFFMOE_CHECK(!fail_end_capture, "[recording] recording failed on purpose (fail_end_capture)");
    return std::move(recording_);
  }
  void abort_capture(Context) noexcept override { recording_.reset(); }
  void replay(Context ctx, const CapturedOps& ops) override {
    for (const auto& op : dynamic_cast<const Recorded&>(ops).ops) op(ctx);
  }
  uint64_t graph_epoch() const override { return epoch_; }

#define DIFFMOE_RECORDED_OP(op, Args)                    \
  void op(Context ctx, const Args& a) override {         \
    run(ctx, [this, a](Context c) { inner_.op(c, a); }); \
  }
  DIFFMOE_RECORDED_OP(fill, FillArgs)
  DIFFMOE_RECORDED_OP(copy, CopyArgs)
  DIFFMOE_RECORDED_OP(axpy, AxpyArgs)
  DIFFMOE_RECORDED_OP(scale, ScaleArgs)
  DIFFMOE_RECORDED_OP(sum_squares, SumSquaresArgs)
  DIFFMOE_RECORDED_OP(count_nonfinite, CountNonfiniteArgs)
  DIFFMOE_RECORDED_OP(embedding_fwd, EmbeddingFwdArgs)
  DIFFMOE_RECORDED_OP(embedding_bwd, EmbeddingBwdArgs)
  DIFFMOE_RECORDED_OP(rmsnorm_fwd, RmsNormFwdArgs)
  DIFFMOE_RECORDED_OP(rmsnorm_bwd, RmsNormBwdArgs)
  DIFFMOE_RECORDED_OP(gemm, GemmArgs)
  DIFFMOE_RECORDED_OP(grouped_gemm, GroupedGemmArgs)
  DIFFMOE_RECORDED_OP(grouped_gemm_wgrad, GroupedGemmWgradArgs)
  DIFFMOE_RECORDED_OP(act_quant, ActQuantArgs)
  DIFFMOE_RECORDED_OP(weight_quant, WeightQuantArgs)
  DIFFMOE_RECORDED_OP(weight_dequant, WeightDequantArgs)
  DIFFMOE_RECORDED_OP(fp8_gemm, Fp8GemmArgs)
  DIFFMOE_RECORDED_OP(fp8_grouped_gemm, Fp8GroupedGemmArgs)
  DIFFMOE_RECORDED_OP(fp8_grouped_gemm_wgrad, Fp8GroupedGemmWgradArgs)
  DIFFMOE_RECORDED_OP(rope, RopeArgs)
  DIFFMOE_RECORDED_OP(mla_kv_split_fwd, MlaKvSplitFwdArgs)
  DIFFMOE_RECORDED_OP(mla_kv_split_bwd, MlaKvSplitBwdArgs)
  DIFFMOE_RECORDED_OP(diff_lambda_fwd, DiffLambdaFwdArgs)
  DIFFMOE_RECORDED_OP(diff_lambda_bwd, DiffLambdaBwdArgs)
  void attention_fwd(Context ctx, const AttentionFwdArgs& a) override {
    DIFFMOE_CHECK(max_attention_seq == 0 || a.q.dim(1) <= max_attention_seq,
                  "[attention_fwd] this backend takes T <= {}, got {}", max_attention_seq, a.q.dim(1));
    run(ctx, [this, a](Context c) { inner_.attention_fwd(c, a); });
  }
  DIFFMOE_RECORDED_OP(attention_bwd, AttentionBwdArgs)
  DIFFMOE_RECORDED_OP(latent_attention, LatentAttentionArgs)
  DIFFMOE_RECORDED_OP(paged_cache_write, PagedCacheWriteArgs)
  DIFFMOE_RECORDED_OP(paged_latent_attention, PagedLatentAttentionArgs)
  DIFFMOE_RECORDED_OP(swiglu_fwd, SwigluFwdArgs)
  DIFFMOE_RECORDED_OP(swiglu_bwd, SwigluBwdArgs)
  DIFFMOE_RECORDED_OP(router_fwd, RouterFwdArgs)
  DIFFMOE_RECORDED_OP(router_bwd, RouterBwdArgs)
  DIFFMOE_RECORDED_OP(aux_loss_fwd, AuxLossFwdArgs)
  DIFFMOE_RECORDED_OP(aux_loss_bwd, AuxLossBwdArgs)
  DIFFMOE_RECORDED_OP(moe_permute, MoePermuteArgs)
  DIFFMOE_RECORDED_OP(moe_gather, MoeGatherArgs)
  DIFFMOE_RECORDED_OP(moe_gather_bwd, MoeGatherBwdArgs)
  DIFFMOE_RECORDED_OP(moe_combine_fwd, MoeCombineFwdArgs)
  DIFFMOE_RECORDED_OP(moe_combine_bwd, MoeCombineBwdArgs)
  DIFFMOE_RECORDED_OP(moe_bias_update, MoeBiasUpdateArgs)
  DIFFMOE_RECORDED_OP(ep_dispatch_plan, EpDispatchPlanArgs)
  DIFFMOE_RECORDED_OP(cross_entropy_fwd, CrossEntropyFwdArgs)
  DIFFMOE_RECORDED_OP(cross_entropy_bwd, CrossEntropyBwdArgs)
  DIFFMOE_RECORDED_OP(adamw, AdamWArgs)
  DIFFMOE_RECORDED_OP(adamw_multi, AdamWMultiArgs)
#undef DIFFMOE_RECORDED_OP

 private:
  struct Recorded final : CapturedOps {
    std::vector<std::function<void(Context)>> ops;
  };
  void run(Context ctx, std::function<void(Context)> op) {
    if (ctx.stream == &capture_marker_) {
      DIFFMOE_CHECK(recording_ != nullptr, "[recording] an op on the recording context outside a recording");
      recording_->ops.push_back(std::move(op));
      ++ops_recorded;
      return;
    }
    DIFFMOE_CHECK(recording_ == nullptr, "[recording] an op on another context while recording");
    op(ctx);
    ++ops_run;
  }

  Backend& inner_;
  std::unique_ptr<Recorded> recording_;
  int capture_marker_ = 0;  // its address marks the recording context
  uint64_t epoch_ = 0;
};

}  // namespace diffmoe::serve::test
