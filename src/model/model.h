// The whole DiffMLA-MoE model (docs/model.md §1): embedding, n_layers × (attention block, FFN block), final
// norm, head, cross-entropy + MoE balance losses; forward and backward over one micro-batch.
//
// Memory, all planned from the config, the precision plan, the parallel layout and the batch shape:
//   params  the compute weights (docs/model.md §8 names; bf16 for GEMM weights in the bf16 mode, else the
//           float type) and the balancing biases, one buffer per ParamLayout group;
//   grads   a GradBuffer (same layout, master dtype; with ZeRO-2 the data-parallel groups in bucket slots);
//   acts    one arena of activations kept for the backward, backward scratch, losses and routing
//           stats (set_batch_shape); with recompute (ModelOptions::recompute) the recomputed
//           activations of every layer share one set of views, and the backward of each layer
//           first recomputes them.
// The f32 masters of bf16 compute weights and the Adam moments belong to the optimizer (which, with
// data parallelism, holds only its shard of them). Nothing allocates after set_batch_shape(); all
// work goes through the Backend interface.
#pragma once
#include <memory>
#include <vector>

#include "model/attention_layer.h"
#include "model/expert_buffers.h"
#include "model/expert_exchange.h"
#include "model/ffn_layer.h"
#include "model/fp8_weights.h"
#include "model/grad_buffer.h"
#include "model/layout_buffers.h"
#include "model/param_layout.h"
#include "model/parameters.h"
#include "model/precision_plan.h"
#include "model/recompute.h"

