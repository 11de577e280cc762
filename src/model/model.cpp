#include "model/model.h"

#include <algorithm>

#include <fmt/format.h>

#include <vector>

#include "model/rope_tables.h"

namespace diffmoe {

// Whether the first backward after zero_grads writes p's gradient with a GEMM at beta = 0
// (LayerContext::dw_beta) before anything adds to it, so that zero_grads need not zero it. Every
// matrix (linear_dw / linear_backward), expert stack (grouped_gemm_wgrad, which writes an expert
// that no token chose as zeros), router gate (its linear_backward) and the head get exactly one such
// GEMM per backward; so does a tied embedding table, whose head dW GEMM runs first in backward() and
// its embedding scatter-add last. Norm weights (rmsnorm_bwd), λ vectors (diff_lambda_bwd) and an
// untied embedding table (embedding_bwd) are only added into: they need zeros.
static bool is_gemm_weight(const ParamSpec& p, bool tied);
// The GEMM weights, and the router gate: its weight gradient comes from a GEMM too (the gate's
// forward stays f32 and has no bf16 copy, so it is not a GEMM weight in is_gemm_weight's sense).
static bool grad_written_by_gemm(const ParamSpec& p, bool tied) {
  return is_gemm_weight(p, tied) || p.kind == ParamKind::kGate;
}

Model::Model(const ModelConfig& cfg, Backend& backend, DType dtype) : cfg_(cfg), be_(&backend), dtype_(dtype) {
  cfg_.validate("model config");
  specs_ = parameter_specs(cfg_);
  for (const ParamSpec& p : specs_) params_.add(p.name, p.shape, dtype_);
  // The gradients that the backward adds into first, so that zero_grads is one fill over a prefix;
  // then the GEMM-written ones, the expert stacks last, so that grad_sq_parts' "rest" is one prefix
  // too. Each part in spec order.
  enum class GradPart { kAdded, kGemm, kExpert };
  const auto part_of = [&](const ParamSpec& p) {
    if (!grad_written_by_gemm(p, cfg_.tie_embeddings)) return GradPart::kAdded;
    return p.kind == ParamKind::kExpert ? GradPart::kExpert : GradPart::kGemm;
  };
  for (const GradPart part : {GradPart::kAdded, GradPart::kGemm, GradPart::kExpert}) {
    for (const ParamSpec& p : specs_)
      if (p.trainable() && part_of(p) == part) grads_.add(p.name, p.shape, dtype_);
    if (part == GradPart::kAdded) n_added_grads_ = grads_.entries().size();
    if (part == GradPart::kGemm) first_expert_grad_ = grads_.entries().size();
  }
  params_.allocate(be_->allocator());
  grads_.allocate(be_->allocator());
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attn_.emplace_back(l);
    ffn_.emplace_back(l);
  }
}

void Model::init_weights(uint64_t seed) {
  // Computed on the host in double from the counter-based RNG, converted and uploaded once.
  for (const ParamSpec& p : specs_) {
    const Tensor dst = params_.get(p.name);
    const int64_t n = p.shape.numel();
    // Each value is a pure function of (seed, name, index): filling in parallel changes nothing.
    if (dtype_ == DType::kF64) {
      std::vector<double> v(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) if (n > 65536)
      for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = init_value(p, seed, i);
      be_->upload(dst, v.data());
    } else {
      DIFFMOE_CHECK(dtype_ == DType::kF32, "[model] init_weights: unsupported parameter dtype {}", dtype_name(dtype_));
      std::vector<float> v(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) if (n > 65536)
      for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>(init_value(p, seed, i));
      be_->upload(dst, v.data());
    }
  }
}

LayerContext Model::layer_context(Context ctx) {
  return LayerContext{.be = be_, .ctx = ctx, .cfg = &cfg_, .dtype = dtype_, .batch = batch_, .seq = seq_,
                      .params = &params_, .grads = &grads_, .acts = &acts_,
                      .weights_bf16 = bf16_operands_ && !weights_bf16_.entries().empty() ? &weights_bf16_ : nullptr,
                      .bf16_operands = bf16_operands_};
}

// The weights that only GEMMs read as their B operand: every matrix and expert stack, and the head
// (the embedding table when tied). Not the router gate: z = u Eᵀ stays as the GEMM op computes it.
static bool is_gemm_weight(const ParamSpec& p, bool tied) {
  switch (p.kind) {
    case ParamKind::kMatrix:
    case ParamKind::kExpert:
    case ParamKind::kHead:
      return true;
    case ParamKind::kEmbedding:
      return tied;
    default:
      return false;
  }
}

