#include "model/model.h"

#include <algorithm>

#include <fmt/format.h>

#include <vector>

#include "model/rope_upload.h"

namespace diffmoe {

LayoutBuffers Model::plan_params(const ParamLayout& layout, DType dtype) {
  std::vector<DType> d;
  for (const ParamLayout::Group& g : layout.groups()) d.push_back(g.compute);
  return LayoutBuffers(layout, d, dtype);
}

Model::Model(const ModelConfig& cfg, Backend& backend, DType dtype, const ModelOptions& opt)
    : cfg_(cfg),
      be_(&backend),
      dtype_(dtype),
      plan_(opt.precision, dtype),
      recompute_(opt.recompute),
      specs_((cfg_.validate("model config"), parameter_specs(cfg_))),
      layout_(std::make_unique<ParamLayout>(cfg_, plan_, opt.parallel)),
      params_(plan_params(*layout_, dtype)),
      grads_(*layout_, plan_.master_dtype(), be_->allocator()),
      ep_(opt.expert_exchange) {
  params_.allocate(be_->allocator());
  fp8_ = fp8_weight_table(specs_, plan_, params_);
  // The FP8 recipe runs the routed experts as a per-expert loop over the local rows (layer_context.cpp),
  // which the expert-parallel layer (ffn_layer_ep.cpp) does not go through.
  DIFFMOE_CHECK(!(plan_.fp8() && opt.parallel.ep_size > 1),
                "[model] precision fp8 with expert parallelism ({} expert ranks) is not supported: use bf16 or ep 1",
                opt.parallel.ep_size);
  if (opt.parallel.ep_size > 1) {
    DIFFMOE_CHECK(ep_ != nullptr && ep_->size() == opt.parallel.ep_size && ep_->rank() == opt.parallel.ep_rank,
                  "[model] expert parallelism over {} ranks needs an expert exchange of that group "
                  "(ModelOptions::expert_exchange)",
                  opt.parallel.ep_size);
  } else {
    ep_ = nullptr;
  }
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attn_.emplace_back(l, recompute_);
    ffn_.emplace_back(l, recompute_);
  }
}

void Model::set_param(const std::string& name, const std::vector<double>& v) {
  const Tensor dst = params_.get(name);
  DIFFMOE_CHECK(static_cast<int64_t>(v.size()) == dst.numel(), "[model] set_param('{}'): {} values for {} elements",
                name, v.size(), dst.numel());
  const size_t n = v.size();
  switch (dst.dtype) {
    case DType::kF64: be_->upload(dst, v.data()); return;
    case DType::kF32: {
      std::vector<float> f(n);
      for (size_t i = 0; i < n; ++i) f[i] = static_cast<float>(v[i]);
      be_->upload(dst, f.data());
      return;
    }
    case DType::kBF16: {  // the f32 master's value rounded once more (docs/model.md §7: bf16 copies of f32 masters)
      std::vector<uint16_t> h(n);
      for (size_t i = 0; i < n; ++i) h[i] = f32_to_bf16(static_cast<float>(v[i]));
      be_->upload(dst, h.data());
      return;
    }
    default: DIFFMOE_FAIL("[model] set_param('{}'): unsupported compute dtype {}", name, dtype_name(dst.dtype));
  }
}

void Model::init_weights(uint64_t seed) {
  // Computed on the host in double from the counter-based RNG (each value a pure function of
  // (seed, name, global index), so filling in parallel and splitting experts over ranks change
  // nothing), then converted and uploaded once.
  auto init = [&](const ParamLayout::Entry& e) {
    const int64_t n = e.shape.numel();
    std::vector<double> v(static_cast<size_t>(n));
    init_values(e.spec, seed, e.global_offset, v);
    set_param(e.spec.name, v);
  };
  for (const ParamLayout::Entry& e : layout_->entries()) init(e);
  for (const ParamLayout::Entry& e : layout_->buffers()) init(e);
}

