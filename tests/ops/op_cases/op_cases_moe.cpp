// Op cases: the MoE router (forward and backward), the routing plan (moe_permute) and the data
// movement around the experts (moe_gather and its backward, moe_combine forward and backward) of
// cuda/moe_ops.cu (docs/model.md §5, docs/derivations.md §4.2, §4.4). Method and modes: op_case.h.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "op_case.h"

namespace diffmoe::opcases {
namespace {

constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};
// Scores: sigmoid in f32 (the GPU's expf vs glibc's differ by up to 2 ulps) or softmax with an f64
// denominator; the weights divide those scores in f64: relative 1e-6.
constexpr Tol kScoreTol{1e-6, 1e-8, "f32 expf (<= 2 ulp apart) / f64 softmax"};

// ---------------------------------------------------------------- router

struct RouterShape {
  int64_t N, E, K, groups, limited;
  ScoreFunc func;
  bool bias;
  double route_scale;
  const char* branch;
  bool bench_only = false;
};

OpCase router_case(const RouterShape& r, uint64_t seed) {
  const RouterOptions opt{.score_func = r.func,
                          .n_groups = r.groups,
                          .n_limited_groups = r.limited,
                          .top_k = r.K,
                          .route_scale = r.route_scale,
                          .use_bias = r.bias};
  OpCase c{.op = "router",
           .branch = r.branch,
           .shape = fmt::format("N{} E{} K{} G{}/{} {}{}", r.N, r.E, r.K, r.limited, r.groups,
                                r.func == ScoreFunc::kSigmoid ? "sigmoid" : "softmax", r.bias ? " bias" : "")};
  c.seed = seed;
  c.bench_only = r.bench_only;
  c.tensors = {
      {.name = "logits", .shape = Shape{r.N, r.E}, .init = normal(2.0)},
      {.name = "bias", .shape = Shape{r.E}, .init = normal(0.05)},
      {.name = "scores", .shape = Shape{r.N, r.E}, .role = Role::kOutput},
      {.name = "topk_idx", .shape = Shape{r.N, r.K}, .dtype = DType::kI32, .role = Role::kOutput},
      {.name = "topk_w", .shape = Shape{r.N, r.K}, .role = Role::kOutput},
      {.name = "counts",
       .shape = Shape{r.E},
       .dtype = DType::kI32,
       .role = Role::kUpdate,
       .init = ints(0, 5)},  // accumulate
      {.name = "dtopk_w", .shape = Shape{r.N, r.K}, .init = normal(), .bwd_only = true},
      {.name = "dlogits", .shape = Shape{r.N, r.E}, .role = Role::kOutput, .step = Step::kBwd},
  };
  const bool bias = r.bias;
  c.fwd = [opt, bias](Backend& be, const Tensors& t) {
    be.router_fwd({}, {.scores = t("scores"),
                       .topk_idx = t("topk_idx"),
                       .topk_w = t("topk_w"),
                       .counts = t("counts"),
                       .logits = t("logits"),
                       .bias = bias ? t("bias") : Tensor{},
                       .opt = opt});
  };
  c.bwd = [opt](Backend& be, const Tensors& t) {
    be.router_bwd({}, {.dlogits = t("dlogits"),
                       .dtopk_w = t("dtopk_w"),
                       .scores = t("scores"),
                       .topk_idx = t("topk_idx"),
                       .topk_w = t("topk_w"),
                       .opt = opt});
  };
  c.tol = kScoreTol;
  // Indices and counts: the same selection; dlogits: f64 per-token sums in the CPU's k order on one lane.
  c.tol_of = {{"topk_idx", kExact}, {"counts", kExact}, {"dlogits", kRoundOnce}};
  // No gradient through the selection (docs/derivations.md §4.4): a step of 1e-6 on random logits
  // changes no pick, so the finite differences see the same gradient.
  c.grads = {{"logits", "dlogits"}};
  c.upstream = {{"topk_w", "dtopk_w"}};
  return c;
}

// ---------------------------------------------------------------- sequence-wise aux loss

// Scores as the router writes them: sigmoid(z) or the row softmax of z ~ N(0, 2²).
Init router_scores(int64_t N, int64_t E, ScoreFunc func) {
  return computed([=](uint64_t seed) {
    std::vector<double> s(static_cast<size_t>(N * E));
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        const double z = 2.0 * normal_at(seed, 0x5c, static_cast<uint64_t>(n * E + e));
        double& v = s[static_cast<size_t>(n * E + e)];
        v = func == ScoreFunc::kSigmoid ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z);
        sum += v;
      }
      if (func == ScoreFunc::kSoftmax)
        for (int64_t e = 0; e < E; ++e) s[static_cast<size_t>(n * E + e)] /= sum;
    }
    return s;
  });
}

