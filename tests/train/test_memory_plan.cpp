// The memory plan (train/memory_plan.h) against what a real Model, AdamW and TokenBuffers allocate
// on the CPU backend, byte for byte, for the micro configs and the tiny preset, both precision
// modes, both moment dtypes (optim.moment_dtype), and several (world, EP, bucket) layouts at several
// ranks; the counts it reports against the parameter list; the expert-parallel estimate's formula.
#include <gtest/gtest.h>

#include <map>

#include "backend/cpu/cpu_backend.h"
#include "model/expert_buffers.h"
#include "model/micro_config.h"
#include "train/memory_plan.h"
#include "train/optimizer.h"
#include "train/token_buffers.h"

namespace diffmoe {
namespace {

uint64_t item(const RankMemory& m, const std::string& key) {
  for (const MemoryItem& i : m.items)
    if (i.key == key) return i.bytes;
  ADD_FAILURE() << "no item " << key;
  return 0;
}

// plan_memory's error message for `r`, or "no error".
std::string plan_error(const ModelConfig& cfg, const RunShape& r) {
  try {
    plan_memory(cfg, r);
  } catch (const Error& e) {
    return std::string(e.what());
  }
  return std::string("no error");
}

struct Layout {
  int64_t world, ep, bucket_elems;
  int zero_stage = 1;  // 2: the data-parallel groups' gradients in bucket slots (GradBuffer)
};

// An EP group's size and this rank's place in it, without communication: enough to build the model.
class LocalExchange final : public ExpertExchange {
 public:
  LocalExchange(int size, int rank) : size_(size), rank_(rank) {}
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  std::unique_ptr<Pending> all_to_all(Context, const Tensor&, const Tensor&, const RowBlocks&,
                                      const RowBlocks&) override {
    throw std::logic_error("not used");
  }

