// AdamW over a Model's parameters, sharded ZeRO-1 style over each parameter group's data-parallel
// ranks (docs/parallelism.md): this rank keeps the f32 masters (for bf16 compute weights) and the
// Adam moments of the elements it owns — one equal chunk of every gradient bucket
// (ParamLayout::Bucket::chunk) — updates them, and writes the new compute weights of that chunk;
// the data-parallel layer all-gathers the chunks. With one rank it owns everything.
//
// Decoupled weight decay on matrices only — never on norms, λ vectors, biases or embeddings
// (ParamSpec::decayed); global-norm gradient clipping; the once-per-step MoE balancing-bias update
// (docs/model.md §5). No host synchronisation: the global norm stays on the device and the AdamW op reads it.
// The moments are stored in the masters' dtype or, with optim.moment_dtype = bf16, in bf16 (the op
// updates them in f32 and rounds to nearest even on store; docs/model.md §7).
// All owned pieces are updated by one adamw_multi call (one launch on CUDA).
#pragma once
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "model/model.h"
#include "train/train_config.h"

namespace diffmoe {

// This rank's index in each domain's data-parallel group (docs/model.md §12): the dense parameters are
// sharded over every rank, the expert stacks over the ranks that hold the same experts.
struct OptimShard {
  int64_t dense_rank = 0;
  int64_t expert_rank = 0;
};

class AdamW {
 public:
  // The part of one parameter this rank owns: elements [local_begin, local_begin + count) of its
  // local tensor, at group_offset in the group's buffers and state_offset in this rank's state.
  struct Piece {
    size_t entry = 0;  // ParamLayout::entries() index
    size_t group = 0;
    int64_t group_offset = 0;
    int64_t local_begin = 0;
    int64_t count = 0;
    int64_t state_offset = 0;
    int64_t global_begin(const ParamLayout& l) const { return l.entries()[entry].global_offset + local_begin; }
  };

  AdamW(Model& model, const OptimConfig& cfg, const OptimShard& shard = {});

  // This rank's pieces and optimizer state for a layout, planned without allocating (memory
  // planning): the constructor allocates exactly `state`. Its views: per group g "m.g<g>" and
  // "v.g<g>" (the Adam moments of the owned chunks, in moment_dtype), "master.g<g>" where the
  // group's compute dtype is not master_dtype (the f32 masters of bf16 compute weights), and "grad_sq".
  struct StatePlan {
    std::vector<Piece> pieces;
    std::vector<int64_t> shard_len;                // per group: elements this rank owns
    std::vector<std::vector<int64_t>> chunk_base;  // per group and bucket: its chunk's offset in the state
    Arena state;
  };
  static StatePlan plan_state(const ParamLayout& layout, DType master_dtype, const OptimShard& shard,
                              DType moment_dtype);
  // The moments' dtype for optim.moment_dtype ("f32": the masters' dtype, f32 or the f64 of the
  // reference tests; "bf16"). An error names the key.
  static DType moment_dtype(const std::string& name, DType master_dtype);
  DType moment_dtype() const { return moment_dtype_; }
  // This rank's index among a group's data-parallel ranks (docs/model.md §12).
  static int64_t rank_in(const ParamLayout::Group& group, const OptimShard& shard);

  const std::vector<Piece>& pieces() const { return pieces_; }
  // This rank's index among group g's data-parallel ranks: it owns chunk rank_in(g) of each bucket.
  int64_t rank_in(size_t group) const;
  // Views of a piece's state: the f32 master (for a group whose compute weights are the masters
  // themselves, the compute weights), the moments, the gradient, and the compute weights.
  Tensor master(const Piece& p) const;
  Tensor moment1(const Piece& p) const;
  Tensor moment2(const Piece& p) const;
  Tensor grad(const Piece& p) const;
  // Where the data-parallel layer reduce-scatters bucket b of group g: this rank's chunk of the
  // gradients summed over the group's ranks (a buffer of the optimizer's for a group with dp > 1; the
  // model's gradient chunk itself for dp = 1). grad(p) reads from here.
  Tensor reduced_chunk(size_t group, size_t bucket) const;
  Tensor compute(const Piece& p) const;
  // Whether group g keeps separate f32 masters (its compute weights are bf16).
  bool separate_masters(size_t group) const;

  // The masters of the groups that keep separate ones, from the docs/model.md §6 initialisation (the
  // compute weights come from Model::init_weights; both round the same values).
  void init_masters(uint64_t seed);
  // The same from any values: fill(entry, first, out) writes elements first ... first + out.size() - 1
  // of the entry's global tensor (row-major) into out.
  void set_masters(const std::function<void(const ParamLayout::Entry&, int64_t, std::span<double>)>& fill);
  // Writes the compute weights of the owned chunks from the masters (after loading masters).
  void write_compute_weights(Context ctx);

  // Σ g² into grad_sq(): over the whole gradients with one rank (the expert share from the
  // backward's epilogue where the model has it), else over this rank's owned chunks only — the
  // caller then sums it over the ranks for the global norm.
  void compute_grad_sq(Context ctx);
  Tensor grad_sq() const { return state_.get("grad_sq"); }
  double grad_norm() const;  // downloads grad_sq (a host sync: logging only)
  // With grad_sq() global: clip by the global norm, update every owned piece (masters, moments,
  // compute weights), then the balancing biases from the expert counts (which must be the global
  // batch's). Increments steps_taken().
  void apply(Context ctx, double lr);
  // compute_grad_sq() then apply(): one rank only.
  void step(Context ctx, double lr);

  size_t state_bytes() const { return state_.bytes(); }
  // This rank's state as whole buffers: "master.g<g>" (separate masters only), "m.g<g>", "v.g<g>"
  // (not the gradient scratch).
  std::vector<std::pair<std::string, Tensor>> state_tensors() const;  // masters (where separate), moments, grad_sq
  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  Model& model() const { return *model_; }

 private:
  Model* model_;
  OptimConfig cfg_;
  OptimShard shard_;
  DType moment_dtype_;
  std::vector<Piece> pieces_;
  std::vector<int64_t> shard_len_;                // per group: elements this rank owns
  std::vector<std::vector<int64_t>> chunk_base_;  // per group and bucket: its chunk's offset in the state
  // Per group "m.g<g>", "v.g<g>", "master.g<g>" (separate masters only), "grad.g<g>" (dp > 1 only:
  // the reduced gradient chunks); "grad_sq".
  Arena state_;
  int64_t step_ = 0;
  AdamWMultiArgs multi_;  // apply()'s call, kept so that its entry list is not reallocated per step
};

}  // namespace diffmoe