OpCase aux_loss_case(int64_t N, int64_t E, int64_t K, int64_t seq, ScoreFunc func, const char* branch, uint64_t seed) {
  OpCase c{
      .op = "aux_loss",
      .branch = branch,
      .shape = fmt::format("N{} E{} K{} T{} {}", N, E, K, seq, func == ScoreFunc::kSigmoid ? "sigmoid" : "softmax")};
  c.seed = seed;
  c.tensors = {
      {.name = "scores", .shape = Shape{N, E}, .init = router_scores(N, E, func)},
      {.name = "loss", .shape = Shape{1}, .role = Role::kUpdate, .init = values({0.25})},  // accumulates
      {.name = "dlogits",
       .shape = Shape{N, E},
       .role = Role::kUpdate,
       .step = Step::kBwd,
       .init = normal()},  // accumulates
  };
  constexpr double kAlpha = 0.01;
  c.fwd = [=](Backend& be, const Tensors& t) {
    be.aux_loss_fwd(
        {},
        {.loss = t("loss"), .scores = t("scores"), .seq_len = seq, .top_k = K, .alpha = kAlpha, .score_func = func});
  };
  c.bwd = [=](Backend& be, const Tensors& t) {
    be.aux_loss_bwd({}, {.dlogits = t("dlogits"),
                         .scores = t("scores"),
                         .seq_len = seq,
                         .top_k = K,
                         .alpha = kAlpha,
                         .dloss = 1.3,
                         .score_func = func});
  };
  // f64 sums over the sequence's tokens in blocks, rounded once.
  c.tol = Tol{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};
  c.no_fd =
      "the backward is d/dlogits but the forward reads scores: test_moe_ops.cpp AuxLossFd chains the score function";
  return c;
}

// ---------------------------------------------------------------- routing plan and data movement

// A routing plan computed on the host: K distinct experts per token in [0, E) (as the router picks
// them), or with `unused` every 5th slot −1 (expert parallelism: another rank's slot); then the
// stable sort by expert of moe_permute (op_args.h MoePermuteArgs).
struct HostPlan {
  std::vector<double> idx, offsets, src_row, slot_pos;
};
HostPlan host_plan(int64_t N, int64_t K, int64_t E, uint64_t seed, bool unused) {
  HostPlan p;
  p.idx.resize(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int64_t> picked;
    for (uint64_t draw = 0; static_cast<int64_t>(picked.size()) < K; ++draw) {
      const int64_t e =
          static_cast<int64_t>(uniform_at(seed, static_cast<uint64_t>(n), draw) * static_cast<double>(E)) % E;
      if (std::find(picked.begin(), picked.end(), e) == picked.end()) picked.push_back(e);
    }
    for (int64_t k = 0; k < K; ++k)
      p.idx[static_cast<size_t>(n * K + k)] =
          unused && (n * K + k) % 5 == 2 ? -1.0 : static_cast<double>(picked[static_cast<size_t>(k)]);
  }
  p.offsets.assign(static_cast<size_t>(E + 1), 0.0);
  p.slot_pos.assign(static_cast<size_t>(N * K), -1.0);
  p.src_row.assign(static_cast<size_t>(N * K), 0.0);  // rows past the used ones: unused by the ops
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.offsets[static_cast<size_t>(e)] = static_cast<double>(row);
    for (int64_t i = 0; i < N * K; ++i)
      if (p.idx[static_cast<size_t>(i)] == static_cast<double>(e)) {
        p.src_row[static_cast<size_t>(row)] = static_cast<double>(i / K);
        p.slot_pos[static_cast<size_t>(i)] = static_cast<double>(row++);
      }
  }
  p.offsets[static_cast<size_t>(E)] = static_cast<double>(row);
  return p;
}

Init plan_field(int64_t N, int64_t K, int64_t E, uint64_t seed, bool unused, std::vector<double> HostPlan::*field) {
  return computed([=](uint64_t) { return host_plan(N, K, E, seed, unused).*field; });
}

