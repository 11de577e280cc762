#include "model/grad_buffer.h"

#include <fmt/format.h>

namespace diffmoe {

namespace {

// A GEMM-written gradient this small between two added-into runs is zeroed with them (its next
// GEMM overwrites it anyway): one fill instead of two (the router gate between the norms).
constexpr int64_t kMergeGapElems = int64_t{1} << 18;

// Group g's slots and accumulation chunks, planned.
Arena plan_slots(const ParamLayout::Group& g, DType dtype) {
  Arena a;
  for (size_t k = 0; k < g.slot_len.size(); ++k) {
    a.add(fmt::format("slot.{}", k), Shape{g.slot_len[k]}, dtype);
    a.add(fmt::format("chunk.{}", k), Shape{g.slot_len[k] / g.dp}, dtype);
  }
  return a;
}

LayoutBuffers plan_full(const ParamLayout& layout, DType dtype) {
  // One dtype for every group, no buffers (the balancing biases have no gradient).
  return LayoutBuffers(layout, std::vector<DType>(layout.groups().size(), dtype), DType::kU8);
}

}  // namespace

void GradBuffer::add_run(std::vector<Run>& runs, size_t g, int64_t from, int64_t to) {
  if (to <= from) return;
  if (!runs.empty() && runs.back().group == g && from - (runs.back().offset + runs.back().count) <= kMergeGapElems)
    runs.back().count = to - runs.back().offset;
  else runs.push_back(Run{.group = g, .offset = from, .count = to - from});
}

GradBuffer::Footprint GradBuffer::plan(const ParamLayout& layout, DType dtype) {
  const LayoutBuffers full = plan_full(layout, dtype);
  Footprint f;
  for (size_t g = 0; g < layout.groups().size(); ++g) {
    const ParamLayout::Group& grp = layout.groups()[g];
    f.unsharded += full.group_arena(g).bytes();
    if (grp.slotted()) {
      f.slots += plan_slots(grp, dtype).bytes();
      f.n_slots += static_cast<int64_t>(grp.slot_len.size());
    } else {
      f.full += full.group_arena(g).bytes();
    }
  }
  return f;
}

GradBuffer::GradBuffer(const ParamLayout& layout, DType dtype, Allocator& alloc) : buf_(plan_full(layout, dtype)) {
  const auto& groups = layout.groups();
  std::vector<bool> skip(groups.size(), false);
  for (size_t g = 0; g < groups.size(); ++g) skip[g] = groups[g].slotted();
  buf_.allocate(alloc, skip);
  slots_.resize(groups.size());
  slot_.resize(groups.size());
  chunk_.resize(groups.size());
  entry_bucket_.assign(layout.entries().size(), 0);
  size_t n_buckets = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const ParamLayout::Group& grp = groups[g];
    bucket_base_.push_back(n_buckets);
    n_buckets += grp.buckets.size();
    for (size_t b = 0; b < grp.buckets.size(); ++b)
      for (size_t k = grp.buckets[b].first; k < grp.buckets[b].end; ++k) entry_bucket_[grp.entries[k]] = b;
    if (grp.slotted()) {
      slots_[g] = plan_slots(grp, dtype);
      slots_[g].allocate(alloc);
      for (size_t k = 0; k < grp.slot_len.size(); ++k) {
        slot_[g].push_back(slots_[g].get(fmt::format("slot.{}", k)));
        chunk_[g].push_back(slots_[g].get(fmt::format("chunk.{}", k)));
      }
      continue;
    }
    // Each added-into entry covers [offset, next entry's offset): its padding is zero anyway.
    for (size_t k = 0; k < grp.entries.size(); ++k) {
      const ParamLayout::Entry& e = layout.entries()[grp.entries[k]];
      if (!e.grad_added) continue;
      const int64_t end = k + 1 < grp.entries.size() ? layout.entries()[grp.entries[k + 1]].offset : grp.length;
      add_run(zero_runs_, g, e.offset, end);
    }
  }
  // A slotted bucket's fills: everything but its GEMM-written gradients (the added-into ones, and the
  // padding, which earlier buckets in the slot may have written and the reduce-scatter sums).
  bucket_runs_.resize(n_buckets);
  open_.assign(n_buckets, 0);
  for (size_t g = 0; g < groups.size(); ++g) {
    const ParamLayout::Group& grp = groups[g];
    if (!grp.slotted()) continue;
    for (size_t b = 0; b < grp.buckets.size(); ++b) {
      const ParamLayout::Bucket& bk = grp.buckets[b];
      std::vector<Run>& runs = bucket_runs_[bucket_base_[g] + b];
      int64_t pos = 0;  // offset in the bucket up to which the runs are decided
      for (size_t k = bk.first; k < bk.end; ++k) {
        const ParamLayout::Entry& e = layout.entries()[grp.entries[k]];
        if (e.grad_added) continue;
        add_run(runs, g, pos, e.offset - bk.offset);
        pos = e.offset - bk.offset + e.shape.numel();
      }
      add_run(runs, g, pos, bk.length);
    }
  }
}

