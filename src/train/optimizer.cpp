#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace diffmoe {

namespace {
// A group keeps f32 masters of its own when its compute weights are not in the master dtype.
bool keeps_masters(const ParamLayout::Group& g, DType master_dtype) { return g.compute != master_dtype; }
}  // namespace

DType AdamW::moment_dtype(const std::string& name, DType master_dtype) {
  if (name == "f32") return master_dtype;
  DIFFMOE_CHECK(name == "bf16", "optim.moment_dtype: expected f32 or bf16, got '{}'", name);
  return DType::kBF16;
}

AdamW::StatePlan AdamW::plan_state(const ParamLayout& layout, DType master_dtype, const OptimShard& shard,
                                   DType moment_dtype) {
  StatePlan sp;
  const auto& groups = layout.groups();
  sp.shard_len.assign(groups.size(), 0);
  sp.chunk_base.assign(groups.size(), {});
  // Pieces: each bucket's owned chunk cut at its entries' boundaries (padding belongs to no piece).
  for (size_t g = 0; g < groups.size(); ++g) {
    const ParamLayout::Group& grp = groups[g];
    const int64_t r = rank_in(grp, shard);
    DIFFMOE_CHECK(r >= 0 && r < grp.dp, "[optimizer] rank {} in a data-parallel group of {}", r, grp.dp);
    for (const ParamLayout::Bucket& b : grp.buckets) {
      const int64_t c = b.chunk(grp.dp), c0 = b.offset + r * c, c1 = c0 + c;
      for (size_t k = b.first; k < b.end; ++k) {
        const size_t i = grp.entries[k];
        const ParamLayout::Entry& e = layout.entries()[i];
        const int64_t lo = std::max(c0, e.offset), hi = std::min(c1, e.offset + e.shape.numel());
        if (lo >= hi) continue;
        sp.pieces.push_back(Piece{.entry = i,
                                  .group = g,
                                  .group_offset = lo,
                                  .local_begin = lo - e.offset,
                                  .count = hi - lo,
                                  .state_offset = sp.shard_len[g] + (lo - c0)});
      }
      sp.chunk_base[g].push_back(sp.shard_len[g]);
      sp.shard_len[g] += c;
    }
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    sp.state.add(fmt::format("m.g{}", g), Shape{sp.shard_len[g]}, moment_dtype);
    sp.state.add(fmt::format("v.g{}", g), Shape{sp.shard_len[g]}, moment_dtype);
    if (keeps_masters(groups[g], master_dtype))
      sp.state.add(fmt::format("master.g{}", g), Shape{sp.shard_len[g]}, master_dtype);
    // The reduced gradient chunks (AdamW::reduced_chunk) where the group is data parallel.
    if (groups[g].dp > 1) sp.state.add(fmt::format("grad.g{}", g), Shape{sp.shard_len[g]}, master_dtype);
  }
  sp.state.add("grad_sq", Shape{1}, master_dtype);
  return sp;
}

int64_t AdamW::rank_in(const ParamLayout::Group& group, const OptimShard& shard) {
  return group.domain == ParamDomain::kExpert ? shard.expert_rank : shard.dense_rank;
}

AdamW::AdamW(Model& model, const OptimConfig& cfg, const OptimShard& shard)
    : model_(&model),
      cfg_(cfg),
      shard_(shard),
      moment_dtype_(moment_dtype(cfg.moment_dtype, model.plan().master_dtype())) {
  StatePlan sp = plan_state(model.layout(), model.plan().master_dtype(), shard, moment_dtype_);
  pieces_ = std::move(sp.pieces);
  shard_len_ = std::move(sp.shard_len);
  chunk_base_ = std::move(sp.chunk_base);
  state_ = std::move(sp.state);
  state_.allocate(model.backend().allocator());
  Backend& be = model.backend();
  for (const auto& e : state_.entries()) be.fill({}, {.out = state_.view(e), .value = 0.0});
}

int64_t AdamW::rank_in(size_t group) const { return rank_in(model_->layout().groups()[group], shard_); }

bool AdamW::separate_masters(size_t group) const {
  return keeps_masters(model_->layout().groups()[group], model_->plan().master_dtype());
}

namespace {
Tensor slice1d(const Tensor& t, int64_t offset, int64_t count) {
  Tensor s = t;
  s.data = static_cast<char*>(t.data) + static_cast<size_t>(offset) * dtype_size(t.dtype);
  s.shape = Shape{count};
  return s;
}
}  // namespace

Tensor AdamW::master(const Piece& p) const {
  if (!separate_masters(p.group)) return compute(p);
  return slice1d(state_.get(fmt::format("master.g{}", p.group)), p.state_offset, p.count);
}
Tensor AdamW::moment1(const Piece& p) const {
  return slice1d(state_.get(fmt::format("m.g{}", p.group)), p.state_offset, p.count);
}
Tensor AdamW::moment2(const Piece& p) const {
  return slice1d(state_.get(fmt::format("v.g{}", p.group)), p.state_offset, p.count);
}
Tensor AdamW::grad(const Piece& p) const {
  if (model_->layout().groups()[p.group].dp == 1)
    return model_->grads().buffers().range(p.group, p.group_offset, p.count);
  return slice1d(state_.get(fmt::format("grad.g{}", p.group)), p.state_offset, p.count);
}

Tensor AdamW::reduced_chunk(size_t group, size_t bucket) const {
  const ParamLayout::Group& grp = model_->layout().groups()[group];
  if (grp.dp == 1) return model_->grads().buffers().bucket(group, bucket);
  return slice1d(state_.get(fmt::format("grad.g{}", group)), chunk_base_[group][bucket],
                 grp.buckets[bucket].chunk(grp.dp));
}
Tensor AdamW::compute(const Piece& p) const { return model_->params().range(p.group, p.group_offset, p.count); }

