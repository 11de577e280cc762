// Where every parameter, gradient and optimizer-state element of one rank lives (docs/model.md §12,
// docs/parallelism.md). The same layout serves one process and N ranks: with one rank every
// domain's data-parallel degree is 1 and each rank owns everything.
//
// - Domain: the routed expert stacks are split over the EP ranks (this rank holds experts
//   [ep_rank·E/EP, (ep_rank+1)·E/EP) of every MoE layer) and replicated over the expert-DP group
//   (the world/EP ranks with the same ep_rank); every other parameter is replicated on every rank
//   (its DP group is the world).
// - Group: the trainable parameters of one (domain, compute dtype) pair share one flat buffer per
//   kind of data (compute weights, gradients, optimizer state), in the same element order, so a
//   bucket of gradients and the bucket of weights it updates are the same element range.
// - Order: the order in which the backward finishes gradients (head and final norm, then layers
//   from the last to the first, then the embedding), so buckets become complete front to back and
//   their reduce-scatter can start while the backward goes on.
// - Bucket: a contiguous element range of a group, padded to a multiple of dp·kElemAlign, so that
//   each of the dp ranks owns one equal, aligned chunk of it (ZeRO-1: that rank reduces, clips and
//   updates those elements and all-gathers the new weights of the chunk to the others).
// - Slot (ZeRO-2, zero_stage 2, groups with dp > 1 only): the group has no full gradient buffer; the
//   backward writes each bucket into one of a few reused bucket-sized slots, and every backward
//   reduce-scatters each bucket from its slot once the bucket is complete. The slots are assigned
//   once, from the stages at which each bucket is first written and complete (assign_grad_slots).
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/config.h"
#include "model/parameters.h"
#include "model/precision_plan.h"

namespace diffmoe {

enum class ParamDomain : uint8_t { kDense, kExpert };

struct ParallelLayoutOptions {
  int64_t ep_size = 1, ep_rank = 0;  // expert parallel degree and this rank's place in it
  int64_t dense_dp = 1;              // ranks that replicate the dense parameters (the world size)
  int64_t expert_dp = 1;             // ranks that replicate this rank's experts (world / ep_size)
  // Gradient bucket size in elements; 0 = one bucket per group (zero_stage 1) or kZero2BucketElems
  // (zero_stage 2: the slots are bucket-sized).
  int64_t bucket_elems = 0;
  int zero_stage = 1;      // 1: full gradient buffers; 2: groups with dp > 1 in bucket slots (parallel.zero_stage)
  int64_t grad_slots = 0;  // zero_stage 2: slots per slotted group; 0 = automatic (auto_grad_slots)

  static constexpr int64_t kZero2BucketElems = 40'000'000;  // the default bucket of zero_stage 2 (160 MB of f32)
};

// ZeRO-2 slot assignment of one group's buckets (docs/parallelism.md §4). A bucket is open from the
// backward stage that first writes it (open) to the stage after which it is complete (close); its
// slot is taken at the start of `open` and given back after `close` (its reduce-scatter still
// reads it until the slot is next taken). Buckets are taken at each stage in layout order; a bucket
// takes the free slot given back longest ago (never used first), so that a reduce-scatter in
// flight is waited for as late as possible.
struct BucketSpan {
  int open = 0, close = 0;
};
// The slot of each bucket, with n_slots slots. Throws naming `what`, the bucket and the open
// buckets when a bucket needs a slot while all n_slots hold incomplete buckets.
std::vector<int> assign_grad_slots(const std::vector<BucketSpan>& spans, int64_t n_slots, const std::string& what);
// The automatic slot count: at any stage, the buckets open during it plus those completed at the
// end of the stage before (their reduce-scatter overlaps this stage); at most one per bucket.
int64_t auto_grad_slots(const std::vector<BucketSpan>& spans);

class ParamLayout {
 public:
  // Offsets, bucket lengths and chunks are multiples of this many elements (512 bytes of f32).
  static constexpr int64_t kElemAlign = 128;

  struct Entry {
    ParamSpec spec;             // the global parameter (name, global shape, kind, init)
    Shape shape;                // this rank's tensor (expert stacks: its own experts only)
    int64_t global_offset = 0;  // element of the global tensor (row-major) where this one starts
    int stage = 0;              // backward stage after which its gradient is final (n_stages() in all)
    bool grad_added = false;    // the backward only adds into its gradient: zero_grads must zero it
    int first_stage = 0;        // backward stage that first writes its gradient (stage; a tied embedding: 0)
    size_t group = 0;           // trainable: index into groups(); buffers: unused
    int64_t offset = 0;         // first element in its group's buffer
  };
  struct Bucket {
    int64_t offset = 0, length = 0;                          // element range in the group's buffer (padding included)
    size_t first = 0, end = 0;                               // its entries: group.entries[first, end)
    int stage = 0;                                           // complete once the backward has finished this stage
    int open_stage = 0;                                      // first written in this stage (min first_stage)
    int slot = -1;                                           // ZeRO-2: its slot in the group (Group::slot_len)
    int64_t chunk(int64_t dp) const { return length / dp; }  // elements each of the dp ranks owns
  };
  struct Group {
    ParamDomain domain = ParamDomain::kDense;
    DType compute = DType::kF32;  // dtype of the compute weights (gradients and masters: master dtype)
    int64_t dp = 1;               // ranks sharing (and sharding the state of) this group
    int64_t length = 0;           // elements, padding included
    std::vector<size_t> entries;  // indices into entries(), in buffer order
    std::vector<Bucket> buckets;
    // ZeRO-2 (zero_stage 2 and dp > 1): the length of each of the group's gradient slots (the
    // longest bucket it holds); empty: the group's gradients live in one full buffer.
    std::vector<int64_t> slot_len;
    bool slotted() const { return !slot_len.empty(); }
  };

  ParamLayout(const ModelConfig& cfg, const PrecisionPlan& plan, const ParallelLayoutOptions& opt);

  const std::vector<Entry>& entries() const { return entries_; }  // trainable, in layout order
  const std::vector<Entry>& buffers() const { return buffers_; }  // non-trainable (balancing biases)
  const std::vector<Group>& groups() const { return groups_; }
  const Entry* find(const std::string& name) const;  // trainable or buffer; nullptr if absent
  const ParallelLayoutOptions& options() const { return opt_; }
  int n_stages() const { return n_stages_; }
  // Stage numbers (docs/model.md §1 order reversed): 0 = head and final norm, n_layers - l = layer l,
  // n_layers + 1 = the embedding.
  int stage_of_layer(int64_t l) const { return static_cast<int>(n_layers_ - l); }

 private:
  ParallelLayoutOptions opt_;
  int64_t n_layers_ = 0;
  int n_stages_ = 0;
  std::vector<Entry> entries_, buffers_;
  std::vector<Group> groups_;
  std::unordered_map<std::string, std::pair<bool, size_t>> index_;  // name -> (trainable, index)
};

// The backward writes p's gradient with a GEMM at beta = 0 first (LayerContext::dw_beta), before
// anything adds to it: every GEMM weight, the router gate, and a tied embedding table (the head's
// dW GEMM runs first in the backward, the embedding scatter-add last). Norm weights, λ vectors and
// an untied embedding table are only added into.
bool grad_written_by_gemm(const ParamSpec& p, bool tied_embeddings);

}  // namespace diffmoe