size_t GradBuffer::bytes() const {
  size_t n = 0;
  for (size_t g = 0; g < layout().groups().size(); ++g)
    n += layout().groups()[g].slotted() ? slots_[g].bytes() : buf_.group_arena(g).bytes();
  return n;
}

Tensor GradBuffer::get(std::string_view name) const {
  const ParamLayout::Entry* e = layout().find(std::string(name));
  DIFFMOE_CHECK(e != nullptr, "[model] no parameter named '{}'", name);
  const ParamLayout::Group* g = e->spec.trainable() ? &layout().groups()[e->group] : nullptr;
  if (g == nullptr || !g->slotted()) return buf_.get(name);
  const size_t i = static_cast<size_t>(e - layout().entries().data());
  const size_t b = entry_bucket_[i];
  DIFFMOE_CHECK(open_[bucket_base_[e->group] + b],
                "[model] the gradient of '{}' is not held in full (parallel.zero_stage 2 shards it over {} ranks): "
                "it exists only in the backward stages that write it; read the reduced chunks instead",
                name, g->dp);
  const ParamLayout::Bucket& bk = g->buckets[b];
  const int64_t at = e->offset - bk.offset;
  return slot_[e->group][static_cast<size_t>(bk.slot)].rows(at, at + e->shape.numel()).reshape(e->shape);
}

Tensor GradBuffer::slot_bucket(size_t g, size_t b) const {
  const ParamLayout::Bucket& bk = layout().groups()[g].buckets[b];
  DIFFMOE_CHECK(layout().groups()[g].slotted(), "[model] group {} has no gradient slots", g);
  return slot_[g][static_cast<size_t>(bk.slot)].rows(0, bk.length);
}

Tensor GradBuffer::slot_chunk(size_t g, int slot, int64_t count) const {
  const Tensor& c = chunk_[g][static_cast<size_t>(slot)];
  DIFFMOE_CHECK(count <= c.numel(), "[model] {} elements exceed the accumulation chunk of slot {} ({})", count, slot,
                c.numel());
  return c.rows(0, count);
}

void GradBuffer::zero(Backend& be, Context ctx) {
  for (const Run& r : zero_runs_) be.fill(ctx, {.out = buf_.range(r.group, r.offset, r.count), .value = 0.0});
  size_t zeroed = 0;
  for (const Run& r : zero_runs_) zeroed += static_cast<size_t>(r.count);
  size_t total = 0;
  for (const ParamLayout::Group& g : layout().groups())
    if (!g.slotted()) total += static_cast<size_t>(g.length);
  stale_ = zeroed < total;
  backwards_ = 0;
}

void GradBuffer::materialize(Backend& be, Context ctx) {
  if (!stale_) return;
  for (size_t g = 0; g < buf_.n_groups(); ++g)
    if (!layout().groups()[g].slotted()) be.fill(ctx, {.out = buf_.group(g), .value = 0.0});
  stale_ = false;
}

size_t GradBuffer::zero_bytes() const {
  size_t n = 0;
  for (const Run& r : zero_runs_) n += static_cast<size_t>(r.count) * dtype_size(buf_.group(r.group).dtype);
  return n;
}

double GradBuffer::gemm_beta(const Tensor& dw) const {
  if (stale_) return 0.0;
  const char* p = static_cast<const char*>(dw.data);
  for (const Arena& a : slots_) {
    if (a.bytes() == 0 || a.base() == nullptr) continue;
    const char* base = static_cast<const char*>(a.base());
    if (p >= base && p < base + a.bytes()) return 0.0;
  }
  return 1.0;
}

void GradBuffer::stage_begin(int stage, Backend& be, Context ctx) {
  const auto& groups = layout().groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    if (!groups[g].slotted()) continue;
    for (size_t b = 0; b < groups[g].buckets.size(); ++b) {
      const ParamLayout::Bucket& bk = groups[g].buckets[b];
      if (bk.open_stage != stage) continue;
      if (on_reuse_) on_reuse_(g, bk.slot, ctx);
      const Tensor s = slot_bucket(g, b);
      for (const Run& r : bucket_runs_[bucket_base_[g] + b])
        be.fill(ctx, {.out = s.rows(r.offset, r.offset + r.count), .value = 0.0});
      open_[bucket_base_[g] + b] = 1;
    }
  }
}

void GradBuffer::stage_done(int stage, Context ctx) {
  const auto& groups = layout().groups();
  for (size_t g = 0; g < groups.size(); ++g)
    for (size_t b = 0; b < groups[g].buckets.size(); ++b)
      if (groups[g].buckets[b].stage == stage) {
        if (on_ready_) on_ready_(g, b, ctx);
        open_[bucket_base_[g] + b] = 0;
      }
}

}  // namespace diffmoe
