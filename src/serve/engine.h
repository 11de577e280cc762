// The batched decode engine: one forward pass over many sequences of different lengths at once,
// against the paged latent cache (paged_cache.h; docs/model.md §2 "the absorbed latent cache", docs/derivations.md
// §2.4, §3.3). A step packs the new positions of every sequence in the batch into N rows — one row for a sequence that
// decodes, a chunk of its prompt for one that prefills — and runs the model's math on them with the decode layers of
// model/decode_layers.h, as model/generator.h does for one batch:
//   h_0 = embed_scale · E[tokens]
//   per layer:  x̄ = RMSNorm_attn(h);  q = [q^C ; RoPE(q^R)] (each row at its own position)
//               [c ; k^R] = x̄ W_kvaᵀ → pool slot of (sequence, position) = [RMSNorm_kv(c) ; RoPE(k^R)]
//               rows of the latent path (decode rows, later chunks of a prompt):
//                 q̃_j = q^C_j W^UK_j          (all rows of head j in one grouped GEMM, head-major)
//                 L = paged_latent_attention  (differential: L_h = A_{h,0}ĉ − λ A_{h,1}ĉ, latent space)
//                 [o_2h ; o_2h+1] = L_h [W^UV_2h ; W^UV_2h+1]ᵀ   (one grouped GEMM over the value groups)
//               rows of the expanded prefill (a prompt chunk of >= 2 positions with nothing cached before it):
//                 [k^C_j ; v_j] = ĉ W_kvb,jᵀ, k_j = [k^C_j ; k^R]   (one GEMM over the chunk's rows, as training)
//                 O = attention_fwd           (causal, differential with λ; the training op, B = 1 or the
//                                              sequences of equal length together)
//               differential: Ō_h = (1 − λ_init)·RMSNorm_2dv(O_h; subln);   h += Ō W_oᵀ
//               h += FFN(RMSNorm_ffn(h))    dense SwiGLU, or the MoE as in training: router with the
//                                           balancing bias, dropless permute/gather, grouped expert
//                                           GEMMs that read only the experts some row was routed to
//   then the final norm and the head on the rows whose logits were asked for.
// Every row's arithmetic depends only on its own sequence, so a sequence's logits are those of the
// full forward on it alone, whatever else shares the step (tests/serve/test_engine.cpp).
//
// Expanded prefill (docs/serving.md "Expanded prefill"; EngineOptions::expanded_prefill): the two attention paths
// are one function (docs/derivations.md §2.4, §3.3: the absorption only reorders the sums), so a prompt's first chunk
// takes the one that is cheaper for many queries over the same keys: the training attention on expanded keys and
// values, over the chunk's own rows (they are all its keys). Those rows are laid out after every other row of the
// step (rows L … N − 1, engine_plan.h), their sequences sorted by length so that equal lengths share one call; the
// cache rows are written as for every row. A step without such a chunk (every pure decode step) runs exactly the
// latent path, with the index layout it always had.
//
// Memory: the cache pools, plus ONE arena planned from the options: per-step scratch for
// max_step_tokens rows shared by all layers (plan_decode_scratch), the RoPE tables up to max_context, the head-major
// copies of W^UK (zero-padded to d_qk rows, so the absorption reads the full query) and W^UV per
// layer, the step's index buffer (uploaded once per step) and, with expanded_prefill, the expanded keys and values
// for max_step_tokens rows (engine_prefill.cpp). Nothing allocates after construction.
//
// Graphs (docs/serving.md "CUDA graphs"): on a backend that records ops (CUDA in the bf16 GEMM mode), a pure decode
// step — every sequence appends one token and wants its logits — runs on B rows padded up to a bucket (1, 2, 4, …,
// max_batch) and, once that bucket has run eagerly, replays the recorded forward of the bucket (every layer, the
// final norm and the head) with one launch. Everything a step changes is in the index buffer, uploaded before the
// replay; the padding rows are sequences of one position, each in a reserved cache block (max_batch − 1 of them), and
// their logits are dropped.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/decode_layers.h"
#include "model/model.h"
#include "serve/engine_plan.h"
#include "serve/paged_cache.h"