void Model::refresh_weight_copies(Context ctx) {
  if (be_->gemm_precision() != GemmPrecision::kBF16 || dtype_ != DType::kF32) return;
  if (!weights_bf16_.allocated() || weights_bf16_.entries().empty()) {
    weights_bf16_ = Arena();
    for (const ParamSpec& p : specs_)
      if (is_gemm_weight(p, cfg_.tie_embeddings)) weights_bf16_.add(p.name, p.shape, DType::kBF16);
    weights_bf16_.allocate(be_->allocator());
  }
  for (const Arena::Entry& e : weights_bf16_.entries())
    be_->copy(ctx, {.dst = weights_bf16_.view(e), .src = params_.get(e.name)});  // round to nearest even
}

void Model::set_batch_shape(int64_t batch, int64_t seq) {
  DIFFMOE_CHECK(batch > 0 && seq > 0 && seq <= cfg_.max_seq_len, "[model] batch shape {}x{}: need batch > 0 and 0 < seq <= max_seq_len = {}",
                batch, seq, cfg_.max_seq_len);
  batch_ = batch;
  seq_ = seq;
  bf16_operands_ = be_->gemm_precision() == GemmPrecision::kBF16 && dtype_ == DType::kF32;
  if (!bf16_operands_) weights_bf16_ = Arena();  // no bf16 copies outside the bf16 GEMM mode
  acts_ = Arena();
  expert_sq_valid_ = false;  // "grad_sq.experts" is planned anew below
  const int64_t N = batch * seq, D = cfg_.dim;
  const int64_t half = cfg_.qk_rope_head_dim / 2;
  acts_.add("rope.cos", Shape{cfg_.max_seq_len, half}, dtype_);
  acts_.add("rope.sin", Shape{cfg_.max_seq_len, half}, dtype_);
  for (int64_t i = 0; i <= 2 * cfg_.n_layers; ++i) acts_.add(fmt::format("act.residual.{}", i), Shape{N, D}, dtype_);
  LayerContext lc = layer_context({});
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attn_[static_cast<size_t>(l)].plan(lc, acts_);
    ffn_[static_cast<size_t>(l)].plan(lc, acts_);
  }
  acts_.add("act.final.x_norm", Shape{N, D}, bf16_operands_ ? DType::kBF16 : dtype_);  // read by the head's GEMMs only
  acts_.add("act.final.rstd", Shape{N}, dtype_);
  acts_.add("grad_sq.experts", Shape{1}, dtype_);  // backward(): Σg² of the expert stacks' gradients
  // The head's GEMM output, read by the cross-entropy only: bf16 in the bf16 GEMM mode (rounded once
  // by the GEMM, as under autocast; the loss widens it and computes in f32/f64).
  acts_.add("act.final.logits", Shape{N, cfg_.vocab_size}, bf16_operands_ ? DType::kBF16 : dtype_);
  // Read only by the head's two GEMMs: bf16 in the bf16 GEMM mode (the CE backward rounds it).
  acts_.add("scratch.dlogits", Shape{N, cfg_.vocab_size}, bf16_operands_ ? DType::kBF16 : dtype_);
  acts_.add("scratch.dx_norm", Shape{N, D}, dtype_);
  if (bf16_operands_) {  // LayerContext::gemm_operand: the widest f32 dy that two backward GEMMs read
    const ModelConfig& c = cfg_;
    const int64_t widths[] = {D, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.n_heads * c.d_qk(), c.q_lora_rank,
                              c.kv_lora_rank + c.qk_rope_head_dim, c.n_routed_experts};
    acts_.add("scratch.gemm_operand", Shape{N * *std::max_element(std::begin(widths), std::end(widths))}, DType::kBF16);
  }
  acts_.add("scratch.dresidual", Shape{N, D}, dtype_);
  // The bf16 GEMM mode: the residual gradient rounded once by each RMSNorm backward that updates
  // it, for the next layer's first backward GEMMs (W2 of the FFN, W_o), instead of a rounding copy.
  if (bf16_operands_) acts_.add("scratch.dresidual16", Shape{N, D}, DType::kBF16);
  acts_.add("loss.sum", Shape{1}, dtype_);
  acts_.add("loss.valid", Shape{1}, dtype_);
  acts_.add("loss.aux", Shape{1}, dtype_);
  acts_.allocate(be_->allocator());

  // RoPE tables with YaRN folded in (spec §3), uploaded once.
  const RopeParams rp{.rope_dim = cfg_.qk_rope_head_dim, .theta = cfg_.rope_theta, .max_seq_len = cfg_.max_seq_len,
                      .original_seq_len = cfg_.original_seq_len, .factor = cfg_.rope_factor, .beta_fast = cfg_.beta_fast,
                      .beta_slow = cfg_.beta_slow, .mscale = cfg_.mscale};
  std::vector<double> cos, sin;
  rope_tables(rp, cfg_.max_seq_len, cos, sin);
  if (dtype_ == DType::kF64) {
    be_->upload(acts_.get("rope.cos"), cos.data());
    be_->upload(acts_.get("rope.sin"), sin.data());
  } else {
    std::vector<float> c(cos.begin(), cos.end()), s(sin.begin(), sin.end());
    be_->upload(acts_.get("rope.cos"), c.data());
    be_->upload(acts_.get("rope.sin"), s.data());
  }
}