 private:
  int size_, rank_;
};

// Builds the real objects of `rank` and compares every exact line item with the allocation.
void check_rank(const ModelConfig& cfg, Precision prec, const Layout& lay, int64_t rank, int64_t batch, int64_t seq,
                const std::string& moments = "f32", Recompute recompute = Recompute::kNone) {
  SCOPED_TRACE(fmt::format("precision {} moments {} world {} ep {} bucket {} zero stage {} rank {} recompute {}",
                           precision_name(prec), moments, lay.world, lay.ep, lay.bucket_elems, lay.zero_stage, rank,
                           recompute_name(recompute)));
  CpuBackend be;
  LocalExchange ex(static_cast<int>(lay.ep), static_cast<int>(rank % lay.ep));
  const ModelOptions mo{.precision = prec,
                        .parallel = {.ep_size = lay.ep,
                                     .ep_rank = rank % lay.ep,
                                     .dense_dp = lay.world,
                                     .expert_dp = lay.world / lay.ep,
                                     .bucket_elems = lay.bucket_elems,
                                     .zero_stage = lay.zero_stage},
                        .expert_exchange = &ex,
                        .recompute = recompute};
  Model m(cfg, be, DType::kF32, mo);
  m.set_batch_shape(batch, seq);
  OptimConfig oc;
  oc.moment_dtype = moments;
  AdamW opt(m, oc, OptimShard{.dense_rank = rank, .expert_rank = rank / lay.ep});
  TokenBuffers tb(be, batch, seq);
  ASSERT_TRUE(m.params().allocated());
  // Every gradient allocation: the full buffers, and with ZeRO-2 the slots and accumulation chunks.
  size_t grads = 0, slotted = 0;
  for (size_t g = 0; g < m.layout().groups().size(); ++g) {
    const ParamLayout::Group& grp = m.layout().groups()[g];
    EXPECT_EQ(grp.slotted(), lay.zero_stage == 2 && grp.dp > 1);
    EXPECT_EQ(m.grads().buffers().group_allocated(g), !grp.slotted());
    if (!grp.slotted()) grads += m.grads().buffers().group_arena(g).bytes();
    slotted += grp.slotted() ? 1 : 0;
  }
  if (slotted == 0) EXPECT_EQ(m.grads().bytes(), grads);
  else EXPECT_GT(m.grads().bytes(), grads);  // the slots come on top of the full buffers
  grads = m.grads().bytes();

  const RunShape run{.world = lay.world,
                     .ep = lay.ep,
                     .precision = prec,
                     .micro_batch = batch,
                     .seq = seq,
                     .bucket_elems = lay.bucket_elems,
                     .zero_stage = lay.zero_stage,
                     .recompute = std::string(recompute_name(recompute)),
                     .moment_dtype = moments};
  const RankMemory p = plan_rank(cfg, run, rank);
  EXPECT_EQ(item(p, "compute_weights"), m.params().bytes());
  EXPECT_EQ(item(p, "gradients"), grads);
  EXPECT_EQ(item(p, "optimizer_masters") + item(p, "optimizer_moments") + item(p, "reduced_gradients"),
            opt.state_bytes());
  EXPECT_EQ(item(p, "activations"), m.acts().bytes());
  EXPECT_EQ(item(p, "ep_buffers"), m.expert_buffer_bytes());
  EXPECT_EQ(item(p, "token_buffers"), tb.dev.bytes());
  EXPECT_EQ(p.exact_bytes(), m.params().bytes() + grads + opt.state_bytes() + m.acts().bytes() +
                                 m.expert_buffer_bytes() + tb.dev.bytes());
  // Masters exist exactly for the groups whose compute weights are bf16.
  bool any_masters = false;
  for (size_t g = 0; g < m.layout().groups().size(); ++g) any_masters = any_masters || opt.separate_masters(g);
  EXPECT_EQ(item(p, "optimizer_masters") > 0, any_masters);
  EXPECT_EQ(any_masters, prec != Precision::kF32);  // bf16 and fp8: bf16 compute weights
}

TEST(MemoryPlan, EqualsTheAllocatedArenasMicroConfigs) {
  // micro_diff: 8 routed experts; micro_plain: 6 (EP 3 and 6 too), tied embeddings, no shared experts.
  // ZeRO-2 layouts (zero_stage 2): slots of the data-parallel groups, full buffers of the others.
  const std::vector<Layout> diff_layouts = {{1, 1, 0},   {4, 1, 0},    {4, 2, 0},      {8, 4, 512},    {8, 8, 0},
                                            {2, 2, 200}, {4, 1, 0, 2}, {4, 2, 300, 2}, {8, 8, 500, 2}, {1, 1, 0, 2}};
  const std::vector<Layout> plain_layouts = {{1, 1, 0},   {6, 3, 0},      {6, 6, 0},
                                             {4, 2, 300}, {6, 3, 400, 2}, {4, 2, 0, 2}};
  for (const Precision prec : {Precision::kF32, Precision::kBF16}) {
    for (const std::string moments : {"f32", "bf16"}) {
      for (const Layout& lay : diff_layouts)
        for (const int64_t r : {int64_t{0}, lay.world / 2, lay.world - 1})
          check_rank(test::micro_diff_config(), prec, lay, r, 2, 8, moments);
      for (const Layout& lay : plain_layouts)
        for (const int64_t r : {int64_t{0}, lay.world - 1})
          check_rank(test::micro_plain_config(), prec, lay, r, 3, 5, moments);
    }
  }
}

// Every recompute mode with and without expert parallelism: the activations and the EP buffers
// (per layer or shared, model/expert_buffers.h) as allocated.
TEST(MemoryPlan, EqualsTheAllocatedArenasWithRecompute) {
  // The last two with ZeRO-2 (gradient slots) as well: the seed-20b plan combines both.
  const std::vector<Layout> layouts = {{1, 1, 0}, {4, 2, 0}, {8, 8, 0}, {8, 4, 512}, {4, 2, 300, 2}, {8, 8, 500, 2}};
  for (const Recompute r : {Recompute::kAttention, Recompute::kMoe, Recompute::kFull})
    for (const Precision prec : {Precision::kF32, Precision::kBF16}) {
      for (const Layout& lay : layouts) check_rank(test::micro_diff_config(), prec, lay, lay.world - 1, 2, 8, "f32", r);
      check_rank(test::micro_plain_config(), prec, {6, 3, 0}, 0, 3, 5, "bf16", r);
    }
  const ModelConfig cfg = load_model_config(test::repo_path("configs/tiny.yaml"));
  for (const Recompute r : {Recompute::kMoe, Recompute::kFull})
    check_rank(cfg, Precision::kBF16, {8, 4, 1 << 16}, 3, 2, 32, "bf16", r);
}

// The EP buffers per mode: `moe` shares a, b, h, `full` also x_perm, y_perm (one set for all
// layers); the kept parts stay per layer; growth reaches both.
TEST(MemoryPlan, ExpertBuffersFollowTheRecomputeMode) {
  const ModelConfig cfg = test::micro_diff_config();  // 2 MoE layers (1 and 2), E = 8, K = 2
  const PrecisionPlan plan(Precision::kF32, DType::kF32);
  CpuBackend be;
  const int64_t N = 16, ep = 2;
  std::map<Recompute, size_t> bytes;
  for (const Recompute r : {Recompute::kNone, Recompute::kAttention, Recompute::kMoe, Recompute::kFull}) {
    SCOPED_TRACE(recompute_name(r));
    ExpertBuffers buf(cfg, plan, r, ep, N, be);
    bytes[r] = buf.bytes();
    EXPECT_EQ(buf.bytes(), ExpertBuffers::bytes_for(cfg, plan, r, ExpertBuffers::initial_pairs(cfg, ep, N),
                                                    ExpertBuffers::initial_rows(cfg, N)));
    for (const char* name :
         {"recv_idx", "recv_w", "slot_pos", "offsets", "src_row", "x_perm", "y_perm", "a", "b", "h"}) {
      const bool shared = buf.saved(1, name).data == buf.saved(2, name).data;
      EXPECT_EQ(shared, ExpertBuffers::recomputed(r, name)) << name;
    }
    EXPECT_EQ(ExpertBuffers::recomputed(r, "a"), r == Recompute::kMoe || r == Recompute::kFull);
    EXPECT_EQ(ExpertBuffers::recomputed(r, "x_perm"), r == Recompute::kFull);
    EXPECT_FALSE(ExpertBuffers::recomputed(r, "src_row"));
    // Layer 2 needs 3x the rows: its kept buffers and the shared set grow, layer 1's stay.
    const int64_t rows = 3 * ExpertBuffers::initial_rows(cfg, N), pairs = 2 * ExpertBuffers::initial_pairs(cfg, ep, N);
    const int64_t l1_rows = buf.saved(1, "src_row").dim(0);
    buf.ensure({}, 2, pairs, rows);
    EXPECT_GE(buf.saved(2, "src_row").dim(0), rows);
    EXPECT_GE(buf.saved(2, "recv_w").dim(0), pairs);
    EXPECT_EQ(buf.saved(1, "src_row").dim(0), l1_rows);
    for (const char* name : {"x_perm", "a", "h"}) {
      EXPECT_GE(buf.saved(2, name).dim(0), rows) << name;
      EXPECT_EQ(buf.saved(1, name).dim(0) >= rows, ExpertBuffers::recomputed(r, name)) << name;
    }
    EXPECT_GE(buf.scratch("dy_perm").dim(0), rows);
  }
  EXPECT_EQ(bytes[Recompute::kAttention], bytes[Recompute::kNone]);
  EXPECT_LT(bytes[Recompute::kMoe], bytes[Recompute::kNone]);
  EXPECT_LT(bytes[Recompute::kFull], bytes[Recompute::kMoe]);
}

TEST(MemoryPlan, EqualsTheAllocatedArenasTinyPreset) {
  const ModelConfig cfg = load_model_config(test::repo_path("configs/tiny.yaml"));
  for (const Precision prec : {Precision::kF32, Precision::kBF16})
    for (const Layout& lay : std::vector<Layout>{{1, 1, 0}, {8, 4, 1 << 16}, {8, 4, 1 << 16, 2}, {4, 1, 0, 2}})
      for (const std::string moments : {"f32", "bf16"}) check_rank(cfg, prec, lay, lay.world - 1, 2, 32, moments);
  // fp8 (no expert parallelism): the FP8 quantisation scratch (aliases over one host view) is planned alike.
  for (const Layout& lay : std::vector<Layout>{{1, 1, 0}, {8, 1, 1 << 16}})
    check_rank(cfg, Precision::kFP8, lay, lay.world - 1, 2, 32);
}

// The fp8 mode against the bf16 mode on the presets it is measured on (docs/model.md §7): the same
// activation bytes (the FP8 scratch lies in scratch.dlogits, no e4m3 weight copies), and on one GPU
// 2 bytes less per element of every FP8 weight (an f32 compute weight that is its own master instead
// of a bf16 copy and an f32 master). Each tensor's offset rounds up to 128 elements in the compute,
// gradient and master buffers, so the layouts' padding differs by at most 3·128·4 bytes per tensor.
// On two ranks the FP8 weights keep their bf16 copies: the bf16 mode's compute weights.
TEST(MemoryPlan, Fp8PlansBelowBf16OnOneGpu) {
  struct Case {
    const char* config;
    int64_t micro_batch, seq;
  };
  for (const Case& c : {Case{"configs/seed-slice.yaml", 4, 4096}, Case{"configs/bench.yaml", 8, 2048}}) {
    SCOPED_TRACE(c.config);
    const ModelConfig cfg = load_model_config(test::repo_path(c.config));
    const PrecisionPlan fp8(Precision::kFP8, DType::kF32);
    int64_t fp8_elems = 0, fp8_tensors = 0;
    for (const ParamSpec& p : parameter_specs(cfg)) {
      if (!fp8.fp8_weight(p)) continue;
      fp8_elems += p.shape.numel();
      ++fp8_tensors;
    }
    ASSERT_GT(fp8_elems, 0);
    for (const int64_t world : {int64_t{1}, int64_t{2}}) {
      const RunShape b{.world = world, .precision = Precision::kBF16, .micro_batch = c.micro_batch, .seq = c.seq};
      RunShape f = b;
      f.precision = Precision::kFP8;
      const RankMemory m16 = plan_rank(cfg, b, 0), m8 = plan_rank(cfg, f, 0);
      EXPECT_EQ(item(m8, "activations"), item(m16, "activations"));
      if (world == 2) {
        EXPECT_EQ(item(m8, "compute_weights"), item(m16, "compute_weights"));
        EXPECT_EQ(m8.total_bytes(), m16.total_bytes());
        continue;
      }
      ASSERT_LT(m8.total_bytes(), m16.total_bytes());
      const double saved = static_cast<double>(m16.total_bytes() - m8.total_bytes());
      EXPECT_NEAR(saved, 2.0 * static_cast<double>(fp8_elems), 3.0 * 128 * 4 * static_cast<double>(fp8_tensors));
    }
  }
}

// Independent of the planning code: the bytes follow from the parameter counts, up to the
// layout's padding (each tensor starts at a multiple of 128 elements, each bucket is padded to dp
// chunks of 128-element multiples, each arena view to 256 bytes).
TEST(MemoryPlan, CountsAgreeWithTheParameterList) {
  const ModelConfig cfg = load_model_config(test::repo_path("configs/tiny.yaml"));
  const ParamCounts n = count_parameters(cfg, cfg.max_seq_len);
  int64_t experts = 0;
  for (const ParamSpec& p : parameter_specs(cfg))
    if (p.kind == ParamKind::kExpert) experts += p.shape.numel();
  const int64_t n_tensors = static_cast<int64_t>(parameter_specs(cfg).size());
  for (const int64_t ep : {1, 2, 4}) {
    const RunShape run{.world = 8, .ep = ep, .precision = Precision::kF32, .micro_batch = 1, .seq = 64};
    const MemoryPlan p = plan_memory(cfg, run);
    EXPECT_EQ(p.expert_params_per_rank, experts / ep);
    EXPECT_EQ(p.dense_params, n.total - experts);
    const RankMemory& r = p.ranks.front();
    const int64_t held = p.dense_params + p.expert_params_per_rank;
    const uint64_t slack = static_cast<uint64_t>(n_tensors * 128 * 4 + 4 * 8 * 128 * 4 + 4 * 256);
    EXPECT_GE(item(r, "gradients"), static_cast<uint64_t>(4 * held));
    EXPECT_LE(item(r, "gradients"), static_cast<uint64_t>(4 * held) + slack);
    // f32: no masters; moments 2 × 4 bytes of this rank's share (dense 1/8, experts 1/(8/ep)).
    EXPECT_EQ(item(r, "optimizer_masters"), 0u);
    const double share =
        static_cast<double>(p.dense_params) / 8 + static_cast<double>(p.expert_params_per_rank) / (8.0 / ep);
    EXPECT_GE(static_cast<double>(item(r, "optimizer_moments")), 8 * share);
    EXPECT_LE(static_cast<double>(item(r, "optimizer_moments")), 8 * share + static_cast<double>(slack));
    EXPECT_TRUE(p.all_ranks_equal);
  }
  // bf16: the GEMM weights' compute copies take 2 bytes, and their f32 masters appear.
  const RankMemory f = plan_rank(cfg, RunShape{.precision = Precision::kF32, .seq = 64}, 0);
  const RankMemory b = plan_rank(cfg, RunShape{.precision = Precision::kBF16, .seq = 64}, 0);
  EXPECT_LT(item(b, "compute_weights"), item(f, "compute_weights"));
  EXPECT_GT(item(b, "compute_weights"), item(f, "compute_weights") / 2);
  EXPECT_EQ(item(b, "gradients"), item(f, "gradients"));
  EXPECT_EQ(item(b, "optimizer_moments"), item(f, "optimizer_moments"));
  EXPECT_GT(item(b, "optimizer_masters"), 0u);
  EXPECT_LT(item(b, "activations"), item(f, "activations"));
  // bf16 moments: 2 × 2 bytes per owned element (half of f32's, up to the 256-byte view padding);
  // the masters, gradients and activations as before; the plan no longer offers them as a saving.
  RunShape run16{.precision = Precision::kBF16, .seq = 64, .moment_dtype = "bf16"};
  const RankMemory h = plan_rank(cfg, run16, 0);
  const double half = static_cast<double>(item(b, "optimizer_moments")) / 2, pad = 2 * 8 * 256;  // ≤ 8 groups
  EXPECT_NEAR(static_cast<double>(item(h, "optimizer_moments")), half, pad);
  EXPECT_EQ(item(h, "optimizer_masters"), item(b, "optimizer_masters"));
  EXPECT_EQ(item(h, "gradients"), item(b, "gradients"));
  EXPECT_EQ(h.total_bytes() + item(b, "optimizer_moments") - item(h, "optimizer_moments"), b.total_bytes());
  const auto offers_bf16_moments = [&](const RunShape& r) {
    for (const MissingFeature& f : plan_memory(cfg, r).missing)
      if (f.key == "bf16_moments") return true;
    return false;
  };
  EXPECT_TRUE(offers_bf16_moments(RunShape{.precision = Precision::kBF16, .seq = 64}));
  EXPECT_FALSE(offers_bf16_moments(run16));
  run16.moment_dtype = "f16";
  EXPECT_THROW(plan_rank(cfg, run16, 0), Error);
}

TEST(MemoryPlan, ExpertParallelDispatchEstimate) {
  const ModelConfig cfg = test::micro_diff_config();  // E = 8, K = 2
  const RunShape one{.world = 4, .ep = 1, .micro_batch = 2, .seq = 8};
  EXPECT_EQ(item(plan_rank(cfg, one, 0), "ep_buffers"), 0u);
  for (const int64_t ep : {2, 4}) {
    const MemoryPlan p = plan_memory(cfg, RunShape{.world = 4, .ep = ep, .micro_batch = 2, .seq = 8});
    const int64_t N = 16, K = 2;
    EXPECT_EQ(p.ep_rows_avg, static_cast<uint64_t>(N * K));
    EXPECT_EQ(p.ep_rows_worst, static_cast<uint64_t>(ep * N * std::min<int64_t>(K, 8 / ep)));
    const uint64_t avg = item(p.ranks.front(), "ep_buffers");
    EXPECT_GT(avg, 0u);
    EXPECT_GT(p.ep_worst_bytes, avg);
    const MemoryItem* it = nullptr;
    for (const MemoryItem& i : p.ranks.front().items)
      if (i.key == "ep_buffers") it = &i;
    ASSERT_NE(it, nullptr);
    EXPECT_FALSE(it->estimate);  // the buffers as allocated at the start (check_rank compares them)
  }
}

// ZeRO-2 in the plan: the gradient line shrinks to the slots (+ the full buffers of groups with
// dp = 1), the offer of sharded gradients goes away, and --zero-stage / --grad-slots are checked.
TEST(MemoryPlan, ZeroStage2) {
  const ModelConfig cfg = load_model_config(test::repo_path("configs/tiny.yaml"));
  const auto offers_sharding = [&](const RunShape& r) {
    for (const MissingFeature& f : plan_memory(cfg, r).missing)
      if (f.key == "sharded_gradients") return f.saves_bytes;
    return uint64_t{0};
  };
  RunShape one{.world = 8, .ep = 2, .precision = Precision::kBF16, .seq = 64, .bucket_elems = 1 << 16};
  RunShape two = one;
  two.zero_stage = 2;
  const RankMemory r1 = plan_rank(cfg, one, 0), r2 = plan_rank(cfg, two, 0);
  // (The tiny preset's largest tensors, the embedding and head, make its slots large next to its
  // layers: less than the full buffers, not by the 1/dp of the optimizer chunks.)
  EXPECT_LT(item(r2, "gradients"), item(r1, "gradients"));
  EXPECT_EQ(item(r2, "optimizer_moments"), item(r1, "optimizer_moments"));  // the same buckets and chunks
  EXPECT_EQ(offers_sharding(one), item(r1, "gradients") - item(r2, "gradients"));
  EXPECT_EQ(offers_sharding(two), 0u);
  // One rank: nothing is data parallel, nothing to shard or offer.
  EXPECT_EQ(offers_sharding(RunShape{.seq = 64}), 0u);
  EXPECT_EQ(item(plan_rank(cfg, RunShape{.seq = 64, .zero_stage = 2}, 0), "gradients"),
            item(plan_rank(cfg, RunShape{.seq = 64}, 0), "gradients"));
  auto message = [&](const RunShape& r) { return plan_error(cfg, r); };
  RunShape bad = two;
  bad.zero_stage = 3;
  EXPECT_NE(message(bad).find("--zero-stage"), std::string::npos);
  bad = two;
  bad.grad_slots = 1;  // a layer's buckets are open together: one slot cannot hold them
  EXPECT_NE(message(bad).find("parallel.grad_slots"), std::string::npos) << message(bad);
}

TEST(MemoryPlan, BadLayoutsNameTheOption) {
  const ModelConfig cfg = test::micro_diff_config();
  auto message = [&](const RunShape& r) { return plan_error(cfg, r); };
  EXPECT_NE(message({.world = 4, .ep = 3}).find("--ep"), std::string::npos);
  EXPECT_NE(message({.world = 0}).find("--world"), std::string::npos);
  EXPECT_NE(message({.world = 1, .seq = 9}).find("--seq"), std::string::npos);
  EXPECT_NE(message({.world = 1, .seq = -5}).find("--seq: -5 is negative"), std::string::npos);
  EXPECT_NE(message({.world = 1, .micro_batch = 0}).find("--micro-batch"), std::string::npos);
  // EP 3 divides the world 6 but not the 8 routed experts: the layout names parallel.expert.
  EXPECT_NE(message({.world = 6, .ep = 3}).find("n_routed_experts"), std::string::npos);
}

}  // namespace
}  // namespace diffmoe
