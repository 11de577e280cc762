#include "train/data_parallel.h"

#include <fmt/format.h>

namespace diffmoe {

namespace {
constexpr int64_t kMaxScalars = 64;  // sum(): values per call
}

DataParallel::DataParallel(Model& model, AdamW& opt, dist::Communicator& world, dist::Communicator& expert_dp)
    : model_(&model), opt_(&opt), world_(&world), expert_dp_(&expert_dp), grad_buffers_(&model.grads().buffers()) {
  const ParamLayout& layout = model.layout();
  for (const ParamLayout::Group& g : layout.groups()) {
    const dist::Communicator& c = g.domain == ParamDomain::kExpert ? expert_dp : world;
    DIFFMOE_CHECK(c.size() == g.dp,
                  "[data parallel] a {} group is laid out for {} ranks, but its communicator '{}' has {}",
                  g.domain == ParamDomain::kExpert ? "expert" : "dense", g.dp, c.name(), c.size());
    issued_.emplace_back(g.buckets.size(), false);
  }
  scalars_.add("sum", Shape{kMaxScalars}, DType::kF64);
  scalars_.allocate(model.backend().allocator());
  model.grads().set_on_bucket_ready([this](size_t g, size_t b, Context ctx) {
    if (last_micro_) reduce_bucket(g, b, ctx);
  });
}

DataParallel::~DataParallel() {
  model_->grads().set_on_bucket_ready(nullptr);
  for (dist::WorkPtr& w : pending_) {
    try {
      w->wait({});
    } catch (...) {  // a destructor must not throw; the failure was (or will be) reported by its owner
    }
  }
}

dist::Communicator& DataParallel::comm_for(size_t group) const {
  return model_->layout().groups()[group].domain == ParamDomain::kExpert ? *expert_dp_ : *world_;
}

void DataParallel::reduce_bucket(size_t group, size_t bucket, Context ctx) {
  const ParamLayout::Group& g = model_->layout().groups()[group];
  if (g.dp == 1 || issued_[group][bucket]) return;
  issued_[group][bucket] = true;
  // The gradient buffer itself, not Model::grads(): that zeroes stale gradients, and mid-backward
  // the ones not yet written are stale.
  pending_.push_back(
      comm_for(group).reduce_scatter(ctx, grad_buffers_->bucket(group, bucket), opt_->reduced_chunk(group, bucket)));
}

void DataParallel::finish_gradients(Context ctx) {
  const ParamLayout& layout = model_->layout();
  for (size_t g = 0; g < layout.groups().size(); ++g)
    for (size_t b = 0; b < layout.groups()[g].buckets.size(); ++b) reduce_bucket(g, b, ctx);
  for (dist::WorkPtr& w : pending_) w->wait(ctx);
  pending_.clear();
  for (auto& v : issued_) std::fill(v.begin(), v.end(), false);
}

void DataParallel::global_grad_sq(Context ctx) {
  opt_->compute_grad_sq(ctx);
  if (world_->size() > 1) world_->all_reduce(ctx, opt_->grad_sq(), opt_->grad_sq())->wait(ctx);
}

void DataParallel::reduce_expert_counts(Context ctx) {
  if (world_->size() == 1) return;
  const ModelConfig& c = model_->config();
  for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l) {
    const Tensor counts = model_->expert_counts(l);
    world_->all_reduce(ctx, counts, counts)->wait(ctx);
  }
}

void DataParallel::gather_weights(Context ctx) {
  const ParamLayout& layout = model_->layout();
  std::vector<dist::WorkPtr> works;
  for (size_t g = 0; g < layout.groups().size(); ++g) {
    const ParamLayout::Group& grp = layout.groups()[g];
    if (grp.dp == 1) continue;
    const int64_t r = opt_->rank_in(g);
    for (size_t b = 0; b < grp.buckets.size(); ++b)
      works.push_back(
          comm_for(g).all_gather(ctx, model_->params().chunk(g, b, r, grp.dp), model_->params().bucket(g, b)));
  }
  for (dist::WorkPtr& w : works) w->wait(ctx);
}

std::vector<double> DataParallel::sum(Context ctx, const std::vector<double>& values) {
  if (world_->size() == 1) return values;
  DIFFMOE_CHECK(static_cast<int64_t>(values.size()) <= kMaxScalars, "[data parallel] sum() of {} values (at most {})",
                values.size(), kMaxScalars);
  Tensor t = scalars_.get("sum");
  t.shape = Shape{static_cast<int64_t>(values.size())};
  Backend& be = model_->backend();
  be.upload(t, values.data());
  world_->all_reduce(ctx, t, t)->wait(ctx);
  std::vector<double> out(values.size());
  be.download(out.data(), t);
  return out;
}

}  // namespace diffmoe