Tensor Model::residual(int64_t i) const { return acts_.get(fmt::format("act.residual.{}", i)); }

void Model::forward(Context ctx, const Tensor& tokens, const Tensor& targets) {
  DIFFMOE_CHECK(batch_ > 0, "[model] forward before set_batch_shape()");
  check_shape(tokens, Shape{batch_, seq_}, "model.forward", "tokens");
  check_dtype(tokens, DType::kI32, "model.forward", "tokens");
  check_precision_unchanged("forward");
  // The masters may have changed since the last forward: refresh the bf16 copies, unless the
  // optimizer wrote them together with the masters just now.
  if (!copies_fresh_) refresh_weight_copies(ctx);
  copies_fresh_ = false;
  const LayerContext lc = layer_context(ctx);
  const int64_t N = batch_ * seq_;
  for (const char* name : {"loss.sum", "loss.valid", "loss.aux"}) be_->fill(ctx, {.out = acts_.get(name), .value = 0.0});

  // h_0 = embed_scale · Embed(tokens)
  const Tensor tok = tokens.reshape(Shape{N});
  last_tokens_ = tok;
  last_targets_ = Tensor{};
  be_->embedding_fwd(ctx, {.out = residual(0), .tokens = tok, .table = params_.get("embed.weight"), .scale = cfg_.embed_scale});
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attn_[static_cast<size_t>(l)].forward(lc, residual(2 * l), residual(2 * l + 1));
    ffn_[static_cast<size_t>(l)].forward(lc, residual(2 * l + 1), residual(2 * l + 2));
  }
  // logits = RMSNorm(h) Headᵀ (the head is embed.weight when tied)
  const Tensor xn = acts_.get("act.final.x_norm"), logits = acts_.get("act.final.logits");
  be_->rmsnorm_fwd(ctx, {.y = xn, .rstd = acts_.get("act.final.rstd"), .x = residual(2 * cfg_.n_layers), .w = params_.get("norm.weight"),
                         .rows = N, .width = cfg_.dim, .eps = cfg_.norm_eps});
  lc.linear(logits, xn, lc.weight(cfg_.tie_embeddings ? "embed.weight" : "head.weight"));
  if (targets.defined() && targets.numel() > 0) {
    check_shape(targets, Shape{batch_, seq_}, "model.forward", "targets");
    last_targets_ = targets.reshape(Shape{N});
    be_->cross_entropy_fwd(ctx, {.loss_sum = acts_.get("loss.sum"), .valid = acts_.get("loss.valid"), .logits = logits,
                                 .targets = last_targets_});
  }
}

// The activations (and which of them are bf16) were planned for one GEMM precision.
void Model::check_precision_unchanged(const char* where) const {
  DIFFMOE_CHECK(bf16_operands_ == (be_->gemm_precision() == GemmPrecision::kBF16 && dtype_ == DType::kF32),
                "[model] {}: the backend's GEMM precision changed after set_batch_shape(): call set_batch_shape() again",
                where);
}