OpCase permute_case(int64_t N, int64_t K, int64_t E, bool repeats, bool unused, const char* branch, uint64_t seed,
                    bool bench_only = false) {
  OpCase c{.op = "moe_permute", .branch = branch, .shape = fmt::format("N{} K{} E{}", N, K, E)};
  c.seed = seed;
  c.bench_only = bench_only;
  // repeats: random experts in [0, E/3) with repeats within a token: the upper experts stay empty.
  const Init idx = repeats ? ints(0, static_cast<int32_t>(E / 3)) : plan_field(N, K, E, seed, unused, &HostPlan::idx);
  c.tensors = {
      {.name = "topk_idx", .shape = Shape{N, K}, .dtype = DType::kI32, .init = idx},
      {.name = "offsets", .shape = Shape{E + 1}, .dtype = DType::kI32, .role = Role::kOutput},
      // With unused slots, src_row's rows past the used ones are left as they are.
      {.name = "src_row",
       .shape = Shape{N * K},
       .dtype = DType::kI32,
       .role = unused ? Role::kUpdate : Role::kOutput,
       .init = ints(0, 1000)},
      {.name = "slot_pos", .shape = Shape{N, K}, .dtype = DType::kI32, .role = Role::kOutput},
  };
  c.fwd = [E](Backend& be, const Tensors& t) {
    be.moe_permute({}, {.offsets = t("offsets"),
                        .src_row = t("src_row"),
                        .slot_pos = t("slot_pos"),
                        .topk_idx = t("topk_idx"),
                        .n_experts = E});
  };
  c.tol = kExact;
  return c;
}

struct MoveShape {
  int64_t N, K, E, D;
  int64_t offset;  // 1: unaligned views (the scalar paths)
  bool unused;     // every 5th slot −1
  const char* branch;
  bool bench_only = false;
};

// x_perm[r] = x[src_row[r]]; backward dx[n] += Σ_k dx_perm[slot_pos[n,k]] (its adjoint).
OpCase gather_case(const MoveShape& m, uint64_t seed) {
  const int64_t N = m.N, K = m.K, E = m.E, D = m.D;
  const auto init = [&](Init i) { return m.bench_only ? tiled(i) : i; };
  OpCase c{.op = "moe_gather", .branch = m.branch, .shape = fmt::format("N{} K{} D{}", N, K, D)};
  c.seed = seed;
  c.bench_only = m.bench_only;
  c.tensors = {
      {.name = "x", .shape = Shape{N, D}, .init = init(normal()), .offset = m.offset},
      {.name = "src_row",
       .shape = Shape{N * K},
       .dtype = DType::kI32,
       .init = plan_field(N, K, E, seed, m.unused, &HostPlan::src_row)},
      {.name = "slot_pos",
       .shape = Shape{N, K},
       .dtype = DType::kI32,
       .init = plan_field(N, K, E, seed, m.unused, &HostPlan::slot_pos)},
      {.name = "x_perm", .shape = Shape{N * K, D}, .role = Role::kOutput, .offset = m.offset},
      {.name = "dx_perm", .shape = Shape{N * K, D}, .init = init(normal()), .offset = m.offset, .bwd_only = true},
      // Accumulates (dx already holds the shared expert's dx).
      {.name = "dx",
       .shape = Shape{N, D},
       .role = Role::kUpdate,
       .step = Step::kBwd,
       .init = init(normal()),
       .offset = m.offset},
  };
  c.fwd = [](Backend& be, const Tensors& t) {
    be.moe_gather({}, {.x_perm = t("x_perm"), .x = t("x"), .src_row = t("src_row")});
  };
  c.bwd = [](Backend& be, const Tensors& t) {
    be.moe_gather_bwd({}, {.dx = t("dx"), .dx_perm = t("dx_perm"), .slot_pos = t("slot_pos")});
  };
  c.tol = kExact;
  c.tol_of = {{"dx", Tol{1e-6, 1e-7, "f64 sum over k in order, rounded once"}}};
  c.grads = {{"x", "dx"}};
  c.upstream = {{"x_perm", "dx_perm"}};
  if (m.unused)
    c.no_fd = "rows past the used ones gather x[src_row = 0] but no slot reads them back: not an adjoint pair";
  return c;
}

