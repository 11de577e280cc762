// The whole DiffMLA-MoE model (spec §1): embedding, n_layers × (attention block, FFN block), final
// norm, head, cross-entropy + MoE balance losses; forward and backward over one micro-batch.
//
// Memory: three arenas planned from the config and batch shape, each ONE allocation —
//   params (spec §8 names; the balancing biases too), grads (same names, trainable only),
//   acts (activations kept for the backward + backward scratch + losses + routing stats).
// The grads arena is planned in two parts: first the gradients that the backward only adds into
// (norms, λ vectors, an untied embedding table), which zero_grads() fills, then those that the
// first backward after zero_grads() overwrites with a GEMM at beta = 0 (LayerContext::dw_beta),
// which it skips, the expert stacks last of them (Model::grad_sq_parts). Gradients are looked up
// by name: nothing relies on their order matching params.
// On a backend in the bf16 GEMM mode (any backend, f32 model; spec §7) a fourth arena holds bf16 copies of the GEMM
// weight matrices, refreshed from the f32 masters at every forward (one rounding per weight per
// micro-batch instead of one per GEMM that reads it); allocated at the first such forward.
// Nothing else allocates after set_batch_shape(); all work goes through the Backend interface.
#pragma once
#include <memory>
#include <vector>

#include "model/attention_layer.h"
#include "model/ffn_layer.h"
#include "model/parameters.h"

namespace diffmoe {

struct LossValues {
  double lm_loss = 0;     // mean cross-entropy over the valid targets
  double aux_loss = 0;    // sequence aux loss summed over MoE layers (spec §5)
  int64_t valid = 0;      // number of targets ≠ −1
};

class Model {
 public:
  // dtype: the CPU backend computes in f32, or f64 for gradient checks.
  Model(const ModelConfig& cfg, Backend& backend, DType dtype);

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return *be_; }
  DType dtype() const { return dtype_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  Arena& params() { return params_; }
  // The gradients. Between zero_grads() and the next backward() the GEMM weights' gradients still
  // hold their old values in memory (that backward overwrites them): a call in that window first
  // zeroes them on ctx's stream, and the next backward then adds to whatever is written through
  // the returned arena. After a backward, or before any zero_grads(), it only returns the arena.
  // Anything may be written through it: the expert Σg² of grad_sq_parts is dropped.
  Arena& grads(Context ctx = {});
  // The global Σg² in two parts (spec §7's clipping norm): Σ rest² plus, where defined, experts_sq
  // [1] = the expert stacks' Σg² that the last backward's grouped weight-gradient GEMMs added up
  // while storing them (GroupedGemmWgradArgs::sum_sq), so that the expert gradients (most of the
  // bytes) are not read again. experts_sq is defined only while the gradients are the last
  // backward's: no zero_grads() and no grads() since. Else rest is the whole arena.
  struct GradSqParts {
    Tensor rest;
    Tensor experts_sq;
  };
  GradSqParts grad_sq_parts(Context ctx = {});
  const Arena& acts() const { return acts_; }
  const Arena& weight_copies() const { return weights_bf16_; }  // bf16 GEMM mode only, else empty
  // Says that every weight copy now equals bf16(its master): the optimizer wrote both in one pass,
  // so the next forward skips its refresh. Only the next one: it clears the mark, and every later
  // forward refreshes again. Nothing may write the masters between this call and that forward.
  void weight_copies_written() { copies_fresh_ = !weights_bf16_.entries().empty(); }

  // Spec §6 initialisation from a seed (same values on every backend).
  void init_weights(uint64_t seed);
  // Plans and allocates the activation arena for micro-batches of batch × seq tokens.
  void set_batch_shape(int64_t batch, int64_t seq);
  int64_t batch() const { return batch_; }
  int64_t seq() const { return seq_; }

  // tokens, targets: [batch, seq] i32 on the backend's device (targets may be empty: logits only).
  // Resets the loss accumulators, then adds this micro-batch's losses and expert counts.
  void forward(Context ctx, const Tensor& tokens, const Tensor& targets);
  // Backward of (lm_loss + aux_loss)·grad_scale for the last forward (whose tokens and targets
  // tensors must still hold their data); weight gradients ACCUMULATE into grads().
  void backward(Context ctx, double grad_scale = 1.0);
  // Every gradient reads as zero afterwards (to the next backward and to grads()), in one fill:
  // only the gradients that the backward adds into are written here (Model::grads_).
  void zero_grads(Context ctx);
  // Bytes that zero_grads() fills: the added-into gradients and their padding (bench, tests).
  size_t zero_grads_bytes() const;
  void zero_expert_counts(Context ctx);

  LossValues losses() const;             // downloads the loss tensors (a host sync)
  Tensor logits() const;                 // [batch·seq, vocab] after forward
  Tensor expert_counts(int64_t layer) const;  // i32 [n_routed_experts], MoE layers only
  Tensor lambda(int64_t layer) const;         // [1], differential layers only

 private:
  LayerContext layer_context(Context ctx);
  void refresh_weight_copies(Context ctx);  // weights_bf16_ = bf16(params) where the mode wants it
  void check_precision_unchanged(const char* where) const;
  void zero_stale_gemm_grads(Context ctx);  // the fill grads() promises after zero_grads()
  Tensor residual(int64_t i) const;  // residual stream before sub-block i (0 = embedding output)

  ModelConfig cfg_;
  Backend* be_;
  DType dtype_;
  std::vector<ParamSpec> specs_;
  std::vector<AttentionLayer> attn_;
  std::vector<FfnLayer> ffn_;
  Arena params_, grads_, acts_;
  Arena weights_bf16_;  // GEMM weight matrices in bf16 (bf16 GEMM mode only; else never allocated)
  int64_t batch_ = 0, seq_ = 0;
  bool bf16_operands_ = false;  // the backend's bf16 GEMM mode when the activations were planned
  bool copies_fresh_ = false;   // weight_copies_written() since the last forward
  // grads_ entries [0, n_added_grads_) are the gradients the backward adds into (zero_grads fills
  // them); the rest are overwritten by the first backward after zero_grads.
  size_t n_added_grads_ = 0;
  // zero_grads() since the last backward and grads(): the GEMM weights' gradients hold stale
  // values, which the next backward overwrites (LayerContext::dw_beta = 0).
  bool gemm_grads_stale_ = false;
  // grads_ entries [first_expert_grad_, end) are the expert stacks' (grad_sq_parts).
  size_t first_expert_grad_ = 0;
  // acts "grad_sq.experts" holds the Σg² of the expert gradients as they are now (grad_sq_parts).
  bool expert_sq_valid_ = false;
  Tensor last_tokens_, last_targets_;  // [N] views of the last forward's inputs
};

}  // namespace diffmoe
