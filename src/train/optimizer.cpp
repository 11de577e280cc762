#include "train/optimizer.h"

#include <vector>

#include "io/safetensors.h"
#include "model/model_file.h"

namespace diffmoe {

AdamW::AdamW(Model& model, const OptimConfig& cfg) : model_(&model), cfg_(cfg) {
  for (const ParamSpec& p : model.specs()) {
    if (!p.trainable()) continue;
    state_.add("m." + p.name, p.shape, model.dtype());
    state_.add("v." + p.name, p.shape, model.dtype());
  }
  state_.add("grad_sq", Shape{1}, model.dtype());
  state_.allocate(model.backend().allocator());
  Backend& be = model.backend();
  for (const auto& e : state_.entries()) be.fill({}, {.out = state_.view(e), .value = 0.0});
}

void AdamW::compute_grad_sq(Context ctx) {
  Backend& be = model_->backend();
  const Tensor gsq = grad_sq();
  // The gradient arena holds exactly the trainable parameters' gradients, and its padding stays
  // zero (Arena::flat): one sum over it is the global Σg², in one call instead of one per tensor.
  // After a backward the expert stacks' share is already summed (Model::grad_sq_parts): start
  // from it and add the rest of the arena.
  const Model::GradSqParts parts = model_->grad_sq_parts(ctx);
  if (parts.experts_sq.defined()) be.copy(ctx, {.dst = gsq, .src = parts.experts_sq});
  else be.fill(ctx, {.out = gsq, .value = 0.0});
  be.sum_squares(ctx, {.out = gsq, .x = parts.rest});
}

void AdamW::step(Context ctx, double lr) {
  compute_grad_sq(ctx);
  apply(ctx, lr);
}

void AdamW::apply(Context ctx, double lr) {
  Backend& be = model_->backend();
  ++step_;
  // In the bf16 GEMM mode the update also writes the model's bf16 weight copies, so the next forward
  // need not refresh them (Model::weight_copies_written).
  // One adamw_multi call for every trainable parameter (one launch on CUDA). The entry list is
  // rebuilt into the same vector each step; its views are the arenas' and stay the same, so the
  // CUDA backend finds its cached device table unchanged.
  const Arena& copies = model_->weight_copies();
  const Arena& grads = model_->grads(ctx);
  multi_.entries.clear();
  for (const ParamSpec& p : model_->specs()) {
    if (!p.trainable()) continue;
    multi_.entries.push_back({.param = model_->params().get(p.name), .m = state_.get("m." + p.name),
                              .v = state_.get("v." + p.name), .grad = grads.get(p.name),
                              .param_bf16 = copies.has(p.name) ? copies.get(p.name) : Tensor{},
                              .weight_decay = p.decayed() ? cfg_.weight_decay : 0.0});
  }
  multi_.grad_sq = grad_sq();
  multi_.lr = lr;
  multi_.beta1 = cfg_.beta1;
  multi_.beta2 = cfg_.beta2;
  multi_.eps = cfg_.eps;
  multi_.max_norm = cfg_.grad_clip;
  multi_.step = step_;
  be.adamw_multi(ctx, multi_);
  model_->weight_copies_written();
  // Balancing bias (spec §5): b_i += rate·sign(mean(count) − count_i), on the step's counts.
  const ModelConfig& c = model_->config();
  if (c.balance_bias && c.bias_update_rate > 0) {
    for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l)
      be.moe_bias_update(ctx, {.bias = model_->params().get(fmt::format("layers.{}.ffn.gate.bias", l)),
                               .counts = model_->expert_counts(l), .rate = c.bias_update_rate});
  }
}

double AdamW::grad_norm() const {
  const Tensor t = grad_sq();
  if (t.dtype == DType::kF64) {
    double v;
    model_->backend().download(&v, t);
    return std::sqrt(v);
  }
  float v;
  model_->backend().download(&v, t);
  return std::sqrt(static_cast<double>(v));
}

void AdamW::save(const std::string& path) const {
  SafetensorsWriter w;
  std::vector<std::vector<char>> hold;
  hold.reserve(state_.entries().size());
  for (const auto& e : state_.entries()) {
    if (e.name == "grad_sq") continue;
    const Tensor t = state_.view(e);
    hold.emplace_back(t.nbytes());
    model_->backend().download(hold.back().data(), t);
    std::vector<int64_t> shape;
    for (int i = 0; i < t.rank(); ++i) shape.push_back(t.dim(i));
    w.add(e.name, t.dtype, shape, hold.back().data());
  }
  w.set_metadata("step", std::to_string(step_));
  w.write(path);
}

void AdamW::load(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  for (const auto& e : state_.entries()) {
    if (e.name == "grad_sq") continue;
    DIFFMOE_CHECK(f.has(e.name), "{}: optimizer state '{}' is missing", path, e.name);
    read_tensor(f, e.name, state_.view(e), model_->backend());
  }
  auto it = f.metadata().find("step");
  DIFFMOE_CHECK(it != f.metadata().end(), "{}: metadata has no \"step\"", path);
  step_ = std::stoll(it->second);
}

}  // namespace diffmoe
