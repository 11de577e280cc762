#include "train/memory_plan.h"

#include "model/expert_buffers.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <string_view>

#include "model/model.h"
#include "train/optimizer.h"
#include "train/token_buffers.h"

namespace diffmoe {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
double gib(uint64_t b) { return static_cast<double>(b) / kGiB; }

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

// "act.{l}.attn.x" / "act.{l}.ffn.x" -> l and the block ("attn" / "ffn"); -1 otherwise.
int64_t layer_block(std::string_view name, std::string_view* block) {
  if (!starts_with(name, "act.")) return -1;
  size_t i = 4;
  int64_t l = 0;
  if (i >= name.size() || !std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  for (; i < name.size() && std::isdigit(static_cast<unsigned char>(name[i])); ++i) l = 10 * l + (name[i] - '0');
  const std::string_view rest = name.substr(i);
  if (starts_with(rest, ".attn.")) *block = "attn";
  else if (starts_with(rest, ".ffn.")) *block = "ffn";
  else return -1;
  return l;
}

// An alias's bytes are its host's (counted there).
uint64_t bytes_of(const PrecisionPlan::Entry& e) {
  return e.storage == Storage::kAlias ? 0 : Arena::view_bytes(e.shape, e.dtype);
}

ActivationBreakdown breakdown(const ModelConfig& cfg, const PrecisionPlan& plan) {
  ActivationBreakdown b;
  std::vector<uint64_t> layer(static_cast<size_t>(cfg.n_layers), 0);
  for (const PrecisionPlan::Entry& e : plan.entries()) {
    const uint64_t n = bytes_of(e);
    std::string_view block;
    const int64_t l = layer_block(e.name, &block);
    if (l >= 0) {
      (block == "attn" ? b.attention : b.ffn) += n;
      layer[static_cast<size_t>(l)] += n;
    } else if (starts_with(e.name, "act.recomputed.attn.")) {
      b.attention += n;  // the views every layer's backward recomputes into (model/recompute.h)
    } else if (starts_with(e.name, "act.recomputed.ffn.")) {
      b.ffn += n;
    } else if (starts_with(e.name, "stats.")) {
      b.ffn += n;  // the expert counts of each MoE layer
    } else if (starts_with(e.name, "act.residual.")) {
      b.residual += n;
    } else if (starts_with(e.name, "act.final.")) {
      b.head += n;
    } else if (starts_with(e.name, "scratch.")) {
      b.scratch += n;
    } else {
      b.other += n;
    }
  }
  b.largest_layer = layer.empty() ? 0 : *std::max_element(layer.begin(), layer.end());
  return b;
}

// Received expert rows per MoE layer (docs/model.md §12). Balanced routing: the EP group's EP·N·K
// rows spread evenly, N·K per rank. Dropless worst case: every token of the EP group sends all
// the picks it can to this rank, at most min(K, E/EP) of its K distinct experts being here.
uint64_t ep_rows(const ModelConfig& c, int64_t ep, int64_t tokens, bool worst) {
  if (ep <= 1 || c.n_dense_layers == c.n_layers) return 0;
  const int64_t K = c.n_activated_experts;
  return static_cast<uint64_t>(worst ? ep * tokens * std::min(K, c.n_routed_experts / ep) : tokens * K);
}

// NCCL's buffers (an estimate; nothing here allocates them): NCCL_BUFFSIZE per channel and peer.
// The ring collectives (ZeRO-1 reduce-scatter of the gradient buckets, all-gather of the updated
// weights) run on the world communicator and, with EP and expert data parallelism, on the expert
// data-parallel one; the all-to-all of the dispatch on the EP communicator, point to point with
// each of the EP − 1 peers. Bucket staging: none, the reduce-scatter and all-gather work in place
// (ParamLayout pads each bucket to dp equal chunks, which is NCCL's in-place layout).
uint64_t nccl_bytes(int64_t world, int64_t ep, int64_t expert_dp, std::string* basis) {
  using A = PlanAssumptions;
  const uint64_t ring = A::kNcclBuffBytes * A::kNcclChannels * A::kNcclRingPeers;
  const int rings = (world > 1 ? 1 : 0) + (ep > 1 && expert_dp > 1 ? 1 : 0);
  const uint64_t p2p = ep > 1 ? A::kNcclBuffBytes * A::kNcclP2pChannelsPerPeer * static_cast<uint64_t>(ep - 1) : 0;
  *basis = world == 1 ? "one rank: no communicator"
                      : fmt::format(
                            "NCCL_BUFFSIZE {} MiB × {} channels × {} ring peers × {} ring communicator(s){}; "
                            "bucket staging 0 (in-place reduce-scatter / all-gather)",
                            A::kNcclBuffBytes >> 20, A::kNcclChannels, A::kNcclRingPeers, rings,
                            ep > 1 ? fmt::format(" + all-to-all {} MiB × {} channels × {} peers",
                                                 A::kNcclBuffBytes >> 20, A::kNcclP2pChannelsPerPeer, ep - 1)
                                   : "");
  return ring * static_cast<uint64_t>(rings) + p2p;
}

// The CUDA backend's own buffers (cuda_backend.h), an estimate where they grow to the largest call:
// the cuBLAS and cuBLASLt workspaces (fixed), the shared scratch (the largest of: the attention
// backward's staging, tc_attention.cuh tca_scratch_layout / flash_attention_ops.cu; the expert
// sort's index arrays and CUB temporaries, moe_permute; the per-row losses) and, in the bf16 mode,
// the operand buffer for f32 GEMM operands rounded to bf16 (gemm_ops.cu gemm_operands).
uint64_t backend_bytes(const ModelConfig& c, Precision p, int64_t tokens, std::string* basis) {
  using A = PlanAssumptions;
  const uint64_t N = static_cast<uint64_t>(tokens), H = static_cast<uint64_t>(c.n_heads);
  const uint64_t dv = static_cast<uint64_t>(c.v_head_dim), G = c.differential ? H / 2 : H;
  const bool bf16 = p != Precision::kF32;  // the fp8 mode is the bf16 mode outside its FP8 GEMMs
  // Attention backward: the D vector [N·H] f32 and the dλ row partials [N·G] f64; the tensor-core
  // kernels (bf16 mode) also stage dO in bf16 [N, H·dv] (q, k, v read in place). Assumed: the
  // tensor-core kernels cover the shape (where they do not, the f32 kernels widen q, k, v and
  // their gradients into the operand buffer, 4 bytes per element, which this does not count).
  const uint64_t attn = N * H * 4 + N * G * 8 + (bf16 ? N * H * dv * 2 : 0);
  // Expert sort: 3 i32 arrays of N·K and CUB's radix-sort temporaries (assumed 2 × N·K × 8 bytes).
  const uint64_t nk = c.n_dense_layers == c.n_layers ? 0 : N * static_cast<uint64_t>(c.n_activated_experts);
  const uint64_t sort = nk * 3 * 4 + nk * 2 * 8;
  const uint64_t scratch = std::max({attn, sort, N * 8});
  uint64_t operand = 0;
  if (bf16) {  // the f32 operands of GEMMs in the bf16 mode: the router gate (its dx GEMM), a tied table, O
    operand = 2 * static_cast<uint64_t>(c.n_routed_experts * c.dim);
    if (c.tie_embeddings) operand = std::max(operand, 2 * static_cast<uint64_t>(c.vocab_size * c.dim));
    if (!c.differential) operand = std::max(operand, 2 * N * H * dv);
  }
  *basis = fmt::format(
      "cuBLAS {} MiB + cuBLASLt {} MiB workspaces; scratch {:.3f} GiB (largest of attention backward "
      "{:.3f}, expert sort {:.3f}){}",
      A::kCublasWorkspaceBytes >> 20, A::kCublasLtWorkspaceBytes >> 20, gib(scratch), gib(attn), gib(sort),
      bf16 ? fmt::format("; bf16 operand buffer {:.3f} GiB (tensor-core attention assumed)", gib(operand)) : "");
  return A::kCublasWorkspaceBytes + A::kCublasLtWorkspaceBytes + scratch + operand;
}

// What each MoE layer keeps of its expert rows under the recompute mode (ExpertBuffers).
std::string_view ep_kept(Recompute r) {
  switch (r) {
    case Recompute::kMoe: return "recompute moe: x_perm, y_perm per layer, one shared a, b, h";
    case Recompute::kFull: return "recompute full: the routing plan per layer, one shared set of rows";
    case Recompute::kNone:
    case Recompute::kAttention: break;
  }
  return "every layer keeps its rows";
}

struct RankDetail {
  RankMemory mem;
  ModelMemoryPlan model;
  AdamW::StatePlan state;
};

void check_run(const ModelConfig& cfg, const RunShape& run) {
  DIFFMOE_CHECK(run.world >= 1, "--world: need at least 1 rank, got {}", run.world);
  DIFFMOE_CHECK(run.ep >= 1 && run.world % run.ep == 0, "--ep: {} does not divide the world size {}", run.ep,
                run.world);
  DIFFMOE_CHECK(run.micro_batch >= 1, "--micro-batch: need at least 1 sequence, got {}", run.micro_batch);
  DIFFMOE_CHECK(run.bucket_elems >= 0, "--bucket-elems: need 0 or more, got {}", run.bucket_elems);
  DIFFMOE_CHECK(run.zero_stage == 1 || run.zero_stage == 2, "--zero-stage: expected 1 or 2, got {}", run.zero_stage);
  DIFFMOE_CHECK(run.grad_slots >= 0, "--grad-slots: need 0 (automatic) or more, got {}", run.grad_slots);
  DIFFMOE_CHECK(run.seq >= 1 && run.seq <= cfg.max_seq_len, "--seq: {} is not in [1, model.max_seq_len = {}]", run.seq,
                cfg.max_seq_len);
  parse_recompute(run.recompute, "--recompute");
  DIFFMOE_CHECK(run.moment_dtype == "f32" || run.moment_dtype == "bf16",
                "--moment-dtype: expected f32 or bf16, got '{}'", run.moment_dtype);
}

RunShape resolved(const ModelConfig& cfg, RunShape run) {
  DIFFMOE_CHECK(run.seq >= 0, "--seq: {} is negative (0 or left out: model.max_seq_len)", run.seq);
  if (run.seq == 0) run.seq = cfg.max_seq_len;
  return run;
}

RankDetail plan_rank_detail(const ModelConfig& cfg, const RunShape& run, int64_t rank) {
  check_run(cfg, run);
  DIFFMOE_CHECK(rank >= 0 && rank < run.world, "[plan] rank {} of {}", rank, run.world);
  const int64_t expert_dp = run.world / run.ep;
  // EP innermost (docs/model.md §12): rank = expert-DP index · EP + EP rank.
  const ModelOptions mo{.precision = run.precision,
                        .parallel = {.ep_size = run.ep,
                                     .ep_rank = rank % run.ep,
                                     .dense_dp = run.world,
                                     .expert_dp = expert_dp,
                                     .bucket_elems = run.bucket_elems,
                                     .zero_stage = run.zero_stage,
                                     .grad_slots = run.grad_slots},
                        .recompute = parse_recompute(run.recompute, "--recompute")};
  RankDetail d{.mem = {}, .model = Model::memory_plan(cfg, DType::kF32, mo, run.micro_batch, run.seq), .state = {}};
  const ParamLayout& layout = *d.model.layout;
  const DType master = d.model.plan.master_dtype();
  const DType moment_dt = AdamW::moment_dtype(run.moment_dtype, master);
  d.state = AdamW::plan_state(layout, master, OptimShard{.dense_rank = rank, .expert_rank = rank / run.ep}, moment_dt);
  RankMemory& m = d.mem;
  m.rank = rank;
  m.ep_rank = rank % run.ep;
  m.expert_dp_rank = rank / run.ep;
  const bool bf16 = run.precision != Precision::kF32;  // fp8: bf16 compute weights as in bf16

  uint64_t w16 = 0, w32 = 0;
  for (size_t g = 0; g < layout.groups().size(); ++g)
    (layout.groups()[g].compute == DType::kBF16 ? w16 : w32) += d.model.params.group_arena(g).bytes();
  m.items.push_back(
      {.key = "compute_weights",
       .label = "compute weights",
       .basis = bf16
                    ? fmt::format(
                          "bf16 GEMM weights {:.2f} GiB + f32 rest {:.2f} GiB{} + balancing biases", gib(w16), gib(w32),
                          run.precision == Precision::kFP8 ? " (with the FP8 GEMM weights of groups on one rank: their "
                                                             "own masters)"
                                                           : "")
                    : "f32 (they are the masters) + balancing biases",
       .bytes = d.model.params.bytes(),
       .estimate = false});
  const GradBuffer::Footprint& gf = d.model.grads;
  m.items.push_back(
      {.key = "gradients",
       .label = "gradients",
       .basis = gf.n_slots == 0
                    ? "f32, every parameter this rank holds (not sharded)"
                    : fmt::format("f32, ZeRO-2: {} bucket slots {:.2f} GiB (+ accumulation chunks) of the groups with "
                                  "dp > 1; full buffers of the others {:.2f} GiB",
                                  gf.n_slots, gib(gf.slots), gib(gf.full)),
       .bytes = gf.bytes(),
       .estimate = false});
  uint64_t masters = 0, moments = 0, reduced = 0;
  for (const Arena::Entry& e : d.state.state.entries())
    (starts_with(e.name, "master.") ? masters
     : starts_with(e.name, "grad.") ? reduced
                                    : moments) += Arena::view_bytes(e.shape, e.dtype);
  const std::string shard =
      fmt::format("this rank's ZeRO-{} chunks: dense 1/{}, experts 1/{}", run.zero_stage, run.world, expert_dp);
  m.items.push_back({.key = "optimizer_masters",
                     .label = "optimizer f32 masters",
                     .basis = bf16 ? shard : "none: the f32 compute weights are the masters",
                     .bytes = masters,
                     .estimate = false});
  m.items.push_back({.key = "optimizer_moments",
                     .label = "optimizer Adam moments",
                     .basis = fmt::format("{} m and v, {}", dtype_name(moment_dt), shard),
                     .bytes = moments,
                     .estimate = false});
  m.items.push_back({.key = "reduced_gradients",
                     .label = "reduce-scattered gradient chunks",
                     .basis = "f32, this rank's chunks of the groups with dp > 1 (the optimizer reads them)",
                     .bytes = reduced,
                     .estimate = false});
  m.items.push_back({.key = "activations",
                     .label = "activations",
                     .basis = fmt::format("{} × {} tokens, {} mode, recompute {}", run.micro_batch, run.seq,
                                          precision_name(run.precision), run.recompute),
                     .bytes = d.model.acts.bytes(),
                     .estimate = false});
  m.items.push_back({.key = "token_buffers",
                     .label = "token buffers",
                     .basis = "inputs and targets, i32",
                     .bytes = TokenBuffers::plan(run.micro_batch, run.seq).bytes(),
                     .estimate = false});

  const int64_t tokens = run.micro_batch * run.seq;
  const bool ep_moe = run.ep > 1 && cfg.n_dense_layers < cfg.n_layers;
  const Recompute recompute = parse_recompute(run.recompute, "--recompute");
  const int64_t ep_pairs = ExpertBuffers::initial_pairs(cfg, run.ep, tokens),
                ep_rows_n = ExpertBuffers::initial_rows(cfg, tokens);
  m.items.push_back(
      {.key = "ep_buffers",
       .label = "EP dispatch buffers",
       .basis = ep_moe
                    ? fmt::format(
                          "as allocated at the start: balanced routing, {} received pairs and {} expert rows per MoE "
                          "layer (they grow when a micro-batch needs more; docs/model.md §12); {}",
                          ep_pairs, ep_rows_n, ep_kept(recompute))
                    : "no expert parallelism",
       .bytes = ep_moe ? ExpertBuffers::bytes_for(cfg, d.model.plan, recompute, ep_pairs, ep_rows_n) : 0,
       .estimate = false});
  std::string nccl_basis, backend_basis;
  const uint64_t nccl = nccl_bytes(run.world, run.ep, expert_dp, &nccl_basis);
  m.items.push_back(
      {.key = "nccl_buffers", .label = "NCCL buffers", .basis = nccl_basis, .bytes = nccl, .estimate = true});
  const uint64_t backend = backend_bytes(cfg, run.precision, tokens, &backend_basis);
  m.items.push_back({.key = "backend_scratch",
                     .label = "backend scratch",
                     .basis = backend_basis,
                     .bytes = backend,
                     .estimate = true});
  m.items.push_back({.key = "cuda_context",
                     .label = "CUDA context",
                     .basis = "assumed (runtime, kernels, cuBLAS handles)",
                     .bytes = PlanAssumptions::kCudaContextBytes,
                     .estimate = true});
  return d;
}

uint64_t item(const RankMemory& m, std::string_view key) {
  for (const MemoryItem& i : m.items)
    if (i.key == key) return i.bytes;
  return 0;
}

}  // namespace

uint64_t RankMemory::exact_bytes() const {
  uint64_t n = 0;
  for (const MemoryItem& i : items)
    if (!i.estimate) n += i.bytes;
  return n;
}

uint64_t RankMemory::total_bytes() const {
  uint64_t n = 0;
  for (const MemoryItem& i : items) n += i.bytes;
  return n;
}

RankMemory plan_rank(const ModelConfig& cfg, const RunShape& run, int64_t rank) {
  return plan_rank_detail(cfg, resolved(cfg, run), rank).mem;
}

MemoryPlan plan_memory(const ModelConfig& cfg, const RunShape& run_in) {
  const RunShape run = resolved(cfg, run_in);
  MemoryPlan p;
  p.run = run;
  p.recompute_planned = run.recompute;
  p.expert_dp = run.world / std::max<int64_t>(run.ep, 1);
  p.tokens = run.micro_batch * run.seq;
  RankDetail first = plan_rank_detail(cfg, run, 0);
  for (const ParamLayout::Entry& e : first.model.layout->entries())
    (e.spec.kind == ParamKind::kExpert ? p.expert_params_per_rank : p.dense_params) += e.shape.numel();
  p.acts = breakdown(cfg, first.model.plan);
  p.ep_rows_avg = ep_rows(cfg, run.ep, p.tokens, false);
  p.ep_rows_worst = ep_rows(cfg, run.ep, p.tokens, true);
  // The worst case: every rank routes every token to this rank's experts.
  p.ep_worst_bytes =
      run.ep == 1 || cfg.n_dense_layers == cfg.n_layers
          ? 0
          : ExpertBuffers::bytes_for(cfg, first.model.plan, parse_recompute(run.recompute, "--recompute"),
                                     run.ep * ExpertBuffers::initial_pairs(cfg, run.ep, p.tokens),
                                     static_cast<int64_t>(p.ep_rows_worst));

  // Every rank (their sizes differ only through the ZeRO-1 chunks and the expert ranges).
  RankMemory heaviest = first.mem;
  for (int64_t r = 1; r < run.world; ++r) {
    RankMemory m = plan_rank_detail(cfg, run, r).mem;
    if (m.total_bytes() != first.mem.total_bytes()) p.all_ranks_equal = false;
    if (m.total_bytes() > heaviest.total_bytes()) heaviest = std::move(m);
  }
  p.ranks.push_back(first.mem);
  if (heaviest.rank != 0) p.ranks.push_back(heaviest);

  // What the missing features would save on the heaviest rank (estimates from the same plan).
  const RankMemory& h = p.ranks.back();
  if (run.recompute != "full") {
    // Exact: the same rank planned with `full` (activations and, with EP, the expert buffers).
    RunShape full = run;
    full.recompute = "full";
    const uint64_t with_full = plan_rank_detail(cfg, full, h.rank).mem.total_bytes();
    p.missing.push_back({.key = "recompute_full",
                         .label = "train.recompute: full (keep layer inputs and routing, recompute the rest)",
                         .saves_bytes = h.total_bytes() > with_full ? h.total_bytes() - with_full : 0});
  }
  if (run.moment_dtype != "bf16")
    p.missing.push_back({.key = "bf16_moments",
                         .label = "optim.moment_dtype: bf16 (bf16 Adam moments, --moment-dtype bf16)",
                         .saves_bytes = item(h, "optimizer_moments") / 2});
  if (run.zero_stage == 1) {
    // The heaviest rank's gradient line planned with zero_stage 2 (its other lines change by the
    // bucket padding only).
    RunShape two = run;
    two.zero_stage = 2;
    two.grad_slots = 0;  // --grad-slots is a stage-2 option: plan the automatic count
    const uint64_t now = item(h, "gradients"), sharded = item(plan_rank_detail(cfg, two, h.rank).mem, "gradients");
    if (sharded < now)
      p.missing.push_back({.key = "sharded_gradients",
                           .label = "parallel.zero_stage: 2 (sharded gradients in bucket slots, --zero-stage 2)",
                           .saves_bytes = now - sharded});
  }
  return p;
}

}  // namespace diffmoe
