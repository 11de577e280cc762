#include "train/finite_check.h"

#include <fmt/format.h>

namespace diffmoe {

std::string NonFiniteState::describe() const {
  return fmt::format("{} non-finite value(s) in the weights and {} in the optimizer state (first in '{}')", weights,
                     optimizer, first);
}

FiniteCheck::FiniteCheck(Model& model, AdamW& optim) : model_(&model), optim_(&optim) {
  for (const char* name : {"weights", "optimizer", "one"}) counts_.add(name, Shape{1}, DType::kI64);
  counts_.allocate(model.backend().allocator());
}

int64_t FiniteCheck::count(Context ctx, const Tensor& x) {
  Backend& be = model_->backend();
  const Tensor c = counts_.get("one");
  be.count_nonfinite(ctx, {.count = c, .x = x});
  int64_t n = 0;
  be.download(&n, c);
  return n;
}

std::optional<NonFiniteState> FiniteCheck::find(Context ctx) {
  // The weights: every group's compute weights and the buffers; the optimizer state: this rank's
  // masters (where separate) and moments. One count per buffer (a few launches); the host reads
  // them once. grad_sq and the reduced gradient chunks are scratch, not state (a skipped non-finite
  // step leaves them NaN).
  const LayoutBuffers& params = model_->params();
  std::vector<Tensor> weights, state;
  for (size_t g = 0; g < params.n_groups(); ++g) weights.push_back(params.group(g));
  for (const auto& e : params.buffer_arena().entries()) weights.push_back(params.buffer_arena().view(e));
  for (const auto& [name, t] : optim_->state_tensors()) state.push_back(t);
  NonFiniteState s;
  for (const Tensor& t : weights) s.weights += count(ctx, t);
  for (const Tensor& t : state) s.optimizer += count(ctx, t);
  if (s.weights == 0 && s.optimizer == 0) return std::nullopt;
  // Name the first bad tensor: the weights first, then the optimizer state of this rank's pieces.
  for (const ParamLayout::Entry& e : model_->layout().entries())
    if (s.first.empty() && count(ctx, params.get(e.spec.name)) > 0) s.first = e.spec.name;
  for (const ParamLayout::Entry& e : model_->layout().buffers())
    if (s.first.empty() && count(ctx, params.get(e.spec.name)) > 0) s.first = e.spec.name;
  const ParamLayout& layout = model_->layout();
  for (const AdamW::Piece& p : optim_->pieces()) {
    if (!s.first.empty()) break;
    const std::string& name = layout.entries()[p.entry].spec.name;
    if (count(ctx, optim_->master(p)) > 0) s.first = "master." + name;
    else if (count(ctx, optim_->moment1(p)) > 0) s.first = "m." + name;
    else if (count(ctx, optim_->moment2(p)) > 0) s.first = "v." + name;
  }
  return s;
}

}  // namespace diffmoe
