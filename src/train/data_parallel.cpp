#include "train/data_parallel.h"

#include <fmt/format.h>

namespace diffmoe {

namespace {
constexpr int64_t kMaxScalars = 64;  // sum(): values per call
}

DataParallel::DataParallel(Model& model, AdamW& opt, dist::Communicator& world, dist::Communicator& expert_dp)
    : model_(&model), opt_(&opt), world_(&world), expert_dp_(&expert_dp), grads_(&model.grads()),
      grad_buffers_(&grads_->buffers()) {
  const ParamLayout& layout = model.layout();
  for (const ParamLayout::Group& g : layout.groups()) {
    const dist::Communicator& c = g.domain == ParamDomain::kExpert ? expert_dp : world;
    DIFFMOE_CHECK(c.size() == g.dp,
                  "[data parallel] a {} group is laid out for {} ranks, but its communicator '{}' has {}",
                  g.domain == ParamDomain::kExpert ? "expert" : "dense", g.dp, c.name(), c.size());
    issued_.emplace_back(g.buckets.size(), false);
    slot_work_.emplace_back(g.slot_len.size());
    reduced_in_.emplace_back(g.buckets.size(), -1);
  }
  scalars_.add("sum", Shape{kMaxScalars}, DType::kF64);
  scalars_.allocate(model.backend().allocator());
  GradBuffer& grads = *grads_;
  grads.set_on_bucket_ready([this](size_t g, size_t b, Context ctx) {
    if (model_->layout().groups()[g].slotted()) reduce_slot(g, b, ctx);
    else if (last_micro_) reduce_bucket(g, b, ctx);
  });
  grads.set_on_slot_reuse([this](size_t g, int slot, Context ctx) { complete_slot(g, slot, ctx); });
}

DataParallel::~DataParallel() {
  GradBuffer& grads = *grads_;
  grads.set_on_bucket_ready(nullptr);
  grads.set_on_slot_reuse(nullptr);
  auto drain = [](dist::WorkPtr& w) {
    if (!w) return;
    try {
      w->wait({});
    } catch (...) {  // a destructor must not throw; the failure was (or will be) reported by its owner
    }
  };
  for (dist::WorkPtr& w : pending_) drain(w);
  for (auto& group : slot_work_)
    for (SlotWork& sw : group) drain(sw.work);
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

void DataParallel::reduce_slot(size_t group, size_t bucket, Context ctx) {
  const ParamLayout::Group& g = model_->layout().groups()[group];
  const GradBuffer& grads = *grads_;
  const int slot = g.buckets[bucket].slot;
  SlotWork& sw = slot_work_[group][static_cast<size_t>(slot)];
  DIFFMOE_CHECK(!sw.work, "[data parallel] ZeRO-2: slot {} of group {} is reduced twice without being taken again",
                slot, group);
  const Tensor reduced = opt_->reduced_chunk(group, bucket);
  // The first backward since zero_grads writes the reduced chunk; a later one adds to it.
  const int64_t k = grads.backwards_since_zero();
  int64_t& last = reduced_in_[group][bucket];
  DIFFMOE_CHECK(k == 0 || last == k - 1,
                "[data parallel] ZeRO-2: bucket {} of group {} was not reduced by backward {} since zero_grads (a "
                "backward that did not announce its stages, GradBuffer::stage_done)",
                bucket, group, k - 1);
  last = k;
  if (k == 0) {
    sw.work = comm_for(group).reduce_scatter(ctx, grads.slot_bucket(group, bucket), reduced);
  } else {
    const Tensor acc = grads.slot_chunk(group, slot, reduced.numel());
    sw.work = comm_for(group).reduce_scatter(ctx, grads.slot_bucket(group, bucket), acc);
    sw.add_from = acc;
    sw.add_to = reduced;
  }
}

void DataParallel::complete_slot(size_t group, int slot, Context ctx) {
  SlotWork& sw = slot_work_[group][static_cast<size_t>(slot)];
  if (!sw.work) return;
  dist::WorkPtr w = std::move(sw.work);
  sw.work = nullptr;
  w->wait(ctx);
  if (sw.add_from.defined()) model_->backend().axpy(ctx, {.y = sw.add_to, .x = sw.add_from, .alpha = 1.0});
  sw.add_from = sw.add_to = Tensor{};
}

void DataParallel::finish_gradients(Context ctx) {
  const ParamLayout& layout = model_->layout();
  const GradBuffer& grads = *grads_;
  for (size_t g = 0; g < layout.groups().size(); ++g) {
    const ParamLayout::Group& grp = layout.groups()[g];
    if (!grp.slotted()) {
      for (size_t b = 0; b < grp.buckets.size(); ++b) reduce_bucket(g, b, ctx);
      continue;
    }
    for (size_t s = 0; s < grp.slot_len.size(); ++s) complete_slot(g, static_cast<int>(s), ctx);
    if (grads.backwards_since_zero() == 0) {
      // No backward since zero_grads: the gradients read as zero, so do their reduced chunks.
      for (size_t b = 0; b < grp.buckets.size(); ++b)
        model_->backend().fill(ctx, {.out = opt_->reduced_chunk(g, b), .value = 0.0});
      continue;
    }
    // Every backward since zero_grads reduced every bucket (it cannot be done later: its slot is reused).
    for (size_t b = 0; b < grp.buckets.size(); ++b)
      DIFFMOE_CHECK(reduced_in_[g][b] + 1 == grads.backwards_since_zero(),
                    "[data parallel] ZeRO-2: bucket {} of group {} was not reduced by the last backward (a backward "
                    "that did not announce its stages, GradBuffer::stage_done)",
                    b, g);
  }
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