LayerContext Model::layer_context(Context ctx) {
  return LayerContext{.be = be_,
                      .ctx = ctx,
                      .cfg = &cfg_,
                      .dtype = dtype_,
                      .batch = batch_,
                      .seq = seq_,
                      .params = &params_,
                      .grads = &grads_,
                      .acts = &acts_,
                      .plan = &plan_,
                      .bf16_operands = plan_.bf16_gemm(),
                      .fp8 = plan_.fp8() ? &fp8_ : nullptr,
                      .ep = ep_,
                      .ep_buffers = ep_buffers_.get()};
}

void Model::use_gemm_precision() const {
  be_->set_gemm_precision(plan_.bf16_gemm() ? GemmPrecision::kBF16 : GemmPrecision::kF32);
}

namespace {
// The EP group's size without a group: what planning needs of an exchange (Model::memory_plan).
class PlannedExchange final : public ExpertExchange {
 public:
  explicit PlannedExchange(int size) : size_(size) {}
  int size() const override { return size_; }
  int rank() const override { return 0; }
  std::unique_ptr<Pending> all_to_all(Context, const Tensor&, const Tensor&, const RowBlocks&,
                                      const RowBlocks&) override {
    DIFFMOE_FAIL("[model] a planned expert exchange does not communicate");
  }

 private:
  int size_;
};
}  // namespace

void Model::plan_activations(const ModelConfig& cfg, PrecisionPlan& pl, int64_t batch, int64_t seq, Arena& acts,
                             Recompute recompute, ExpertExchange* ep) {
  DIFFMOE_CHECK(batch > 0 && seq > 0 && seq <= cfg.max_seq_len,
                "[model] batch shape {}x{}: need batch > 0 and 0 < seq <= max_seq_len = {}", batch, seq,
                cfg.max_seq_len);
  const int64_t N = batch * seq, D = cfg.dim;
  const int64_t half = cfg.qk_rope_head_dim / 2;
  using R = ActRole;
  pl.add(acts, "rope.cos", Shape{cfg.max_seq_len, half}, R::kFloat);
  pl.add(acts, "rope.sin", Shape{cfg.max_seq_len, half}, R::kFloat);
  for (int64_t i = 0; i <= 2 * cfg.n_layers; ++i)
    pl.add(acts, fmt::format("act.residual.{}", i), Shape{N, D}, R::kFloat);
  // What the layers' plan() read: the config, the batch shape and the precision plan.
  const LayerContext lc{.be = nullptr,
                        .ctx = {},
                        .cfg = &cfg,
                        .dtype = pl.float_type(),
                        .batch = batch,
                        .seq = seq,
                        .params = nullptr,
                        .grads = nullptr,
                        .acts = &acts,
                        .plan = &pl,
                        .bf16_operands = pl.bf16_gemm(),
                        .ep = ep};
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    AttentionLayer(l, recompute).plan(lc, pl, acts);
    FfnLayer(l, recompute).plan(lc, pl, acts);
  }
  pl.add(acts, "act.final.x_norm", Shape{N, D}, R::kGemmOperand);  // read by the head's GEMMs only
  pl.add(acts, "act.final.rstd", Shape{N}, R::kFloat);
  pl.add(acts, "grad_sq.experts", Shape{1}, R::kFloat);  // backward(): Σg² of the expert stacks' gradients
  // The head's GEMM output, read by the cross-entropy only (rounded once by the GEMM, as under
  // autocast; the loss widens it and computes in f32/f64), and its gradient, read by the head's GEMMs.
  pl.add(acts, "act.final.logits", Shape{N, cfg.vocab_size}, R::kGemmOutput);
  pl.add(acts, "scratch.dlogits", Shape{N, cfg.vocab_size}, R::kGemmOperand);
  pl.add(acts, "scratch.dx_norm", Shape{N, D}, R::kFloat);
  if (pl.bf16_gemm()) {  // LayerContext::gemm_operand: the widest f32 dy that two backward GEMMs read
    const ModelConfig& c = cfg;
    const int64_t widths[] = {D,
                              c.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                              c.n_heads * c.d_qk(),
                              c.q_lora_rank,
                              c.kv_lora_rank + c.qk_rope_head_dim,
                              c.n_routed_experts};
    pl.add(acts, "scratch.gemm_operand", Shape{N * *std::max_element(std::begin(widths), std::end(widths))},
           R::kGemmOperand);
  }
  pl.add(acts, "scratch.dresidual", Shape{N, D}, R::kFloat);
  plan_fp8(cfg, pl, N, acts);  // the fp8 mode's quantisation scratch, over scratch.dlogits (fp8_weights.h)
  // The bf16 mode: the residual gradient rounded once by each RMSNorm backward that updates it, for
  // the next layer's first backward GEMMs (W2 of the FFN, W_o), instead of a rounding copy.
  if (pl.bf16_gemm()) pl.add(acts, "scratch.dresidual16", Shape{N, D}, R::kGemmOperand);
  pl.add(acts, "loss.sum", Shape{1}, R::kFloat);
  pl.add(acts, "loss.valid", Shape{1}, R::kFloat);
  pl.add(acts, "loss.aux", Shape{1}, R::kFloat);
}