// y[n] += Σ_k w[n,k]·y_perm[slot_pos[n,k]]; backward dy_perm = w·dy, dtopk_w = ⟨dy, y_perm⟩.
OpCase combine_case(const MoveShape& m, uint64_t seed) {
  const int64_t N = m.N, K = m.K, E = m.E, D = m.D;
  const auto init = [&](Init i) { return m.bench_only ? tiled(i) : i; };
  OpCase c{.op = "moe_combine", .branch = m.branch, .shape = fmt::format("N{} K{} D{}", N, K, D)};
  c.seed = seed;
  c.bench_only = m.bench_only;
  c.tensors = {
      {.name = "y_perm", .shape = Shape{N * K, D}, .init = init(normal()), .offset = m.offset},
      {.name = "topk_w", .shape = Shape{N, K}, .init = normal(0.5)},
      {.name = "slot_pos",
       .shape = Shape{N, K},
       .dtype = DType::kI32,
       .init = plan_field(N, K, E, seed, m.unused, &HostPlan::slot_pos)},
      // Accumulates (y already holds the shared expert's output).
      {.name = "y", .shape = Shape{N, D}, .role = Role::kUpdate, .init = init(normal()), .offset = m.offset},
      {.name = "dy", .shape = Shape{N, D}, .init = init(normal()), .offset = m.offset, .bwd_only = true},
      {.name = "dy_perm",
       .shape = Shape{N * K, D},
       .role = m.unused ? Role::kUpdate : Role::kOutput,
       .step = Step::kBwd,
       .init = normal(),
       .offset = m.offset},
      {.name = "dtopk_w", .shape = Shape{N, K}, .role = Role::kOutput, .step = Step::kBwd},
  };
  c.fwd = [](Backend& be, const Tensors& t) {
    be.moe_combine_fwd({}, {.y = t("y"), .y_perm = t("y_perm"), .topk_w = t("topk_w"), .slot_pos = t("slot_pos")});
  };
  c.bwd = [](Backend& be, const Tensors& t) {
    be.moe_combine_bwd({}, {.dy_perm = t("dy_perm"),
                            .dtopk_w = t("dtopk_w"),
                            .dy = t("dy"),
                            .y_perm = t("y_perm"),
                            .topk_w = t("topk_w"),
                            .slot_pos = t("slot_pos")});
  };
  c.tol = kRoundOnce;  // y, dtopk_w: f64 sums over k in order / f64 dot in another order, rounded once
  c.tol_of = {{"dy_perm", Tol{0.0, 0.0, "one f32 product on both sides"}}};
  c.grads = {{"y_perm", "dy_perm"}, {"topk_w", "dtopk_w"}};
  c.upstream = {{"y", "dy"}};
  if (m.unused) c.no_fd = "rows of unused slots are outside the op: the full-plan cases check the formula";
  return c;
}

}  // namespace

std::vector<OpCase> moe_cases() {
  std::vector<OpCase> out;
  uint64_t seed = 700;
  // Every branch: groups with the top-2 score (bias on) and the max score (bias off), no groups,
  // sigmoid and softmax, E = 8 … 256 (one to eight experts per lane).
  for (const RouterShape& r :
       {RouterShape{203, 64, 6, 8, 3, ScoreFunc::kSigmoid, true, 2.5, "groups, top-2 group score"},
        RouterShape{97, 8, 2, 1, 1, ScoreFunc::kSoftmax, false, 1.0, "softmax, no groups"},
        RouterShape{67, 256, 8, 8, 4, ScoreFunc::kSigmoid, true, 1.5, "eight experts per lane"},
        RouterShape{50, 12, 3, 4, 2, ScoreFunc::kSigmoid, false, 1.0, "groups, max group score"},
        RouterShape{58, 16, 2, 4, 1, ScoreFunc::kSoftmax, true, 1.0, "softmax, one group of four"},
        RouterShape{16384, 64, 4, 8, 4, ScoreFunc::kSigmoid, true, 1.0, "groups (bench preset)", true}})
    out.push_back(router_case(r, seed++));
  // N = 300: two sequences of 150 tokens, each spread over three 64-token blocks.
  out.push_back(aux_loss_case(300, 32, 4, 150, ScoreFunc::kSigmoid, "two sequences, three blocks each", seed++));
  out.push_back(aux_loss_case(97, 8, 2, 97, ScoreFunc::kSoftmax, "one sequence, softmax", seed++));
  out.push_back(aux_loss_case(203, 64, 6, 29, ScoreFunc::kSigmoid, "seven short sequences", seed++));
  out.push_back(permute_case(203, 6, 64, false, false, "distinct experts per token", seed++));
  out.push_back(permute_case(50, 3, 16, true, false, "repeats, empty experts", seed++));
  out.push_back(permute_case(61, 4, 16, false, true, "unused slots (expert parallelism)", seed++));
  out.push_back(permute_case(16384, 4, 64, false, false, "distinct experts (bench preset)", seed++, true));
  // D = 37: the scalar paths; D = 1028: float4 pieces, more than one pass of a warp's lanes and a
  // partial last pass. K = 6: one full group of four slots and a partial one (combine/gather_bwd).
  // D = 64 one element off the alignment: the scalar paths at a width that would take float4.
  const MoveShape moves[] = {
      {203, 6, 64, 37, 0, false, "scalar: odd width"},
      {203, 6, 64, 1028, 0, false, "float4, partial last pass"},
      {45, 3, 8, 64, 1, false, "unaligned views: scalar path"},
      {61, 4, 16, 40, 0, true, "unused slots (expert parallelism)"},
      {16384, 4, 64, 1536, 0, false, "float4 (bench preset)", true},
  };
  for (const MoveShape& m : moves) out.push_back(gather_case(m, seed++));
  for (const MoveShape& m : moves) out.push_back(combine_case(m, seed++));
  return out;
}

}  // namespace diffmoe::opcases
