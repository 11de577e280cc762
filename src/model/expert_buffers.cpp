#include "model/expert_buffers.h"

#include <algorithm>
#include <cmath>

namespace diffmoe {

namespace {
// Growth beyond what a micro-batch needs, so that routing drifting upwards does not reallocate at
// every step.
constexpr double kGrowth = 1.25;
int64_t grown(int64_t need, int64_t cap) {
  return need <= cap ? cap : std::max(need, static_cast<int64_t>(std::ceil(kGrowth * static_cast<double>(cap))));
}
}  // namespace

int64_t ExpertBuffers::initial_pairs(const ModelConfig& cfg, int64_t ep_size, int64_t tokens) {
  // A rank receives as many pairs as it sends on average, N·min(K, EP) at most.
  return tokens * std::min(cfg.n_activated_experts, ep_size);
}

int64_t ExpertBuffers::initial_rows(const ModelConfig& cfg, int64_t tokens) {
  return tokens * cfg.n_activated_experts;  // its experts compute N·K rows on average
}

size_t ExpertBuffers::bytes_for(const ModelConfig& cfg, const PrecisionPlan& plan, Recompute recompute, int64_t pairs,
                                int64_t rows) {
  const size_t moe_layers = static_cast<size_t>(cfg.n_layers - cfg.n_dense_layers);
  return moe_layers * plan_saved(cfg, plan, recompute, false, pairs, rows).bytes() +
         plan_scratch(cfg, plan, recompute, pairs, rows).bytes();
}

// The same rule as without expert parallelism (FfnLayer::recomputed, model/recompute.h): `moe`
// recomputes the experts' SwiGLU intermediates from the kept x_perm, `full` everything but the
// routing plan (the received slots and weights, their permutation: re-deriving them would need the
// routing again).
bool ExpertBuffers::recomputed(Recompute recompute, std::string_view name) {
  const bool hidden = name == "a" || name == "b" || name == "h";
  switch (recompute) {
    case Recompute::kMoe: return hidden;
    case Recompute::kFull: return hidden || name == "x_perm" || name == "y_perm";
    case Recompute::kNone:
    case Recompute::kAttention: return false;
  }
  return false;
}

ExpertBuffers::ExpertBuffers(const ModelConfig& cfg, const PrecisionPlan& plan, Recompute recompute, int64_t ep_size,
                             int64_t tokens, Backend& be)
    : cfg_(&cfg), plan_(&plan), recompute_(recompute), be_(&be) {
  layers_.resize(static_cast<size_t>(cfg.n_layers - cfg.n_dense_layers));
  const int64_t pairs = initial_pairs(cfg, ep_size, tokens), rows = initial_rows(cfg, tokens);
  for (Layer& l : layers_) {
    l.cap_pairs = pairs;
    l.cap_rows = rows;
    l.saved = plan_saved(cfg, plan, recompute, false, pairs, rows);
    l.saved.allocate(be.allocator());
  }
  scratch_pairs_ = pairs;
  scratch_rows_ = rows;
  scratch_ = plan_scratch(cfg, plan, recompute, pairs, rows);
  scratch_.allocate(be.allocator());
}

size_t ExpertBuffers::index(int64_t layer) const {
  const int64_t i = layer - cfg_->n_dense_layers;
  DIFFMOE_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()), "[model] layer {} is not a MoE layer", layer);
  return static_cast<size_t>(i);
}

Arena ExpertBuffers::plan_saved(const ModelConfig& c, const PrecisionPlan& plan, Recompute recompute, bool shared,
                                int64_t P, int64_t R) {
  const int64_t K = c.n_activated_experts, D = c.dim, I = c.moe_inter_dim;
  Arena a;
  using A = ActRole;
  const auto add = [&](const char* name, Shape s, ActRole role) {
    if (recomputed(recompute, name) == shared) a.add(name, s, plan.dtype(role));
  };
  add("recv_idx", Shape{P, K}, A::kIndex);
  add("recv_w", Shape{P, K}, A::kFloat);
  add("slot_pos", Shape{P, K}, A::kIndex);
  add("offsets", Shape{c.n_routed_experts + 1}, A::kIndex);  // the local experts' E_l + 1 in front
  add("src_row", Shape{R}, A::kIndex);
  add("x_perm", Shape{R, D}, A::kGemmOperand);
  add("y_perm", Shape{R, D}, A::kGemmOutput);
  add("a", Shape{R, I}, A::kGemmOutput);
  add("b", Shape{R, I}, A::kGemmOutput);
  add("h", Shape{R, I}, A::kGemmOperand);
  return a;
}

Arena ExpertBuffers::plan_scratch(const ModelConfig& c, const PrecisionPlan& plan, Recompute recompute, int64_t P,
                                  int64_t R) {
  const int64_t K = c.n_activated_experts, D = c.dim, I = c.moe_inter_dim;
  Arena a = plan_saved(c, plan, recompute, true, P, R);
  using A = ActRole;
  const auto add = [&](const char* name, Shape s, ActRole role) { a.add(name, s, plan.dtype(role)); };
  add("x_recv", Shape{P, D}, A::kGemmOperand);
  add("dy_recv", Shape{P, D}, A::kGemmOperand);
  add("y_recv", Shape{P, D}, A::kFloat);
  add("dx_recv", Shape{P, D}, A::kFloat);
  add("dtw", Shape{P, K}, A::kFloat);
  add("dy_perm", Shape{R, D}, A::kGemmOperand);
  add("dx_perm", Shape{R, D}, A::kGemmOutput);
  add("dh", Shape{R, I}, A::kGemmOutput);
  add("da", Shape{R, I}, A::kGemmOperand);
  add("db", Shape{R, I}, A::kGemmOperand);
  return a;
}

void ExpertBuffers::ensure(Context ctx, int64_t layer, int64_t pairs, int64_t rows) {
  Layer& l = layers_[index(layer)];
  if (pairs > l.cap_pairs || rows > l.cap_rows) {
    l.cap_pairs = grown(pairs, l.cap_pairs);
    l.cap_rows = grown(rows, l.cap_rows);
    // The old buffers may still be read by queued work of an earlier step on ctx's stream (the
    // all-to-alls that touch them were waited on it), so ctx's stream drains before they go.
    be_->synchronize(ctx);
    l.saved = plan_saved(*cfg_, *plan_, recompute_, false, l.cap_pairs, l.cap_rows);
    l.saved.allocate(be_->allocator());
  }
  if (pairs > scratch_pairs_ || rows > scratch_rows_) {
    scratch_pairs_ = grown(pairs, scratch_pairs_);
    scratch_rows_ = grown(rows, scratch_rows_);
    be_->synchronize(ctx);
    scratch_ = plan_scratch(*cfg_, *plan_, recompute_, scratch_pairs_, scratch_rows_);
    scratch_.allocate(be_->allocator());
  }
}

Tensor ExpertBuffers::saved(int64_t layer, const std::string& name) const {
  const Arena& own = layers_[index(layer)].saved;
  return recomputed(recompute_, name) ? scratch_.get(name) : own.get(name);
}

Tensor ExpertBuffers::scratch(const std::string& name) const { return scratch_.get(name); }

size_t ExpertBuffers::bytes() const {
  size_t n = scratch_.bytes();
  for (const Layer& l : layers_) n += l.saved.bytes();
  return n;
}

}  // namespace diffmoe