ModelMemoryPlan Model::memory_plan(const ModelConfig& cfg, DType dtype, const ModelOptions& opt, int64_t batch,
                                   int64_t seq) {
  cfg.validate("model config");
  PrecisionPlan plan(opt.precision, dtype);
  DIFFMOE_CHECK(!(plan.fp8() && opt.parallel.ep_size > 1),
                "[model] precision fp8 with expert parallelism ({} expert ranks) is not supported: use bf16 or ep 1",
                opt.parallel.ep_size);
  auto layout = std::make_unique<ParamLayout>(cfg, plan, opt.parallel);
  LayoutBuffers params = plan_params(*layout, dtype);
  const GradBuffer::Footprint grads = GradBuffer::plan(*layout, plan.master_dtype());
  Arena acts;
  PlannedExchange ep(static_cast<int>(opt.parallel.ep_size));
  plan_activations(cfg, plan, batch, seq, acts, opt.recompute, opt.parallel.ep_size > 1 ? &ep : nullptr);
  return ModelMemoryPlan{.layout = std::move(layout),
                         .plan = std::move(plan),
                         .params = std::move(params),
                         .grads = grads,
                         .acts = std::move(acts)};
}

void Model::set_batch_shape(int64_t batch, int64_t seq) {
  // The CUDA FP8 GEMM reduces over the tokens in the Wgrad (K % 16) and takes them as rows (M % 8).
  DIFFMOE_CHECK(!plan_.fp8() || be_->device() != Device::kCUDA || (batch * seq) % 16 == 0,
                "[model] precision fp8 on cuda needs micro-batch × seq = {} × {} = {} tokens to be a multiple of 16 "
                "(cuBLASLt's FP8 GEMM shapes)",
                batch, seq, batch * seq);
  acts_ = Arena();
  plan_.clear_entries();
  ep_buffers_.reset();
  if (ep_ != nullptr && cfg_.n_dense_layers < cfg_.n_layers)
    ep_buffers_ = std::make_unique<ExpertBuffers>(cfg_, plan_, recompute_, ep_->size(), batch * seq, *be_);
  expert_sq_valid_ = false;  // "grad_sq.experts" is planned anew below
  plan_activations(cfg_, plan_, batch, seq, acts_, recompute_, ep_);
  batch_ = batch;
  seq_ = seq;
  acts_.allocate(be_->allocator());

  // RoPE tables with YaRN folded in (docs/model.md §3), uploaded once.
  upload_rope_tables(*be_, cfg_, cfg_.max_seq_len, acts_.get("rope.cos"), acts_.get("rope.sin"));
}

Tensor Model::residual(int64_t i) const { return acts_.get(fmt::format("act.residual.{}", i)); }

