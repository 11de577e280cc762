// Per-rank training memory of a run layout (`diffmoe plan`), without a GPU and without allocating.
//
// The exact line items come from the code that allocates them, planned without allocating:
// Model::memory_plan (the ParamLayout of the rank's (world, EP) place, the compute-weight and
// gradient buffers, the activation arena through the layers' plan()), AdamW::plan_state (the rank's
// ZeRO chunks: f32 masters where separate, Adam moments in optim.moment_dtype), GradBuffer::plan
// (full gradient buffers, or ZeRO-2 bucket slots) and
// TokenBuffers::plan. Their sum is the
// bytes of the arenas a run allocates on that rank, to the byte.
//
// Estimates, each named as one, cover what no arena holds: the expert-parallel dispatch rows
// (docs/model.md §12; the all-to-all does not exist yet), NCCL's own buffers, the CUDA backend's
// workspaces and scratch (cuda_backend.h), and the CUDA context.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/precision_plan.h"

namespace diffmoe {

struct RunShape {
  int64_t world = 1;  // ranks
  int64_t ep = 1;     // expert-parallel degree (divides world and model.n_routed_experts)
  Precision precision = Precision::kF32;
  int64_t micro_batch = 1;   // sequences per rank and micro-batch
  int64_t seq = 0;           // tokens per sequence (0: model.max_seq_len)
  // Gradient bucket size in elements (ParallelLayoutOptions; 0: one per group, or 40M with zero_stage 2).
  int64_t bucket_elems = 0;
  int zero_stage = 1;       // parallel.zero_stage: 1 (full gradient buffers) or 2 (bucket slots)
  int64_t grad_slots = 0;   // parallel.grad_slots (zero_stage 2; 0 = automatic)
  // Activation recompute (train.recompute): none | attention | moe | full, planned as the model
  // plans it (activations and, with ep > 1, which expert buffers are per layer or shared).
  std::string recompute = "none";
  std::string moment_dtype = "f32";  // optim.moment_dtype: f32 or bf16 (the Adam moments' storage)
};

struct MemoryItem {
  std::string key;    // stable name (JSON)
  std::string label;  // what it is
  std::string basis;  // how the number is made (dtype, formula, assumption)
  uint64_t bytes = 0;
  bool estimate = false;
};

struct RankMemory {
  int64_t rank = 0, ep_rank = 0, expert_dp_rank = 0;
  std::vector<MemoryItem> items;
  uint64_t exact_bytes() const;  // the arenas: what a run allocates on this rank
  uint64_t total_bytes() const;  // everything, estimates included (EP dispatch: balanced routing)
};

// Bytes of the planned activations by what they hold (Model::memory_plan's activation table).
struct ActivationBreakdown {
  uint64_t residual = 0;       // the residual stream h_0 .. h_2L, kept for the backward
  uint64_t attention = 0;      // every layer's attention activations and the shared recomputed ones
  uint64_t ffn = 0;            // every layer's dense FFN / MoE activations, routing stats, shared recomputed
  uint64_t head = 0;           // final norm, logits
  uint64_t scratch = 0;        // backward scratch, shared by the layers
  uint64_t other = 0;          // RoPE tables, losses
  uint64_t largest_layer = 0;  // one layer's attention + FFN activations, the largest layer
};

// What a feature the code does not have would save on the heaviest rank (estimates).
struct MissingFeature {
  std::string key, label;
  uint64_t saves_bytes = 0;
};

struct MemoryPlan {
  RunShape run;  // seq resolved
  std::string recompute_planned;
  int64_t expert_dp = 1;                                 // world / ep
  int64_t tokens = 0;                                    // micro_batch × seq per rank
  int64_t dense_params = 0, expert_params_per_rank = 0;  // trainable elements this rank holds
  std::vector<RankMemory> ranks;                         // rank 0, then the heaviest rank where it differs
  bool all_ranks_equal = true;
  uint64_t ep_rows_avg = 0, ep_rows_worst = 0;  // received expert rows per MoE layer (§12)
  uint64_t ep_worst_bytes = 0;                  // the EP dispatch line at the dropless worst case
  ActivationBreakdown acts;
  std::vector<MissingFeature> missing;
};

// Plans every rank of the layout (all ranks are computed; the result keeps rank 0 and the heaviest).
// Errors name the option: EP must divide the world and the routed experts.
MemoryPlan plan_memory(const ModelConfig& cfg, const RunShape& run);
// One rank's line items: the exact ones (keys compute_weights, gradients, optimizer_masters,
// optimizer_moments, activations, token_buffers) and the estimates (ep_dispatch at balanced
// routing, nccl_buffers, backend_scratch, cuda_context).
RankMemory plan_rank(const ModelConfig& cfg, const RunShape& run, int64_t rank);

// The estimates' assumptions, printed with the plan.
struct PlanAssumptions {
  static constexpr uint64_t kNcclBuffBytes = uint64_t{4} << 20;  // NCCL_BUFFSIZE default (Simple protocol)
  static constexpr int kNcclChannels = 16;           // ring channels per collective communicator (NVLink, assumed)
  static constexpr int kNcclRingPeers = 2;           // a ring channel connects to the previous and the next rank
  static constexpr int kNcclP2pChannelsPerPeer = 2;  // all-to-all (send/recv) channels per peer (assumed)
  static constexpr uint64_t kCublasWorkspaceBytes = uint64_t{32} << 20;    // cuda_backend.cpp
  static constexpr uint64_t kCublasLtWorkspaceBytes = uint64_t{32} << 20;  // lt_gemm.h LtGemm::kWorkspaceBytes
  static constexpr uint64_t kCudaContextBytes = uint64_t{512} << 20;       // CUDA context, modules (assumed)
};

}  // namespace diffmoe