namespace diffmoe::serve {

struct EngineOptions {
  int64_t max_batch = 16;       // sequences in one step
  int64_t max_step_tokens = 0;  // new positions over all sequences of one step; 0 = max_batch + 256
  int64_t max_context = 0;      // positions per sequence (prompt + generated); 0 = max_seq_len
  int64_t block_size = 16;      // cache rows per block
  int64_t n_blocks = 0;         // cache blocks; 0 = enough for max_batch sequences of max_context
  int64_t max_logit_rows = 0;   // logit rows one step may return; 0 = max_step_tokens
  // FP8 inference (docs/model.md §7's recipe for the forward, docs/derivations.md §6): the dense Linear weights (the
  // attention projections wq_a, wq_b or wq, wkv_a, wo; the dense and shared-expert w1, w2, w3) are
  // quantised to e4m3 in 128×128 blocks at construction (weight_quant); each of their GEMMs
  // quantises its input in 1×128 tiles (act_quant) and runs fp8_gemm. The routed experts (grouped
  // GEMMs; no FP8 grouped op exists), the absorbed W^UK / W^UV, the router and the head keep the
  // compute dtype. f32 models only.
  bool fp8_weights = false;
  // Record and replay pure decode steps as graphs where the backend supports them (docs/serving.md "CUDA graphs"; CUDA
  // in the bf16 GEMM mode); elsewhere, or false, every step launches its ops one by one.
  bool cuda_graphs = true;
  // Eager steps of a bucket before it is recorded while the backend still times GEMM algorithms
  // (Backend::tuning(); lt_gemm.h: a shape called once a step settles within ~17 calls): a graph keeps the
  // algorithms chosen when it was recorded. Once the backend is not tuning, one eager step suffices.
  int64_t graph_warmup_steps = 32;
  // Graphs kept at most, one per bucket (at most 1 + ceil(log2 max_batch) of them); a bucket past the bound runs
  // eagerly on its padded rows. 0 records none: pure decode steps still run padded (a reference for tests).
  int64_t max_graphs = 16;
  // Prompt chunks of at least two positions with nothing cached before them (a prompt's first chunk) take the training
  // attention on expanded keys and values (engine.h, docs/serving.md "Expanded prefill"); false: every row takes the
  // paged latent attention. Turned off at construction, with the reason in Engine::expanded_prefill_error(), when
  // the backend's attention_fwd refuses the largest chunk this engine can see.
  bool expanded_prefill = true;
};

// What the graphs of an engine did (tests, statistics).
struct GraphStats {
  int64_t captures = 0;      // graphs recorded
  int64_t replays = 0;       // steps run as a replay (a recording's own step included)
  int64_t eager_padded = 0;  // pure decode steps run eagerly on padded rows (a bucket's warm-up)
  int64_t dropped = 0;       // graphs dropped because the backend's workspaces moved (Backend::graph_epoch)
};

// Which of a sequence's new positions get logits.
enum class LogitRows : uint8_t { kNone, kLast, kAll };

struct StepSequence {
  int64_t seq = -1;                 // a PagedCache sequence id (Engine::add_sequence)
  std::span<const int32_t> tokens;  // appended at positions length … length + n − 1 (n >= 1)
  LogitRows logits = LogitRows::kLast;
};

struct StepOutput {
  Tensor logits;                   // [M, V] on the backend's device, valid until the next step
  std::vector<int64_t> first_row;  // per StepSequence: its first logit row, or −1 (kNone)
};

// The weights EngineOptions::fp8_weights quantises, by checkpoint name (docs/model.md §8).
std::vector<std::string> fp8_weight_names(const ModelConfig& c);

class Engine : private DecodeOps {
 public:
  // The model (weights and config) must outlive the engine. The engine reads the model's weights in
  // place; the re-laid-out copies of W^UK and W^UV are taken here (refresh_weights() after a change).
  Engine(Model& model, EngineOptions opt);
  Engine(const Engine&) = delete;  // the layers hold references to the arena and to this engine
  Engine& operator=(const Engine&) = delete;

  const EngineOptions& options() const { return opt_; }
  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return be_; }
  PagedCache& cache() { return cache_; }
  const PagedCache& cache() const { return cache_; }
  size_t arena_bytes() const { return arena_.bytes(); }

  int64_t add_sequence() { return cache_.add(); }
  void release(int64_t seq) { cache_.release(seq); }
  // Cache blocks a step appending `new_tokens` to `seq` must take.
  int64_t blocks_needed(int64_t seq, int64_t new_tokens) const {
    return cache_.blocks_needed(seq, cache_.length(seq) + new_tokens);
  }

  // Appends every sequence's tokens to the cache and runs one forward pass over all of them. Throws
  // (before anything changes) when the batch breaks the options' limits or the cache lacks blocks.
  StepOutput step(Context ctx, std::span<const StepSequence> batch);

  // Rows routed to each expert in the last step, i32 [n_routed_experts] (MoE layers only).
  // In a padded decode step (docs/serving.md "CUDA graphs") the counts include the padding rows.
  Tensor expert_counts(int64_t layer) const;
  void refresh_weights();