namespace diffmoe {

struct LossValues {
  double lm_loss = 0;   // mean cross-entropy over the valid targets
  double aux_loss = 0;  // sequence aux loss summed over MoE layers (docs/model.md §5)
  int64_t valid = 0;    // number of targets ≠ −1
};

struct ModelOptions {
  Precision precision = Precision::kF32;  // docs/model.md §7; the backend's GEMM precision follows it
  ParallelLayoutOptions parallel = {};    // expert split and data-parallel degrees (docs/model.md §12)
  // The EP group's exchange (required when parallel.ep_size > 1; it must outlive the model).
  ExpertExchange* expert_exchange = nullptr;
  // Which activations the backward recomputes instead of the forward keeping them (train.recompute,
  // model/recompute.h): less activation memory for more backward work; the same gradients.
  Recompute recompute = Recompute::kNone;
};

// What a Model and its activations for one batch shape take, planned without allocating anything
// (Model::memory_plan; `diffmoe plan`): the same layout, views and activation plan that the
// constructor and set_batch_shape() allocate, so bytes() here equal the allocated bytes.
struct ModelMemoryPlan {
  std::unique_ptr<ParamLayout> layout;  // params and grads point into it
  PrecisionPlan plan;                   // with the table of every planned activation (entries())
  LayoutBuffers params;                 // compute weights and balancing biases (Model::params)
  GradBuffer::Footprint grads;          // Model::grads (full buffers, ZeRO-2 slots)
  Arena acts;                           // Model::acts
};

class Model {
 public:
  // dtype: the float type (the CPU backend computes in f32, or f64 for gradient checks).
  Model(const ModelConfig& cfg, Backend& backend, DType dtype, const ModelOptions& opt = {});

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return *be_; }
  DType dtype() const { return dtype_; }
  const PrecisionPlan& plan() const { return plan_; }
  Recompute recompute() const { return recompute_; }
  const ParamLayout& layout() const { return *layout_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  // Compute weights by name (expert stacks: this rank's experts) and the balancing biases. The
  // mutable access may write them (the optimizer's update, the data-parallel gather); in the fp8 mode
  // every FP8 GEMM quantises the weight it reads anew (fp8_weights.h), so nothing goes stale.
  LayoutBuffers& params() { return params_; }
  const LayoutBuffers& params() const { return params_; }
  // The gradients. Between zero_grads() and the next backward() the GEMM weights' gradients still
  // hold their old values in memory (that backward overwrites them): a call in that window first
  // zeroes them on ctx's stream, and the next backward then adds to whatever is written through
  // the returned buffer. Anything may be written through it: the expert Σg² of grad_sq_parts is dropped.
  GradBuffer& grads(Context ctx = {});
  // The global Σg² in parts (docs/model.md §7's clipping norm): Σ rest² over the `rest` tensors plus, where
  // defined, experts_sq [1] = the expert stacks' Σg² that the last backward's grouped weight-gradient
  // GEMMs added up while storing them (GroupedGemmWgradArgs::sum_sq), so that the expert gradients
  // (most of the bytes) are not read again. experts_sq is defined only while the gradients are the
  // last backward's (no zero_grads() and no grads() since) and the expert groups are not data
  // parallel; else `rest` covers every group.
  struct GradSqParts {
    std::vector<Tensor> rest;
    Tensor experts_sq;
  };
  GradSqParts grad_sq_parts(Context ctx = {});
  const Arena& acts() const { return acts_; }
  // Bytes of the expert-parallel buffers sized by the routing (0 without expert parallelism).
  size_t expert_buffer_bytes() const { return ep_buffers_ ? ep_buffers_->bytes() : 0; }

  // docs/model.md §6 initialisation from a seed (same values on every backend), into the compute weights.
  void init_weights(uint64_t seed);
  // Writes one parameter's compute weights (and a buffer's values) from host values of this rank's
  // part of it (ParamLayout::Entry::shape), rounded to its compute dtype.
  void set_param(const std::string& name, const std::vector<double>& values);
  // Plans and allocates the activation arena for micro-batches of batch × seq tokens.
  void set_batch_shape(int64_t batch, int64_t seq);
  // The memory of Model(cfg, ·, dtype, opt) after set_batch_shape(batch, seq), planned by the same
  // code without allocating (no backend needed).
  static ModelMemoryPlan memory_plan(const ModelConfig& cfg, DType dtype, const ModelOptions& opt, int64_t batch,
                                     int64_t seq);
  int64_t batch() const { return batch_; }
  int64_t seq() const { return seq_; }

  // tokens, targets: [batch, seq] i32 on the backend's device (targets may be empty: logits only).
  // Resets the loss accumulators, then adds this micro-batch's losses and expert counts.
  void forward(Context ctx, const Tensor& tokens, const Tensor& targets);
  // Backward of (lm_loss + aux_loss)·grad_scale for the last forward (whose tokens and targets
  // tensors must still hold their data); weight gradients ACCUMULATE into grads(). After each
  // backward stage the gradient buffer announces the buckets it completed (GradBuffer::stage_done).
  void backward(Context ctx, double grad_scale = 1.0);
  // Every gradient reads as zero afterwards (to the next backward and to grads()): only the
  // gradients that the backward adds into are filled (GradBuffer::zero).
  void zero_grads(Context ctx);
  size_t zero_grads_bytes() const { return grads_.zero_bytes(); }
  void zero_expert_counts(Context ctx);

  LossValues losses() const;                  // downloads the loss tensors (a host sync)
  Tensor logits() const;                      // [batch·seq, vocab] after forward
  Tensor expert_counts(int64_t layer) const;  // i32 [n_routed_experts], MoE layers only
  Tensor lambda(int64_t layer) const;         // [1], differential layers only

  // Sets the backend's GEMM precision (per process) to this model's plan: every pass over the model's
  // weights calls it first (the training step, the Generator), since another model may have changed it.
  void use_gemm_precision() const;

 private:
  // The compute-weight buffers of a layout (planned): GEMM weights in their group's compute dtype,
  // the balancing biases in the float type.
  static LayoutBuffers plan_params(const ParamLayout& layout, DType dtype);
  // Plans every activation of a batch × seq micro-batch into `acts` through the layers' plan()
  // (and records them in `plan`'s table), with the layers' recompute mode and, with expert
  // parallelism, the EP group (only its size is used).
  static void plan_activations(const ModelConfig& cfg, PrecisionPlan& plan, int64_t batch, int64_t seq, Arena& acts,
                               Recompute recompute, ExpertExchange* ep);
  LayerContext layer_context(Context ctx);
  Tensor residual(int64_t i) const;  // residual stream before sub-block i (0 = embedding output)

  ModelConfig cfg_;
  Backend* be_;
  DType dtype_;
  PrecisionPlan plan_;
  Recompute recompute_;
  std::vector<ParamSpec> specs_;
  std::unique_ptr<ParamLayout> layout_;  // params_ and grads_ point into it
  std::vector<AttentionLayer> attn_;
  std::vector<FfnLayer> ffn_;
  LayoutBuffers params_;
  GradBuffer grads_;
  // The fp8 mode: the weights whose GEMMs run in FP8 (their compute weights, by address).
  Fp8WeightTable fp8_;
  Arena acts_;
  ExpertExchange* ep_ = nullptr;
  std::unique_ptr<ExpertBuffers> ep_buffers_;  // expert parallelism: the routing-sized buffers
  int64_t batch_ = 0, seq_ = 0;
  // acts "grad_sq.experts" holds the Σg² of the expert gradients as they are now (grad_sq_parts).
  bool expert_sq_valid_ = false;
  Tensor last_tokens_, last_targets_;  // [N] views of the last forward's inputs
};

}  // namespace diffmoe
