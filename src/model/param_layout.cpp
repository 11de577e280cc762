#include "model/param_layout.h"

#include <algorithm>
#include <charconv>

#include "core/error.h"

namespace diffmoe {

bool grad_written_by_gemm(const ParamSpec& p, bool tied_embeddings) {
  return is_gemm_weight(p) || p.kind == ParamKind::kGate || (p.kind == ParamKind::kEmbedding && tied_embeddings);
}

namespace {

// The layer of "layers.{l}.<...>", or -1 for the embedding, the final norm and the head.
int64_t layer_of(const std::string& name) {
  constexpr std::string_view kPrefix = "layers.";
  if (name.rfind(kPrefix, 0) != 0) return -1;
  int64_t l = -1;
  const char* first = name.data() + kPrefix.size();
  std::from_chars(first, name.data() + name.size(), l);
  return l;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

ParamLayout::ParamLayout(const ModelConfig& cfg, const PrecisionPlan& plan, const ParallelLayoutOptions& opt)
    : opt_(opt), n_layers_(cfg.n_layers), n_stages_(static_cast<int>(cfg.n_layers) + 2) {
  DIFFMOE_CHECK(opt.ep_size >= 1 && opt.ep_rank >= 0 && opt.ep_rank < opt.ep_size,
                "[layout] expert-parallel rank {} of {}", opt.ep_rank, opt.ep_size);
  DIFFMOE_CHECK(opt.dense_dp >= 1 && opt.expert_dp >= 1 && opt.bucket_elems >= 0, "[layout] dp {} / {}, bucket {}",
                opt.dense_dp, opt.expert_dp, opt.bucket_elems);
  DIFFMOE_CHECK(cfg.n_routed_experts % opt.ep_size == 0 || cfg.n_dense_layers == cfg.n_layers,
                "parallel.expert: {} expert-parallel ranks do not divide model.n_routed_experts = {}", opt.ep_size,
                cfg.n_routed_experts);
  const int64_t e_local = cfg.n_routed_experts / opt.ep_size;

  std::vector<Entry> trainable;
  for (const ParamSpec& p : parameter_specs(cfg)) {
    Entry e;
    e.spec = p;
    e.shape = p.shape;
    const int64_t l = layer_of(p.name);
    if (p.kind == ParamKind::kExpert) {  // [E, out, in] -> this rank's [E/EP, out, in]
      e.shape = Shape{e_local, p.shape[1], p.shape[2]};
      e.global_offset = opt.ep_rank * e.shape.numel();
    }
    // Backward order (Model::backward): head, final norm, layers L-1 .. 0, embedding last.
    e.stage = p.kind == ParamKind::kEmbedding ? n_stages_ - 1 : l < 0 ? 0 : stage_of_layer(l);
    e.grad_added = p.trainable() && !grad_written_by_gemm(p, cfg.tie_embeddings);
    if (p.trainable()) trainable.push_back(std::move(e));
    else buffers_.push_back(std::move(e));
  }
  // Stage order; within a stage the added-into gradients first, so that zeroing them is one fill
  // per stage and group, not one per tensor. Otherwise the docs/model.md §8 order.
  std::stable_sort(trainable.begin(), trainable.end(), [](const Entry& a, const Entry& b) {
    if (a.stage != b.stage) return a.stage < b.stage;
    return a.grad_added && !b.grad_added;
  });

  // Groups by (domain, compute dtype), in order of first appearance.
  for (Entry& e : trainable) {
    const ParamDomain dom = e.spec.kind == ParamKind::kExpert ? ParamDomain::kExpert : ParamDomain::kDense;
    const DType dt = plan.compute_dtype(e.spec);
    size_t g = 0;
    while (g < groups_.size() && !(groups_[g].domain == dom && groups_[g].compute == dt)) ++g;
    if (g == groups_.size()) {
      Group grp;
      grp.domain = dom;
      grp.compute = dt;
      grp.dp = dom == ParamDomain::kExpert ? opt.expert_dp : opt.dense_dp;
      groups_.push_back(std::move(grp));
    }
    e.group = g;
  }
  entries_ = std::move(trainable);
  for (size_t i = 0; i < entries_.size(); ++i) groups_[entries_[i].group].entries.push_back(i);

  // Offsets and buckets. A bucket closes once it holds bucket_elems elements (or at the end); its
  // length is padded so that dp ranks own equal chunks of kElemAlign multiples.
  for (Group& g : groups_) {
    int64_t off = 0;
    Bucket b{.offset = 0, .first = 0};
    auto close = [&](size_t end) {
      b.end = end;
      b.length = round_up(off - b.offset, g.dp * kElemAlign);
      off = b.offset + b.length;
      g.buckets.push_back(b);
      b = Bucket{.offset = off, .first = end};
    };
    for (size_t k = 0; k < g.entries.size(); ++k) {
      Entry& e = entries_[g.entries[k]];
      e.offset = off;
      off = round_up(off + e.shape.numel(), kElemAlign);
      b.stage = std::max(b.stage, e.stage);
      if (opt.bucket_elems > 0 && off - b.offset >= opt.bucket_elems && k + 1 < g.entries.size()) close(k + 1);
    }
    close(g.entries.size());
    g.length = off;
  }
  for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].spec.name, std::make_pair(true, i));
  for (size_t i = 0; i < buffers_.size(); ++i) index_.emplace(buffers_[i].spec.name, std::make_pair(false, i));
}

const ParamLayout::Entry* ParamLayout::find(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return nullptr;
  return it->second.first ? &entries_[it->second.second] : &buffers_[it->second.second];
}

}  // namespace diffmoe