  // Whether pure decode steps are padded to buckets and replayed as graphs (EngineOptions::cuda_graphs and a
  // backend that records ops in the model's GEMM mode); fixed at construction.
  bool graphs_enabled() const { return graphs_; }
  const GraphStats& graph_stats() const { return graph_stats_; }
  // Why recording failed, when it did (graphs are then off for this engine); empty otherwise.
  const std::string& graph_error() const { return graph_error_; }
  // Whether prompts' first chunks take the expanded prefill (EngineOptions::expanded_prefill and an attention_fwd that
  // takes the largest chunk); fixed at construction. When the option is on but the op refused: why.
  bool expanded_prefill_enabled() const { return expanded_; }
  const std::string& expanded_prefill_error() const { return expanded_error_; }
  // Rows that took the expanded prefill, over all steps so far.
  int64_t expanded_rows() const { return expanded_rows_; }

 private:
  // The rows a pure decode step of B sequences runs on: B padded up to its bucket; 0 when the step is not one, or
  // graphs are off, or the bucket would exceed max_logit_rows.
  int64_t decode_bucket(std::span<const StepSequence> batch) const;
  // The forward on the planned rows: embedding, the layers, the head (everything a graph records).
  void forward(Context ctx, const StepPlan& p);
  // Runs the forward of a padded decode step of `bucket` rows: a replay, a recording then its replay, or eagerly.
  void decode_graph_step(Context ctx, const StepPlan& p, int64_t bucket);
  void head(Context ctx, const StepPlan& p);
  // DecodeOps: y = x Wᵀ (+ beta·y), through the FP8 copy of w when there is one (engine.cpp); the rows' pool
  // slots and the absorbed attention as grouped GEMMs over head-major rows and paged_latent_attention
  // (engine_layers.cpp).
  void linear(Context ctx, const Tensor& y, const Tensor& x, const Tensor& w, double beta) const override;
  void write_cache(Context ctx, int64_t l, const DecodeRows& rows, const Tensor& kv_rows) override;
  void attend(Context ctx, int64_t l, const DecodeRows& rows, const LatentAttentionStep& s) override;
  // The latent path on rows 0 … L − 1 (engine_layers.cpp); the expanded prefill of one run (engine_prefill.cpp).
  void attend_latent(Context ctx, int64_t l, const LatentAttentionStep& s);
  void attend_expanded(Context ctx, int64_t l, const PrefillRun& run, const LatentAttentionStep& s);
  // The expanded prefill's scratch for `rows` rows (before the arena is allocated), and the check that
  // attention_fwd takes the largest chunk (after; turns the path off with the op's message if not).
  void plan_expanded_prefill(int64_t rows);
  void check_expanded_prefill();
  // Lays out the step's rows (seq_row_, prefill_runs_): the latent sequences' rows first, in batch order, then the
  // expanded ones by length. Returns L, the latent rows.
  int64_t layout_rows(std::span<const StepSequence> batch);
  void quantize_weights();  // the FP8 copies (fp8_weights)
  Tensor scratch(const char* name, Shape shape) const { return arena_prefix(arena_, name, shape); }
  Tensor param(const std::string& name) const { return model_.params().get(name); }

  Model& model_;
  const ModelConfig& cfg_;
  Backend& be_;
  EngineOptions opt_;
  bool graphs_ = false;  // before cache_: a graph engine's cache reserves the padding rows' blocks
  PagedCache cache_;
  Arena arena_;
  DecodeLayers layers_;              // reads arena_'s scratch, calls back into this engine
  StepPlan plan_;                    // the index views of the step being run (step() sets them)
  std::vector<int32_t> host_index_;  // the step's index buffer as built on the host
  bool expanded_ = false;            // expanded_prefill_enabled()
  std::string expanded_error_;
  int64_t expanded_rows_ = 0;
  std::vector<int64_t> seq_row_;          // per StepSequence of the step: its first row
  std::vector<PrefillRun> prefill_runs_;  // the step's expanded prefill runs
  std::vector<size_t> expanded_order_;    // layout_rows' sort of the expanded sequences
  struct Fp8Weight {
    Tensor q, scale;  // e4m3 [N, K], f32 [ceil(N/128), fp8_block_scale_cols(K)]
  };
  std::unordered_map<const void*, Fp8Weight> fp8_;  // by the compute weight's address
  int64_t row_pad_ = 1;  // FP8 GEMMs on CUDA take M in multiples of 8: rows are padded up to this
  // Graphs by bucket (index log2(bucket)), the eager padded steps each bucket has run, the backend's graph_epoch
  // they were recorded under.
  std::vector<std::unique_ptr<CapturedOps>> graphs_by_bucket_;
  std::vector<int64_t> bucket_eager_steps_;
  uint64_t graph_epoch_ = 0;
  int64_t graphs_kept_ = 0;
  GraphStats graph_stats_;
  std::string graph_error_;
};

}  // namespace diffmoe::serve
