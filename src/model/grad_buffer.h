// The model's gradients and their bookkeeping (docs/style.md habit 2: weight gradients accumulate):
// one flat buffer per ParamLayout group (master dtype: f32, or f64 for gradient checks), zeroing,
// and the notice that a bucket's gradients are final, which data parallelism uses to start the
// bucket's reduce-scatter while the backward goes on.
//
// Zeroing without a pass over every byte: most of the bytes belong to GEMM weights, whose first
// gradient GEMM after zero() runs at beta = 0 (LayerContext::dw_beta) and overwrites them; zero()
// fills only the gradients that the backward adds into (norms, λ vectors, an untied embedding;
// ParamLayout::Entry::grad_added), one fill per run of them in layout order, and marks the rest
// stale. Reading the gradients through get() or buffers() before the next backward has written
// them would see stale values: materialize() zeroes them first (Model::grads does).
//
// ZeRO-2 (parallel.zero_stage 2; docs/parallelism.md §4): a group with dp > 1 has no full buffer.
// Its buckets live in the group's few reused slots (ParamLayout::Group::slot_len, Bucket::slot):
// before the backward stage that first writes a bucket (stage_begin), the slot's previous
// reduction is completed (the slot-reuse notice) and the bucket's added-into gradients and padding
// are zeroed in it; its GEMM-written gradients are written at beta = 0 in every backward
// (gemm_beta). get() of such a gradient is valid only while its bucket is open (from its first
// stage to its last); elsewhere it throws: the summed gradients are the data-parallel layer's
// reduced chunks. Each slot also has an accumulation chunk (slot length / dp) for the
// reduce-scatter of a later micro-batch, which the data-parallel layer adds into the reduced chunk.
#pragma once
#include <functional>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "model/layout_buffers.h"

namespace diffmoe {

class GradBuffer {
 public:
  GradBuffer(const ParamLayout& layout, DType dtype, Allocator& alloc);
  // The bytes the constructor allocates for `layout` in `dtype`, planned without allocating
  // (memory planning).
  struct Footprint {
    uint64_t full = 0;       // the full buffers of the groups without slots
    uint64_t slots = 0;      // ZeRO-2: the slots and their accumulation chunks
    int64_t n_slots = 0;     // ZeRO-2: slots over every slotted group
    uint64_t unsharded = 0;  // what full buffers of every group would take (zero_stage 1)
    uint64_t bytes() const { return full + slots; }
  };
  static Footprint plan(const ParamLayout& layout, DType dtype);

  bool has(std::string_view name) const { return buf_.has(name); }
  // The gradient of a trainable parameter; a slotted group's only while its bucket is open.
  Tensor get(std::string_view name) const;
  // The full buffers (a slotted group's views and ranges throw: it has none).
  const LayoutBuffers& buffers() const { return buf_; }
  const ParamLayout& layout() const { return buf_.layout(); }
  size_t bytes() const;  // every allocation: full buffers, slots, accumulation chunks

  // Every gradient reads as zero to the next backward (which then writes the stale ones at beta = 0)
  // and, through materialize(), to anyone else. Slotted groups: the next backward is the first of
  // a step (backwards_since_zero() == 0).
  void zero(Backend& be, Context ctx);
  // Whether the GEMM-written gradients of the full buffers still hold values from before zero()
  // (the next backward overwrites them), and the fill that makes them read as zero now.
  bool stale() const { return stale_; }
  void materialize(Backend& be, Context ctx);
  // The backward has written every gradient: nothing is stale any more.
  void backward_written() {
    stale_ = false;
    ++backwards_;
  }
  // Backwards completed since zero(): 0 during the first backward of a step.
  int64_t backwards_since_zero() const { return backwards_; }
  size_t zero_bytes() const;  // bytes zero() fills (benchmarks, tests)
  // beta of the GEMM that writes the weight gradient dw (LayerContext::dw_beta_for): 0 where dw lies
  // in a slot (written anew in every backward) or the full buffers are stale, else 1 (accumulate).
  double gemm_beta(const Tensor& dw) const;

  // Called (in bucket order) for every bucket that stage_done(stage) completes.
  using BucketReady = std::function<void(size_t group, size_t bucket, Context ctx)>;
  void set_on_bucket_ready(BucketReady fn) { on_ready_ = std::move(fn); }
  // ZeRO-2: called before slot `slot` of `group` is written again, so that the reduction that reads
  // it (and its accumulation chunk) is complete on ctx's stream first.
  using SlotReuse = std::function<void(size_t group, int slot, Context ctx)>;
  void set_on_slot_reuse(SlotReuse fn) { on_reuse_ = std::move(fn); }
  // The backward calls this before each stage (ParamLayout::stage_of_layer) writes gradients: the
  // slotted buckets first written in it take their slots (zeroed where the backward adds).
  void stage_begin(int stage, Backend& be, Context ctx);
  // The backward calls this after each stage; buckets whose last stage it is are then final for
  // this backward (a slotted bucket is closed: get() of its gradients throws until it opens again).
  void stage_done(int stage, Context ctx);
  // ZeRO-2: bucket b of slotted group g in its slot (length: the bucket's), and the accumulation
  // chunk of a slot (length: `count` ≤ the slot's length / dp).
  Tensor slot_bucket(size_t g, size_t b) const;
  Tensor slot_chunk(size_t g, int slot, int64_t count) const;

 private:
  struct Run {
    size_t group;
    int64_t offset, count;
  };
  // Appends [from, to) of group g to runs: into the last run when that is of g and at most a small
  // gap before `from` (one fill instead of two), else as a new run; nothing when empty.
  static void add_run(std::vector<Run>& runs, size_t g, int64_t from, int64_t to);
  LayoutBuffers buf_;
  std::vector<Arena> slots_;                       // per group: "slot.k" and "chunk.k" (slotted groups only)
  std::vector<std::vector<Tensor>> slot_, chunk_;  // their views, per group and slot
  std::vector<Run> zero_runs_;                     // the added-into gradients (and small gaps between them)
  std::vector<std::vector<Run>> bucket_runs_;  // per bucket of a slotted group (by flat index): offsets in the bucket
  std::vector<size_t> bucket_base_;            // per group: its first bucket's flat index
  std::vector<size_t> entry_bucket_;           // per trainable entry: its bucket in its group
  std::vector<char> open_;                     // per bucket (flat index): slotted and open now
  bool stale_ = false;
  int64_t backwards_ = 0;
  BucketReady on_ready_;
  SlotReuse on_reuse_;
};

}  // namespace diffmoe
