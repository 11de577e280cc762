// Batched log-likelihood scoring: rows of (input tokens, target tokens) packed into micro-batches of
// the model's batch shape, one forward per micro-batch, and per row the sum of the log-probabilities
// of its scored targets. Every eval task (multiple choice, perplexity) reduces to rows.
//
// A row of length L ≤ seq is right-padded to seq with pad_id and targets −1 (the causal mask keeps
// padding out of every earlier position, so a padded row scores as it would alone). Targets equal
// to −1 are not scored (the context of a multiple-choice request, a window's overlap). Per row r:
//   logprob_r = −Σ_{t: target_t ≠ −1} (logsumexp(logits_t) − logits_t[target_t])
// computed by the backend's cross_entropy_fwd on the row's [seq, V] slice of the logits (in f64
// per row on the CPU), so nothing of size [batch·seq, V] crosses to the host.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "core/arena.h"
#include "model/model.h"

namespace diffmoe::eval {

struct ScoreRow {
  std::vector<int32_t> inputs;   // [L], 1 ≤ L ≤ the model's seq
  std::vector<int32_t> targets;  // [L]: targets[t] is the token after inputs[t], or −1 (not scored)
};

struct RowScore {
  double logprob = 0;  // Σ log p(targets[t] | inputs[0..t]) over the scored t (≤ 0)
  int64_t tokens = 0;  // scored targets
};

class BatchScorer {
 public:
  // Scores with the model's current batch shape (Model::set_batch_shape); pad_id fills padding.
  BatchScorer(Model& model, int32_t pad_id);

  // Scores every row, model.batch() rows per forward, in order. `progress(done, total)` (optional)
  // is called after each forward with the rows scored so far.
  std::vector<RowScore> score(std::span<const ScoreRow> rows,
                              const std::function<void(int64_t, int64_t)>& progress = {});

  int64_t batch() const { return batch_; }
  int64_t seq() const { return seq_; }
  int64_t forwards() const { return forwards_; }  // forward passes so far

 private:
  Model& model_;
  int32_t pad_id_;
  int64_t batch_, seq_;
  DType sum_dtype_;  // the loss accumulators' dtype: f32 for bf16 logits, else the logits' own
  Arena dev_;        // tokens, targets [batch, seq] i32; sums, counts [batch]
  std::vector<int32_t> host_tokens_, host_targets_;
  int64_t forwards_ = 0;
};

}  // namespace diffmoe::eval
