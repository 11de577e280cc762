#include "model/param_layout.h"

#include <algorithm>
#include <charconv>

#include <fmt/format.h>

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

std::vector<int> assign_grad_slots(const std::vector<BucketSpan>& spans, int64_t n_slots, const std::string& what) {
  DIFFMOE_CHECK(n_slots >= 1, "{}: {} gradient slots", what, n_slots);
  int last = 0;
  for (const BucketSpan& s : spans) {
    DIFFMOE_CHECK(s.open >= 0 && s.open <= s.close, "{}: a bucket open from stage {} to {}", what, s.open, s.close);
    last = std::max(last, s.close);
  }
  std::vector<int> slot(spans.size(), -1);
  std::vector<int> holder(static_cast<size_t>(n_slots), -1);      // the open bucket in each slot, or -1
  std::vector<int> given_back(static_cast<size_t>(n_slots), -1);  // stage after which it was given back
  for (int st = 0; st <= last; ++st) {
    for (size_t b = 0; b < spans.size(); ++b) {
      if (spans[b].open != st) continue;
      int best = -1;
      for (int k = 0; k < static_cast<int>(n_slots); ++k)
        if (holder[static_cast<size_t>(k)] < 0 &&
            (best < 0 || given_back[static_cast<size_t>(k)] < given_back[static_cast<size_t>(best)]))
          best = k;
      if (best < 0) {
        std::string open;
        for (int h : holder) open += fmt::format("{}{}", open.empty() ? "" : ", ", h);
        DIFFMOE_FAIL(
            "{}: gradient bucket {} (stages {}..{}) needs a slot while all {} slots hold incomplete buckets ({}); "
            "raise parallel.grad_slots (0 = automatic) or parallel.bucket_size",
            what, b, spans[b].open, spans[b].close, n_slots, open);
      }
      holder[static_cast<size_t>(best)] = static_cast<int>(b);
      slot[b] = best;
    }
    for (size_t b = 0; b < spans.size(); ++b)
      if (spans[b].close == st) {
        holder[static_cast<size_t>(slot[b])] = -1;
        given_back[static_cast<size_t>(slot[b])] = st;
      }
  }
  return slot;
}

int64_t auto_grad_slots(const std::vector<BucketSpan>& spans) {
  int last = 0;
  for (const BucketSpan& s : spans) last = std::max(last, s.close);
  int64_t most = 0;
  for (int st = 0; st <= last; ++st) {
    int64_t live = 0;
    for (const BucketSpan& s : spans) live += (s.open <= st && st <= s.close) || s.close == st - 1 ? 1 : 0;
    most = std::max(most, live);
  }
  return std::max<int64_t>(1, std::min(most, static_cast<int64_t>(spans.size())));
}

ParamLayout::ParamLayout(const ModelConfig& cfg, const PrecisionPlan& plan, const ParallelLayoutOptions& opt)
    : opt_(opt), n_layers_(cfg.n_layers), n_stages_(static_cast<int>(cfg.n_layers) + 2) {
  DIFFMOE_CHECK(opt.ep_size >= 1 && opt.ep_rank >= 0 && opt.ep_rank < opt.ep_size,
                "[layout] expert-parallel rank {} of {}", opt.ep_rank, opt.ep_size);
  DIFFMOE_CHECK(opt.dense_dp >= 1 && opt.expert_dp >= 1 && opt.bucket_elems >= 0, "[layout] dp {} / {}, bucket {}",
                opt.dense_dp, opt.expert_dp, opt.bucket_elems);
  DIFFMOE_CHECK(opt.zero_stage == 1 || opt.zero_stage == 2, "parallel.zero_stage: expected 1 or 2, got {}",
                opt.zero_stage);
  // The expert-DP ranks are a subset of the world (the ranks with this rank's experts).
  DIFFMOE_CHECK(opt.expert_dp <= opt.dense_dp, "[layout] expert-data-parallel degree {} above the dense one {}",
                opt.expert_dp, opt.dense_dp);
  DIFFMOE_CHECK(opt.grad_slots >= 0, "parallel.grad_slots: need 0 (automatic) or more, got {}", opt.grad_slots);
  const int64_t bucket_elems =
      opt.bucket_elems == 0 && opt.zero_stage == 2 ? ParallelLayoutOptions::kZero2BucketElems : opt.bucket_elems;
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
    // A tied table's gradient is first written by the head's dW GEMM, at the start of the backward.
    e.first_stage = p.kind == ParamKind::kEmbedding && cfg.tie_embeddings ? 0 : e.stage;
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
    const DType dt = plan.compute_dtype(e.spec, dom == ParamDomain::kExpert ? opt.expert_dp : opt.dense_dp);
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
    Bucket b{.offset = 0, .first = 0, .open_stage = n_stages_};
    auto close = [&](size_t end) {
      b.end = end;
      b.length = round_up(off - b.offset, g.dp * kElemAlign);
      off = b.offset + b.length;
      g.buckets.push_back(b);
      b = Bucket{.offset = off, .first = end, .open_stage = n_stages_};
    };
    for (size_t k = 0; k < g.entries.size(); ++k) {
      Entry& e = entries_[g.entries[k]];
      e.offset = off;
      off = round_up(off + e.shape.numel(), kElemAlign);
      b.stage = std::max(b.stage, e.stage);
      b.open_stage = std::min(b.open_stage, e.first_stage);
      if (bucket_elems > 0 && off - b.offset >= bucket_elems && k + 1 < g.entries.size()) close(k + 1);
    }
    close(g.entries.size());
    g.length = off;
  }
  // ZeRO-2: the slots of each data-parallel group, each as long as the longest bucket it holds.
  if (opt.zero_stage == 2) {
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      Group& g = groups_[gi];
      if (g.dp == 1) continue;
      std::vector<BucketSpan> spans;
      for (const Bucket& b : g.buckets) spans.push_back({.open = b.open_stage, .close = b.stage});
      // More slots than buckets would stay unused (and are not allocated): at most one per bucket.
      const int64_t n = opt.grad_slots > 0 ? std::min<int64_t>(opt.grad_slots, static_cast<int64_t>(spans.size()))
                                           : auto_grad_slots(spans);
      const std::vector<int> slot = assign_grad_slots(
          spans, n,
          fmt::format("parallel.zero_stage 2, {} group {}", g.domain == ParamDomain::kExpert ? "expert" : "dense", gi));
      g.slot_len.assign(static_cast<size_t>(n), 0);
      for (size_t b = 0; b < g.buckets.size(); ++b) {
        g.buckets[b].slot = slot[b];
        int64_t& len = g.slot_len[static_cast<size_t>(slot[b])];
        len = std::max(len, g.buckets[b].length);
      }
      // A slot no bucket took (grad_slots above what the layout needs) is not allocated.
      while (!g.slot_len.empty() && g.slot_len.back() == 0) g.slot_len.pop_back();
      for (const int64_t len : g.slot_len) DIFFMOE_CHECK(len > 0, "[layout] an unused gradient slot below a used one");
    }
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