void Model::forward(Context ctx, const Tensor& tokens, const Tensor& targets) {
  DIFFMOE_CHECK(batch_ > 0, "[model] forward before set_batch_shape()");
  check_shape(tokens, Shape{batch_, seq_}, "model.forward", "tokens");
  check_dtype(tokens, DType::kI32, "model.forward", "tokens");
  use_gemm_precision();
  const LayerContext lc = layer_context(ctx);
  const int64_t N = batch_ * seq_;
  for (const char* name : {"loss.sum", "loss.valid", "loss.aux"})
    be_->fill(ctx, {.out = acts_.get(name), .value = 0.0});

  // h_0 = embed_scale · Embed(tokens)
  const Tensor tok = tokens.reshape(Shape{N});
  last_tokens_ = tok;
  last_targets_ = Tensor{};
  be_->embedding_fwd(
      ctx, {.out = residual(0), .tokens = tok, .table = params_.get("embed.weight"), .scale = cfg_.embed_scale});
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attn_[static_cast<size_t>(l)].forward(lc, residual(2 * l), residual(2 * l + 1));
    ffn_[static_cast<size_t>(l)].forward(lc, residual(2 * l + 1), residual(2 * l + 2));
  }
  // logits = RMSNorm(h) Headᵀ (the head is embed.weight when tied)
  const Tensor xn = acts_.get("act.final.x_norm"), logits = acts_.get("act.final.logits");
  be_->rmsnorm_fwd(ctx, {.y = xn,
                         .rstd = acts_.get("act.final.rstd"),
                         .x = residual(2 * cfg_.n_layers),
                         .w = params_.get("norm.weight"),
                         .rows = N,
                         .width = cfg_.dim,
                         .eps = cfg_.norm_eps});
  lc.linear(logits, xn, lc.weight(cfg_.tie_embeddings ? "embed.weight" : "head.weight"));
  if (targets.defined() && targets.numel() > 0) {
    check_shape(targets, Shape{batch_, seq_}, "model.forward", "targets");
    last_targets_ = targets.reshape(Shape{N});
    be_->cross_entropy_fwd(ctx, {.loss_sum = acts_.get("loss.sum"),
                                 .valid = acts_.get("loss.valid"),
                                 .logits = logits,
                                 .targets = last_targets_});
  }
}

void Model::backward(Context ctx, double grad_scale) {
  use_gemm_precision();
  LayerContext lc = layer_context(ctx);
  // The first backward after zero_grads writes the GEMM weight gradients, which zero_grads left
  // stale (LayerContext::dw_beta); every later one (gradient accumulation) adds, except into the
  // ZeRO-2 slots, which every backward writes anew (LayerContext::dw_beta_for).
  lc.dw_beta = grads_.stale() ? 0.0 : 1.0;
  const int64_t N = batch_ * seq_;
  const Tensor xn = acts_.get("act.final.x_norm"), logits = acts_.get("act.final.logits");
  const Tensor dlogits = acts_.get("scratch.dlogits"), dxn = acts_.get("scratch.dx_norm"),
               dres = acts_.get("scratch.dresidual");
  const Tensor dres16 = plan_.bf16_gemm() ? acts_.get("scratch.dresidual16") : Tensor{};
  const std::string head = cfg_.tie_embeddings ? "embed.weight" : "head.weight";
  DIFFMOE_CHECK(last_targets_.data != nullptr, "[model] backward() needs a forward() with targets first");
  // The expert stacks' Σg², from their weight-gradient GEMMs: over the values this backward leaves
  // (with accumulation, the last backward's sum covers the accumulated gradients).
  expert_sq_valid_ = false;
  lc.expert_grad_sq = acts_.get("grad_sq.experts");
  be_->fill(ctx, {.out = lc.expert_grad_sq, .value = 0.0});
  be_->cross_entropy_bwd(ctx, {.dlogits = dlogits,
                               .logits = logits,
                               .targets = last_targets_,
                               .valid = acts_.get("loss.valid"),
                               .grad_scale = grad_scale});
  // The FP8 scratch shares scratch.dlogits's bytes (fp8_weights.h): the head's GEMMs, which read
  // dlogits, must not use it.
  DIFFMOE_CHECK(lc.fp8_weight(lc.weight(head)) == nullptr, "[model] the head ({}) cannot run in FP8", head);
  // First in the backward: a tied table's dW GEMM must overwrite before embedding_bwd adds (below).
  grads_.stage_begin(0, *be_, ctx);
  lc.linear_dw(grads_.get(head), dlogits, xn, lc.weight(head));
  lc.linear_dx(dxn, dlogits, lc.weight(head));
  be_->rmsnorm_bwd(ctx, {.dx = dres,
                         .dw = grads_.get("norm.weight"),
                         .dy = dxn,
                         .x = residual(2 * cfg_.n_layers),
                         .w = params_.get("norm.weight"),
                         .rstd = acts_.get("act.final.rstd"),
                         .rows = N,
                         .width = cfg_.dim,
                         .dx16 = dres16});
  // A tied embedding's gradient is not final until the embedding backward (its stage is the last).
  grads_.stage_done(0, ctx);
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    grads_.stage_begin(layout_->stage_of_layer(l), *be_, ctx);
    ffn_[static_cast<size_t>(l)].backward(lc, residual(2 * l + 1), dres, dres16, grad_scale);
    attn_[static_cast<size_t>(l)].backward(lc, residual(2 * l), dres, dres16);
    grads_.stage_done(layout_->stage_of_layer(l), ctx);
  }
  grads_.stage_begin(layout_->n_stages() - 1, *be_, ctx);
  be_->embedding_bwd(
      ctx, {.dtable = grads_.get("embed.weight"), .tokens = last_tokens_, .dout = dres, .scale = cfg_.embed_scale});
  // The last buckets' notices come before backward_written(): they belong to this backward
  // (GradBuffer::backwards_since_zero counts it only once it is complete).
  grads_.stage_done(layout_->n_stages() - 1, ctx);
  // Every GEMM weight's gradient is written now. A backward that throws before here leaves the
  // stale mark, so the next one overwrites them all again (and no expert Σg²).
  grads_.backward_written();
  expert_sq_valid_ = true;
}