void AdamW::init_masters(uint64_t seed) {
  set_masters([seed](const ParamLayout::Entry& e, int64_t first, std::span<double> out) {
    init_values(e.spec, seed, first, out);
  });
}

void AdamW::set_masters(const std::function<void(const ParamLayout::Entry&, int64_t, std::span<double>)>& fill) {
  const ParamLayout& layout = model_->layout();
  for (const Piece& p : pieces_) {
    if (!separate_masters(p.group)) continue;
    const ParamLayout::Entry& e = layout.entries()[p.entry];
    const Tensor dst = master(p);
    std::vector<double> v(static_cast<size_t>(p.count));
    fill(e, p.global_begin(layout), v);
    if (dst.dtype == DType::kF64) {
      model_->backend().upload(dst, v.data());
    } else {
      std::vector<float> f(v.size());
#pragma omp parallel for schedule(static) if (p.count > 65536)
      for (int64_t i = 0; i < p.count; ++i) f[static_cast<size_t>(i)] = static_cast<float>(v[static_cast<size_t>(i)]);
      model_->backend().upload(dst, f.data());
    }
  }
}

void AdamW::write_compute_weights(Context ctx) {
  for (const Piece& p : pieces_)
    if (separate_masters(p.group))
      model_->backend().copy(ctx, {.dst = compute(p), .src = master(p)});  // round to nearest even
}

void AdamW::compute_grad_sq(Context ctx) {
  Backend& be = model_->backend();
  const Tensor gsq = grad_sq();
  const ParamLayout& layout = model_->layout();
  bool sharded = false;
  for (const ParamLayout::Group& g : layout.groups()) sharded = sharded || g.dp > 1;
  if (!sharded) {
    // One rank: the gradient buffers hold exactly the trainable parameters' gradients and zero
    // padding, so one sum per group is the global Σg², plus the expert stacks' share that the
    // backward already summed where the model has it (Model::grad_sq_parts).
    const Model::GradSqParts parts = model_->grad_sq_parts(ctx);
    if (parts.experts_sq.defined()) be.copy(ctx, {.dst = gsq, .src = parts.experts_sq});
    else be.fill(ctx, {.out = gsq, .value = 0.0});
    for (const Tensor& t : parts.rest) be.sum_squares(ctx, {.out = gsq, .x = t});
    return;
  }
  // Sharded: this rank's reduced chunks, each element of the global gradient in exactly one rank's
  // chunk (dense chunks partition the world's copy, expert chunks the expert-DP group's, and the EP
  // ranks hold different experts), so the sum over all ranks of these partial sums is the global Σg².
  be.fill(ctx, {.out = gsq, .value = 0.0});
  model_->grads(ctx);  // stale gradients read as zero (a group with dp = 1 is summed in place)
  for (size_t g = 0; g < layout.groups().size(); ++g) {
    const ParamLayout::Group& grp = layout.groups()[g];
    if (grp.dp > 1) {
      be.sum_squares(ctx, {.out = gsq, .x = state_.get(fmt::format("grad.g{}", g))});
    } else {
      be.sum_squares(ctx, {.out = gsq, .x = model_->grads().buffers().group(g)});
    }
  }
}

void AdamW::step(Context ctx, double lr) {
  compute_grad_sq(ctx);
  apply(ctx, lr);
}

void AdamW::apply(Context ctx, double lr) {
  Backend& be = model_->backend();
  ++step_;
  const ParamLayout& layout = model_->layout();
  model_->grads(ctx);  // stale gradients read as zero from here on
  // One adamw_multi call for every owned piece (one launch on CUDA). The entry list is rebuilt into
  // the same vector each step; its views are the same, so the CUDA backend finds its cached device
  // table unchanged. Pieces of bf16 groups update the f32 master and write the bf16 compute copy in
  // the same pass.
  multi_.entries.clear();
  for (const Piece& p : pieces_) {
    const bool sep = separate_masters(p.group);
    multi_.entries.push_back({.param = master(p),
                              .m = moment1(p),
                              .v = moment2(p),
                              .grad = grad(p),
                              .param_bf16 = sep ? compute(p) : Tensor{},
                              .weight_decay = layout.entries()[p.entry].spec.decayed() ? cfg_.weight_decay : 0.0});
  }
  multi_.grad_sq = grad_sq();
  multi_.lr = lr;
  multi_.beta1 = cfg_.beta1;
  multi_.beta2 = cfg_.beta2;
  multi_.eps = cfg_.eps;
  multi_.max_norm = cfg_.grad_clip;
  multi_.step = step_;
  be.adamw_multi(ctx, multi_);
  // Balancing bias (docs/model.md §5): b_i += rate·sign(mean(count) − count_i), on the step's counts.
  const ModelConfig& c = model_->config();
  if (c.balance_bias && c.bias_update_rate > 0) {
    for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l)
      be.moe_bias_update(ctx, {.bias = model_->params().get(fmt::format("layers.{}.ffn.gate.bias", l)),
                               .counts = model_->expert_counts(l),
                               .rate = c.bias_update_rate});
  }
}

std::vector<std::pair<std::string, Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& e : state_.entries())
    if (e.name.rfind("m.", 0) == 0 || e.name.rfind("v.", 0) == 0 || e.name.rfind("master.", 0) == 0)
      out.emplace_back(e.name, state_.view(e));
  return out;
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

}  // namespace diffmoe
