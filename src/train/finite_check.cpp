#include "train/finite_check.h"

#include <fmt/format.h>

namespace diffmoe {

std::string NonFiniteState::describe() const {
  return fmt::format("{} non-finite value(s) in the weights and {} in the optimizer state (first in '{}')", weights, optimizer,
                     first);
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
  Backend& be = model_->backend();
  const Arena& params = model_->params();
  const Arena& state = optim_->state();
  // The optimizer arena ends with grad_sq, the last step's Σg²: scratch, not state (a skipped
  // non-finite step leaves it NaN). The moments are every view before it.
  const auto& entries = state.entries();
  DIFFMOE_CHECK(!entries.empty() && entries.back().name == "grad_sq", "[finite check] the optimizer arena must end with grad_sq");
  const Tensor w = counts_.get("weights"), o = counts_.get("optimizer");
  NonFiniteState s;
  if (!params.entries().empty()) be.count_nonfinite(ctx, {.count = w, .x = params.flat()});
  if (entries.size() > 1) be.count_nonfinite(ctx, {.count = o, .x = state.flat(0, entries.size() - 1)});
  if (!params.entries().empty()) be.download(&s.weights, w);
  if (entries.size() > 1) be.download(&s.optimizer, o);
  if (s.weights == 0 && s.optimizer == 0) return std::nullopt;
  // Name the first bad tensor: the weights first, then the moments.
  for (const auto& e : params.entries())
    if (s.first.empty() && count(ctx, params.view(e)) > 0) s.first = e.name;
  for (size_t i = 0; s.first.empty() && i + 1 < entries.size(); ++i)
    if (count(ctx, state.view(entries[i])) > 0) s.first = entries[i].name;
  return s;
}

}  // namespace diffmoe
