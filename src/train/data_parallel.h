// ZeRO-1 data parallelism over the ParamLayout groups (docs/parallelism.md, docs/model.md §12).
//
// One step on every rank, each on its own micro-batches of the global batch:
//   forward/backward × grad_accum (backward scale 1/(grad_accum·world): the sum over the ranks is
//     the mean over the global batch's micro-batches, as one rank with world·grad_accum-way
//     accumulation computes it);
//   in the last backward, each gradient bucket, once complete (GradBuffer::stage_done), starts its
//     reduce-scatter: the sum over the group's ranks of this rank's chunk lands in the optimizer's
//     reduced chunk (AdamW::reduced_chunk) while the backward goes on (NCCL: on the communicator's
//     stream; MPI, Gloo: in the background);
//   finish_gradients(): the compute stream waits for every reduce-scatter;
//   global_grad_sq(): Σg² over this rank's chunks, summed over the world: the global norm;
//   reduce_expert_counts(): the expert counts of the global batch (docs/model.md §5's bias update);
//   AdamW::apply on this rank's chunks (masters, moments, new compute weights of the chunk);
//   gather_weights(): every bucket's chunks all-gathered, so every rank holds all compute weights.
// Dense groups are reduced over the world; expert groups over the expert-DP ranks (the ranks that
// hold the same experts). A group whose dp is 1 is not communicated at all, so one rank costs nothing.
//
// ZeRO-2 (parallel.zero_stage 2; the groups with dp > 1 have gradient slots, GradBuffer): EVERY
// backward reduce-scatters each bucket from its slot once complete. The first backward since
// zero_grads writes the reduced chunk; a later one (gradient accumulation) reduce-scatters into the
// slot's accumulation chunk, which is added into the reduced chunk once the reduce-scatter is done.
// That completion (the compute stream waits for the collective: Work::wait(ctx), no host wait on
// CUDA) and the add happen when the slot is next taken (GradBuffer's slot-reuse notice) or in
// finish_gradients(), so the reduce-scatter overlaps the backward stages in between. The reduced
// chunks then hold what ZeRO-1 reduces once from the accumulated gradients (up to the order of the
// sums), and everything after finish_gradients() is the same.
#pragma once
#include <vector>

#include "dist/communicator.h"
#include "train/optimizer.h"

namespace diffmoe {

class DataParallel {
 public:
  // world: every rank (dense groups, norms, counts, metrics). expert_dp: the ranks with this rank's
  // experts (expert groups). Both outlive this object; either may be a single-rank communicator.
  DataParallel(Model& model, AdamW& opt, dist::Communicator& world, dist::Communicator& expert_dp);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int world_size() const { return world_->size(); }
  int rank() const { return world_->rank(); }
  dist::Communicator& world() const { return *world_; }

  // Whether the next backward is the step's last: only then do completed buckets start their
  // reduce-scatter (with gradient accumulation the earlier backwards only accumulate locally).
  // ZeRO-2 slotted groups reduce in every backward and ignore it.
  void set_last_micro_batch(bool last) { last_micro_ = last; }
  // After the last backward: every bucket's reduce-scatter issued (any the backward did not issue,
  // e.g. after a backward without bucket notices; a slotted bucket cannot be, and throws), and ctx's
  // later work ordered after all of them (and after the slots' accumulation adds).
  void finish_gradients(Context ctx);
  // opt.compute_grad_sq() summed over the world into opt.grad_sq().
  void global_grad_sq(Context ctx);
  // Every MoE layer's expert counts summed over the world, in place.
  void reduce_expert_counts(Context ctx);
  // After opt.apply(): the compute weights of every rank's chunks to every rank.
  void gather_weights(Context ctx);
  // Host values summed over the world (a device round trip; logging and evaluation only).
  std::vector<double> sum(Context ctx, const std::vector<double>& values);

 private:
  dist::Communicator& comm_for(size_t group) const;
  void reduce_bucket(size_t group, size_t bucket, Context ctx);
  // ZeRO-2: bucket's reduce-scatter from its slot, and the completion of a slot's last one.
  void reduce_slot(size_t group, size_t bucket, Context ctx);
  void complete_slot(size_t group, int slot, Context ctx);

  // ZeRO-2: the reduction that last read a slot, until the slot is taken again.
  struct SlotWork {
    dist::WorkPtr work;
    Tensor add_from, add_to;  // defined: add the accumulation chunk into the reduced chunk after the work
  };

  Model* model_;
  AdamW* opt_;
  dist::Communicator* world_;
  dist::Communicator* expert_dp_;
  GradBuffer* grads_;                  // the model's gradients (Model::grads() would zero stale ones mid-backward)
  const LayoutBuffers* grad_buffers_;  // their full buffers
  bool last_micro_ = true;
  std::vector<std::vector<bool>> issued_;  // per group and bucket: its reduce-scatter of this step was issued
  std::vector<dist::WorkPtr> pending_;
  std::vector<std::vector<SlotWork>> slot_work_;  // per group and slot (slotted groups)
  // ZeRO-2: per group and bucket, the backward (GradBuffer::backwards_since_zero) that last reduced it.
  std::vector<std::vector<int64_t>> reduced_in_;
  Arena scalars_;  // "sum": the device buffer of sum()
};

}  // namespace diffmoe