void Model::zero_grads(Context ctx) {
  grads_.zero(*be_, ctx);
  expert_sq_valid_ = false;
}

GradBuffer& Model::grads(Context ctx) {
  grads_.materialize(*be_, ctx);
  expert_sq_valid_ = false;  // the caller may write through the buffer
  return grads_;
}

Model::GradSqParts Model::grad_sq_parts(Context ctx) {
  grads_.materialize(*be_, ctx);
  GradSqParts parts;
  bool fused = expert_sq_valid_;
  for (const ParamLayout::Group& g : layout_->groups())
    if (g.domain == ParamDomain::kExpert && g.dp != 1)
      fused = false;  // the epilogue's sum is of the local, unreduced values
  bool any_expert = false;
  for (size_t g = 0; g < layout_->groups().size(); ++g) {
    DIFFMOE_CHECK(!layout_->groups()[g].slotted(),
                  "[model] the gradient norm of group {} needs its reduced chunks (parallel.zero_stage 2: no full "
                  "gradients)",
                  g);
    const bool expert = layout_->groups()[g].domain == ParamDomain::kExpert;
    any_expert = any_expert || expert;
    if (!expert || !fused) parts.rest.push_back(grads_.buffers().group(g));
  }
  if (fused && any_expert) parts.experts_sq = acts_.get("grad_sq.experts");
  return parts;
}

void Model::zero_expert_counts(Context ctx) {
  for (int64_t l = cfg_.n_dense_layers; l < cfg_.n_layers; ++l) be_->fill(ctx, {.out = expert_counts(l), .value = 0.0});
}

LossValues Model::losses() const {
  auto read = [&](const char* name) {
    const Tensor t = acts_.get(name);
    if (dtype_ == DType::kF64) {
      double v;
      be_->download(&v, t);
      return v;
    }
    float v;
    be_->download(&v, t);
    return static_cast<double>(v);
  };
  const double sum = read("loss.sum"), valid = read("loss.valid");
  return LossValues{
      .lm_loss = valid > 0 ? sum / valid : 0.0, .aux_loss = read("loss.aux"), .valid = static_cast<int64_t>(valid)};
}

Tensor Model::logits() const { return acts_.get("act.final.logits"); }
Tensor Model::expert_counts(int64_t layer) const { return acts_.get(fmt::format("stats.{}.counts", layer)); }
Tensor Model::lambda(int64_t layer) const { return acts_.get(fmt::format("act.{}.attn.lambda", layer)); }

}  // namespace diffmoe