void Model::backward(Context ctx, double grad_scale) {
  check_precision_unchanged("backward");
  LayerContext lc = layer_context(ctx);
  // The first backward after zero_grads writes the GEMM weight gradients, which zero_grads left
  // stale (LayerContext::dw_beta); every later one (gradient accumulation) adds.
  lc.dw_beta = gemm_grads_stale_ ? 0.0 : 1.0;
  const int64_t N = batch_ * seq_;
  const Tensor xn = acts_.get("act.final.x_norm"), logits = acts_.get("act.final.logits");
  const Tensor dlogits = acts_.get("scratch.dlogits"), dxn = acts_.get("scratch.dx_norm"), dres = acts_.get("scratch.dresidual");
  const Tensor dres16 = bf16_operands_ ? acts_.get("scratch.dresidual16") : Tensor{};
  const std::string head = cfg_.tie_embeddings ? "embed.weight" : "head.weight";
  DIFFMOE_CHECK(last_targets_.data != nullptr, "[model] backward() needs a forward() with targets first");
  // The expert stacks' Σg², from their weight-gradient GEMMs: over the values this backward leaves
  // (with accumulation, the last backward's sum covers the accumulated gradients).
  expert_sq_valid_ = false;
  lc.expert_grad_sq = acts_.get("grad_sq.experts");
  be_->fill(ctx, {.out = lc.expert_grad_sq, .value = 0.0});
  be_->cross_entropy_bwd(ctx, {.dlogits = dlogits, .logits = logits, .targets = last_targets_, .valid = acts_.get("loss.valid"),
                               .grad_scale = grad_scale});
  // First in the backward: a tied table's dW GEMM must overwrite before embedding_bwd adds (below).
  lc.linear_dw(grads_.get(head), dlogits, xn);
  lc.linear_dx(dxn, dlogits, lc.weight(head));
  be_->rmsnorm_bwd(ctx, {.dx = dres, .dw = grads_.get("norm.weight"), .dy = dxn, .x = residual(2 * cfg_.n_layers),
                         .w = params_.get("norm.weight"), .rstd = acts_.get("act.final.rstd"), .rows = N, .width = cfg_.dim,
                         .dx16 = dres16});
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    ffn_[static_cast<size_t>(l)].backward(lc, residual(2 * l + 1), dres, dres16, grad_scale);
    attn_[static_cast<size_t>(l)].backward(lc, residual(2 * l), dres, dres16);
  }
  be_->embedding_bwd(ctx, {.dtable = grads_.get("embed.weight"), .tokens = last_tokens_, .dout = dres, .scale = cfg_.embed_scale});
  // Every GEMM weight's gradient is written now. A backward that throws before here leaves the
  // mark, so the next one overwrites them all again (and no expert Σg²).
  gemm_grads_stale_ = false;
  expert_sq_valid_ = true;
}

// One fill over the added-into gradients (a prefix of the arena, padding included). The GEMM
// weights' gradients (most of the bytes) are written by the next backward, or zeroed by grads().
// The padding after them is zero from allocate() and nothing writes it (Arena::flat).
void Model::zero_grads(Context ctx) {
  if (n_added_grads_ > 0) be_->fill(ctx, {.out = grads_.flat(0, n_added_grads_), .value = 0.0});
  gemm_grads_stale_ = n_added_grads_ < grads_.entries().size();
  expert_sq_valid_ = false;
}

size_t Model::zero_grads_bytes() const { return n_added_grads_ == 0 ? 0 : grads_.flat(0, n_added_grads_).nbytes(); }

void Model::zero_stale_gemm_grads(Context ctx) {
  if (gemm_grads_stale_) {  // zero_grads() left them for a backward: zero them now, then backwards add
    be_->fill(ctx, {.out = grads_.flat(n_added_grads_, grads_.entries().size()), .value = 0.0});
    gemm_grads_stale_ = false;
  }
}

Arena& Model::grads(Context ctx) {
  zero_stale_gemm_grads(ctx);
  expert_sq_valid_ = false;  // the caller may write through the arena
  return grads_;
}

Model::GradSqParts Model::grad_sq_parts(Context ctx) {
  zero_stale_gemm_grads(ctx);
  if (!expert_sq_valid_ || first_expert_grad_ == 0 || first_expert_grad_ == grads_.entries().size())
    return {.rest = grads_.flat(), .experts_sq = {}};
  return {.rest = grads_.flat(0, first_expert_grad_), .experts_sq = acts_.get("grad_sq.experts")};
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
  return LossValues{.lm_loss = valid > 0 ? sum / valid : 0.0, .aux_loss = read("loss.aux"), .valid = static_cast<int64_t>(valid)};
}

Tensor Model::logits() const { return acts_.get("act.final.logits"); }
Tensor Model::expert_counts(int64_t layer) const { return acts_.get(fmt::format("stats.{}.counts", layer)); }
Tensor Model::lambda(int64_t layer) const { return acts_.get(fmt::format("act.{}.attn.lambda", layer)); }

}  // namespace diffmoe
