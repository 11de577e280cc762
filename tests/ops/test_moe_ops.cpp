// MoE ops of the CPU reference backend (docs/model.md §5, docs/derivations.md §4.2–4.6):
// - routing invariants over many random inputs, against an independent sort-based reference
//   written here (group choice recomputed from scratch), plus constructed cases for the group rule,
//   the bias, softmax's missing renormalisation and ties;
// - the dispatch plan (counts, offsets, inverse permutations, stability) and the data movement
//   (gather, combine) against direct loops;
// - every backward against central finite differences in f64 (test::kGradTol), including one
//   composed check router_fwd → combine and back;
// - the bias update's sign rule and the errors that must name the op.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::copy_values;
using test::cpu;
using test::expect_error;
using test::expect_grad;
using test::Owned;

const Context kCtx{};

void set_values(const Tensor& t, const std::vector<double>& v) {
  ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) test::set(t, i, v[static_cast<size_t>(i)]);
}

// All buffers of one router call.
struct Router {
  Router(int64_t n, int64_t e, int64_t k, DType dt)
      : n_tokens(n),
        n_experts(e),
        top_k(k),
        logits({n, e}, dt),
        bias({e}, dt),
        scores({n, e}, dt),
        idx({n, k}, DType::kI32),
        w({n, k}, dt),
        counts({e}, DType::kI32) {}
  int64_t n_tokens, n_experts, top_k;
  Owned logits, bias, scores, idx, w, counts;

  void forward(const RouterOptions& opt) const {
    cpu().router_fwd(
        kCtx,
        {.scores = scores, .topk_idx = idx, .topk_w = w, .counts = counts, .logits = logits, .bias = bias, .opt = opt});
  }
  std::vector<int32_t> indices() const { return {idx.ptr<int32_t>(), idx.ptr<int32_t>() + idx.numel()}; }
};

// ------------------------------------------------------------------ independent reference routing

struct RefRoute {
  std::vector<int> idx;          // [K], descending selection score, ties to the lower index
  std::vector<bool> kept_group;  // [G]
};

// Sort-based reference of docs/derivations.md §4.2 (a different algorithm from the op's arg-max passes).
// `add_bias` and `top2_groups` are separate so the tests can flip the group rule on its own.
template <class T>
RefRoute reference_route(const T* s, const T* b, int64_t n_experts, int64_t n_groups, int64_t n_limited, int64_t top_k,
                         bool add_bias, bool top2_groups) {
  std::vector<T> sel(static_cast<size_t>(n_experts));
  for (int64_t e = 0; e < n_experts; ++e) sel[e] = add_bias ? static_cast<T>(s[e] + b[e]) : s[e];
  const int64_t group_size = n_experts / n_groups;
  RefRoute r;
  r.kept_group.assign(static_cast<size_t>(n_groups), true);
  if (n_groups > 1) {
    std::vector<T> group_score(static_cast<size_t>(n_groups));
    for (int64_t g = 0; g < n_groups; ++g) {
      std::vector<T> v(sel.begin() + g * group_size, sel.begin() + (g + 1) * group_size);
      std::sort(v.begin(), v.end(), std::greater<T>());
      group_score[g] = top2_groups ? static_cast<T>(v[0] + v[1]) : v[0];
    }
    std::vector<int> order(static_cast<size_t>(n_groups));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return group_score[x] > group_score[y]; });
    r.kept_group.assign(static_cast<size_t>(n_groups), false);
    for (int64_t i = 0; i < n_limited; ++i) r.kept_group[order[i]] = true;
  }
  std::vector<int> candidates;
  for (int e = 0; e < n_experts; ++e)
    if (r.kept_group[e / group_size]) candidates.push_back(e);
  std::stable_sort(candidates.begin(), candidates.end(), [&](int x, int y) { return sel[x] > sel[y]; });
  r.idx.assign(candidates.begin(), candidates.begin() + top_k);
  return r;
}

struct RouteCase {
  const char* name;
  int64_t n_experts;
  RouterOptions opt;
  double bias_std;
};

const std::vector<RouteCase>& route_cases() {
  static const std::vector<RouteCase> cases = {
      {"sigmoid, 4 groups keep 2, bias, K=3",
       12,
       {.score_func = ScoreFunc::kSigmoid,
        .n_groups = 4,
        .n_limited_groups = 2,
        .top_k = 3,
        .route_scale = 2.5,
        .use_bias = true},
       0.1},
      {"sigmoid, 4 groups keep 2, no bias (max), K=3",
       12,
       {.score_func = ScoreFunc::kSigmoid,
        .n_groups = 4,
        .n_limited_groups = 2,
        .top_k = 3,
        .route_scale = 1.0,
        .use_bias = false},
       0.1},
      {"sigmoid, no groups, bias, K=2",
       8,
       {.score_func = ScoreFunc::kSigmoid,
        .n_groups = 1,
        .n_limited_groups = 1,
        .top_k = 2,
        .route_scale = 1.0,
        .use_bias = true},
       0.1},
      {"sigmoid, K = all kept experts",
       12,
       {.score_func = ScoreFunc::kSigmoid,
        .n_groups = 4,
        .n_limited_groups = 2,
        .top_k = 6,
        .route_scale = 1.0,
        .use_bias = true},
       0.1},
      {"softmax, 4 groups keep 2, no bias (max), K=3",
       8,
       {.score_func = ScoreFunc::kSoftmax,
        .n_groups = 4,
        .n_limited_groups = 2,
        .top_k = 3,
        .route_scale = 16.0,
        .use_bias = false},
       0.05},
      {"softmax, 3 groups keep 2, bias, K=3",
       12,
       {.score_func = ScoreFunc::kSoftmax,
        .n_groups = 3,
        .n_limited_groups = 2,
        .top_k = 3,
        .route_scale = 1.0,
        .use_bias = true},
       0.05},
  };
  return cases;
}

// ------------------------------------------------------------------ routing invariants

template <class T>
void check_routing_invariants(const RouteCase& c) {
  constexpr int64_t kTokens = 7, kSeeds = 40;
  constexpr int32_t kCountsBefore = 3;  // counts accumulate: start from a non-zero value
  // f32: sigmoid in float is within a few ulp; everything else is rounded once from double.
  const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-13;
  const RouterOptions& o = c.opt;
  const int64_t E = c.n_experts, K = o.top_k, G = o.n_groups, group_size = E / G;
  int bias_changed_selection = 0, group_rule_matters = 0;
  for (int64_t seed = 1; seed <= kSeeds; ++seed) {
    SCOPED_TRACE(testing::Message() << c.name << " seed " << seed);
    Router r(kTokens, E, K, dtype_of<T>());
    test::fill_normal(r.logits, seed, 1.0);
    test::fill_normal(r.bias, seed + 1000, c.bias_std);  // non-zero even when use_bias is off
    for (int64_t e = 0; e < E; ++e) r.counts.at<int32_t>(e) = kCountsBefore;
    r.forward(o);

    std::vector<int32_t> histogram(static_cast<size_t>(E), 0);
    for (int64_t n = 0; n < kTokens; ++n) {
      const T* z = r.logits.ptr<T>() + n * E;
      const T* s = r.scores.ptr<T>() + n * E;
      const T* b = r.bias.ptr<T>();
      const int32_t* idx = r.idx.ptr<int32_t>() + n * K;
      const T* w = r.w.ptr<T>() + n * K;

      // Scores: sigmoid or softmax of the logits.
      double z_max = -1e300, denom = 0;
      for (int64_t e = 0; e < E; ++e) z_max = std::max(z_max, static_cast<double>(z[e]));
      for (int64_t e = 0; e < E; ++e) denom += std::exp(z[e] - z_max);
      for (int64_t e = 0; e < E; ++e) {
        const double want = o.score_func == ScoreFunc::kSigmoid ? 1.0 / (1.0 + std::exp(-static_cast<double>(z[e])))
                                                                : std::exp(z[e] - z_max) / denom;
        ASSERT_NEAR(s[e], want, tol);
      }

      // Selection equals the independent reference, including the order.
      const RefRoute ref = reference_route(s, b, E, G, o.n_limited_groups, K, o.use_bias, o.use_bias);
      for (int64_t k = 0; k < K; ++k) ASSERT_EQ(idx[k], ref.idx[k]) << "token " << n << " slot " << k;
      // K distinct experts, all in kept groups.
      std::vector<int32_t> sorted(idx, idx + K);
      std::sort(sorted.begin(), sorted.end());
      EXPECT_TRUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) << "duplicate expert";
      for (int64_t k = 0; k < K; ++k) EXPECT_TRUE(ref.kept_group[idx[k] / group_size]) << "expert " << idx[k];

      // Weights: s[idx] (never s + b), renormalised for sigmoid, times route_scale.
      double sum_s = 0, sum_w = 0;
      for (int64_t k = 0; k < K; ++k) sum_s += s[idx[k]];
      for (int64_t k = 0; k < K; ++k) {
        const double want = o.route_scale * s[idx[k]] / (o.score_func == ScoreFunc::kSigmoid ? sum_s : 1.0);
        EXPECT_NEAR(w[k], want, tol * std::abs(want));
        sum_w += w[k];
      }
      if (o.score_func == ScoreFunc::kSigmoid) {
        EXPECT_NEAR(sum_w, o.route_scale, tol * o.route_scale * K);
      } else {
        EXPECT_LT(sum_w, o.route_scale);  // no renormalisation: Σ p[idx] < 1
      }
      for (int64_t k = 0; k < K; ++k) ++histogram[idx[k]];

      // Sensitivity: the bias and the group rule must actually change something somewhere.
      if (o.use_bias) {
        const RefRoute plain = reference_route(s, b, E, G, o.n_limited_groups, K, false, true);
        bias_changed_selection += plain.idx != ref.idx;
      } else if (G > 1) {
        const RefRoute top2 = reference_route(s, b, E, G, o.n_limited_groups, K, false, true);
        group_rule_matters += top2.kept_group != ref.kept_group;
      }
    }
    for (int64_t e = 0; e < E; ++e) EXPECT_EQ(r.counts.at<int32_t>(e), kCountsBefore + histogram[e]) << "expert " << e;
  }
  if (o.use_bias) {
    EXPECT_GT(bias_changed_selection, 0) << c.name << ": the bias never changed a selection, weak test";
  } else if (G > 1) {
    EXPECT_GT(group_rule_matters, 0) << c.name << ": max and top-2 group rules never differed, weak test";
  }
}

TEST(RouterFwd, InvariantsF32) {
  for (const RouteCase& c : route_cases()) check_routing_invariants<float>(c);
}
TEST(RouterFwd, InvariantsF64) {
  for (const RouteCase& c : route_cases()) check_routing_invariants<double>(c);
}

// Logits whose sigmoid is exactly the given scores (up to rounding).
std::vector<double> logit_of(const std::vector<double>& s) {
  std::vector<double> z;
  for (double v : s) z.push_back(std::log(v / (1.0 - v)));
  return z;
}

// Group A = {0.9, 0.1}, group B = {0.8, 0.7}: the top-2 sum keeps B (1.5 > 1.0), the max keeps A.
TEST(RouterFwd, GroupScoreRuleConstructed) {
  const std::vector<double> s = {0.9, 0.1, 0.8, 0.7};
  for (int64_t top_k : {1, 2}) {
    for (bool use_bias : {true, false}) {
      Router r(1, 4, top_k, DType::kF64);
      set_values(r.logits, logit_of(s));
      set_values(r.bias, {0, 0, 0, 0});
      r.forward({.score_func = ScoreFunc::kSigmoid,
                 .n_groups = 2,
                 .n_limited_groups = 1,
                 .top_k = top_k,
                 .route_scale = 1.0,
                 .use_bias = use_bias});
      const std::vector<int32_t> want = use_bias ? std::vector<int32_t>{2, 3} : std::vector<int32_t>{0, 1};
      for (int64_t k = 0; k < top_k; ++k) EXPECT_EQ(r.idx.at<int32_t>(k), want[k]) << "use_bias " << use_bias;
      if (top_k == 2) {
        const double sum = s[want[0]] + s[want[1]];
        for (int64_t k = 0; k < 2; ++k) EXPECT_NEAR(r.w.at<double>(k), s[want[k]] / sum, 1e-14);
      }
    }
  }
}

// The bias moves expert 3 (s = 0.7) to the top, but its weight is still its unbiased score.
TEST(RouterFwd, BiasChangesSelectionButNeverWeights) {
  const std::vector<double> s = {0.9, 0.8, 0.5, 0.7, 0.2, 0.6};
  const RouterOptions opt = {.score_func = ScoreFunc::kSigmoid,
                             .n_groups = 1,
                             .n_limited_groups = 1,
                             .top_k = 2,
                             .route_scale = 2.5,
                             .use_bias = true};
  Router r(1, 6, 2, DType::kF64);
  set_values(r.logits, logit_of(s));
  set_values(r.bias, {0, 0, 0, 0, 0, 0});
  r.forward(opt);
  EXPECT_EQ(r.indices(), (std::vector<int32_t>{0, 1}));
  set_values(r.bias, {0, 0, 0, 0.25, 0, 0});  // s + b of expert 3 = 0.95
  r.forward(opt);
  EXPECT_EQ(r.indices(), (std::vector<int32_t>{3, 0}));
  EXPECT_NEAR(r.w.at<double>(0), 2.5 * 0.7 / 1.6, 1e-14);
  EXPECT_NEAR(r.w.at<double>(1), 2.5 * 0.9 / 1.6, 1e-14);
}

// Softmax: w = route_scale · p[idx], no renormalisation (Σw < route_scale).
TEST(RouterFwd, SoftmaxHasNoRenormalisation) {
  Router r(1, 4, 2, DType::kF64);
  set_values(r.logits, {2, 1, 0, -1});
  r.forward({.score_func = ScoreFunc::kSoftmax,
             .n_groups = 1,
             .n_limited_groups = 1,
             .top_k = 2,
             .route_scale = 1.5,
             .use_bias = false});
  const double denom = std::exp(2.0) + std::exp(1.0) + 1.0 + std::exp(-1.0);
  EXPECT_EQ(r.indices(), (std::vector<int32_t>{0, 1}));
  EXPECT_NEAR(r.w.at<double>(0), 1.5 * std::exp(2.0) / denom, 1e-14);
  EXPECT_NEAR(r.w.at<double>(1), 1.5 * std::exp(1.0) / denom, 1e-14);
  EXPECT_LT(r.w.at<double>(0) + r.w.at<double>(1), 1.5 - 0.1);
}

// Equal scores: groups and experts both go to the lower index.
TEST(RouterFwd, TiesGoToLowerIndex) {
  Router r(2, 8, 3, DType::kF32);
  for (int64_t i = 0; i < 16; ++i) r.logits.at<float>(i) = 0.3f;
  r.forward({.score_func = ScoreFunc::kSigmoid,
             .n_groups = 4,
             .n_limited_groups = 2,
             .top_k = 3,
             .route_scale = 1.0,
             .use_bias = true});
  EXPECT_EQ(r.indices(), (std::vector<int32_t>{0, 1, 2, 0, 1, 2}));
  for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(r.w.at<float>(i), 1.0 / 3.0, 1e-7);
}

TEST(RouterFwd, ErrorsNameTheOp) {
  Router r(3, 12, 7, DType::kF32);
  test::fill_normal(r.logits, 5);
  const RouterOptions good = {.score_func = ScoreFunc::kSigmoid,
                              .n_groups = 4,
                              .n_limited_groups = 2,
                              .top_k = 6,
                              .route_scale = 1.0,
                              .use_bias = true};
  RouterOptions o = good;
  o.top_k = 7;  // only 2 groups · 3 experts = 6 are kept
  expect_error([&] { r.forward(o); }, {"[router_fwd] top_k = 7"});
  o = good;
  o.n_groups = 5;  // 12 experts do not split into 5 groups
  expect_error([&] { r.forward(o); }, {"[router_fwd]"});
  o = good;
  o.n_limited_groups = 5;
  expect_error([&] { r.forward(o); }, {"[router_fwd] n_limited_groups"});
  Owned bad_idx({3, 7}, DType::kF32);
  o = good;
  o.top_k = 7;
  o.n_limited_groups = 4;
  expect_error(
      [&] {
        cpu().router_fwd(kCtx, {.scores = r.scores,
                                .topk_idx = bad_idx,
                                .topk_w = r.w,
                                .counts = r.counts,
                                .logits = r.logits,
                                .bias = r.bias,
                                .opt = o});
      },
      {"[router_fwd] topk_idx"});
  o.top_k = 6;  // idx shape [3,7] no longer matches
  expect_error([&] { r.forward(o); }, {"[router_fwd] topk_idx"});
}

// ------------------------------------------------------------------ dispatch plan

struct Plan {
  Plan(int64_t n, int64_t k, int64_t e)
      : offsets({e + 1}, DType::kI32), src_row({n * k}, DType::kI32), slot_pos({n, k}, DType::kI32) {}
  Owned offsets, src_row, slot_pos;
  void build(const Tensor& topk_idx, int64_t n_experts) const {
    cpu().moe_permute(
        kCtx,
        {.offsets = offsets, .src_row = src_row, .slot_pos = slot_pos, .topk_idx = topk_idx, .n_experts = n_experts});
  }
};

void check_plan(const Owned& idx, const Plan& p, int64_t n_experts) {
  const int64_t N = idx.t().dim(0), K = idx.t().dim(1), R = N * K;
  const int32_t* off = p.offsets.ptr<int32_t>();
  std::vector<int32_t> histogram(static_cast<size_t>(n_experts), 0);
  for (int64_t i = 0; i < R; ++i) ++histogram[idx.at<int32_t>(i)];
  EXPECT_EQ(off[0], 0);
  EXPECT_EQ(off[n_experts], R);
  for (int64_t e = 0; e < n_experts; ++e) EXPECT_EQ(off[e + 1] - off[e], histogram[e]) << "expert " << e;
  // slot_pos is a bijection onto [0, R); src_row inverts it; every row sits in its expert's block.
  std::vector<int64_t> assignment_of_row(static_cast<size_t>(R), -1);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = p.slot_pos.at<int32_t>(n * K + k);
      ASSERT_TRUE(r >= 0 && r < R);
      ASSERT_EQ(assignment_of_row[r], -1) << "row " << r << " used twice";
      assignment_of_row[r] = n * K + k;
      EXPECT_EQ(p.src_row.at<int32_t>(r), n);
      const int32_t e = idx.at<int32_t>(n * K + k);
      EXPECT_TRUE(r >= off[e] && r < off[e + 1]) << "row " << r << " outside expert " << e;
    }
  }
  // Stable: inside an expert's block, rows follow the (token, slot) order.
  for (int64_t e = 0; e < n_experts; ++e)
    for (int32_t r = off[e] + 1; r < off[e + 1]; ++r) EXPECT_LT(assignment_of_row[r - 1], assignment_of_row[r]);
}

TEST(MoePermute, PlanFromRouterAndFromRandomIndices) {
  constexpr int64_t N = 7, K = 3, E = 12;
  Router r(N, E, K, DType::kF32);
  test::fill_normal(r.logits, 11);
  test::fill_normal(r.bias, 12, 0.1);
  r.forward({.score_func = ScoreFunc::kSigmoid,
             .n_groups = 4,
             .n_limited_groups = 2,
             .top_k = K,
             .route_scale = 1.0,
             .use_bias = true});
  Plan p(N, K, E);
  p.build(r.idx, E);
  check_plan(r.idx, p, E);
  // Random indices with repeats inside a row and two empty experts (E−2, E−1).
  Owned idx({N, K}, DType::kI32);
  test::fill_int(idx, 13, 0, E - 2);
  p.build(idx, E);
  check_plan(idx, p, E);
  EXPECT_EQ(p.offsets.at<int32_t>(E - 2), N * K);
  Owned bad({N, K}, DType::kI32);
  test::fill_int(bad, 14, 0, E + 1);
  bad.at<int32_t>(4) = static_cast<int32_t>(E);
  expect_error([&] { p.build(bad, E); }, {"[moe_permute] topk_idx"});
}

// ------------------------------------------------------------------ gather and combine vs direct loops

// A plan and data for the data-movement tests: N tokens, K slots, D features, random routing.
template <class T>
struct Dispatch {
  static constexpr int64_t N = 7, K = 3, E = 12, D = 5, R = N * K;
  Dispatch() : idx({N, K}, DType::kI32), plan(N, K, E) {
    test::fill_int(idx, 21, 0, E);
    plan.build(idx, E);
  }
  Owned idx;
  Plan plan;
  Owned make(Shape shape, uint64_t seed) const {
    Owned t(shape, dtype_of<T>());
    test::fill_normal(t, seed);
    return t;
  }
};

TEST(MoeGather, MatchesDirectLoops) {
  using T = float;
  Dispatch<T> d;
  const int64_t N = d.N, K = d.K, D = d.D, R = d.R;
  Owned x = d.make({N, D}, 31), x_perm = d.make({R, D}, 32);
  cpu().moe_gather(kCtx, {.x_perm = x_perm, .x = x, .src_row = d.plan.src_row});
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < D; ++j) EXPECT_EQ(x_perm.at<T>(r * D + j), x.at<T>(d.plan.src_row.at<int32_t>(r) * D + j));

  // Backward accumulates into dx (which already holds, say, the shared expert's gradient).
  Owned dx = d.make({N, D}, 33), dx_perm = d.make({R, D}, 34);
  const std::vector<double> dx_before = test::to_vector(dx);
  cpu().moe_gather_bwd(kCtx, {.dx = dx, .dx_perm = dx_perm, .slot_pos = d.plan.slot_pos});
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < D; ++j) {
      double want = dx_before[n * D + j];
      for (int64_t k = 0; k < K; ++k) want += dx_perm.at<T>(d.plan.slot_pos.at<int32_t>(n * K + k) * D + j);
      EXPECT_NEAR(dx.at<T>(n * D + j), want, 1e-5 * (1 + std::abs(want)));
    }
  }
}

TEST(MoeCombine, MatchesDirectLoops) {
  using T = float;
  Dispatch<T> d;
  const int64_t N = d.N, K = d.K, D = d.D, R = d.R;
  Owned y = d.make({N, D}, 41), y_perm = d.make({R, D}, 42), w = d.make({N, K}, 43);
  const std::vector<double> y_before = test::to_vector(y);
  cpu().moe_combine_fwd(kCtx, {.y = y, .y_perm = y_perm, .topk_w = w, .slot_pos = d.plan.slot_pos});
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < D; ++j) {
      double want = y_before[n * D + j];
      for (int64_t k = 0; k < K; ++k)
        want += w.at<T>(n * K + k) * y_perm.at<T>(d.plan.slot_pos.at<int32_t>(n * K + k) * D + j);
      EXPECT_NEAR(y.at<T>(n * D + j), want, 1e-5 * (1 + std::abs(want)));
    }
  }

  // Backward overwrites: start both outputs from garbage.
  Owned dy = d.make({N, D}, 44), dy_perm = d.make({R, D}, 45), dw = d.make({N, K}, 46);
  cpu().moe_combine_bwd(
      kCtx, {.dy_perm = dy_perm, .dtopk_w = dw, .dy = dy, .y_perm = y_perm, .topk_w = w, .slot_pos = d.plan.slot_pos});
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = d.plan.slot_pos.at<int32_t>(n * K + k);
      double dot = 0;
      for (int64_t j = 0; j < D; ++j) {
        EXPECT_NEAR(dy_perm.at<T>(r * D + j), w.at<T>(n * K + k) * dy.at<T>(n * D + j), 1e-6);
        dot += static_cast<double>(dy.at<T>(n * D + j)) * y_perm.at<T>(r * D + j);
      }
      EXPECT_NEAR(dw.at<T>(n * K + k), dot, 1e-5 * (1 + std::abs(dot)));
    }
  }
}

// Large calls take the threaded path (above the ops' work threshold); chunks of 7 rows take the
// serial one. Rows are independent and every cross-row sum is ordered, so they must agree bitwise.
TEST(MoeThreads, ThreadedPathMatchesSmallChunksBitwise) {
  constexpr int64_t N = 1500, E = 12, K = 3, D = 4, R = N * K, kChunk = 7;
  const RouterOptions opt = {.score_func = ScoreFunc::kSigmoid,
                             .n_groups = 4,
                             .n_limited_groups = 2,
                             .top_k = K,
                             .route_scale = 2.5,
                             .use_bias = true};
  Router big(N, E, K, DType::kF32), chunked(N, E, K, DType::kF32);
  test::fill_normal(big.logits, 121);
  test::fill_normal(big.bias, 122, 0.1);
  copy_values(chunked.logits, big.logits);
  copy_values(chunked.bias, big.bias);
  big.forward(opt);
  for (int64_t a = 0; a < N; a += kChunk) {
    const int64_t b = std::min(N, a + kChunk);
    cpu().router_fwd(kCtx, {.scores = chunked.scores.t().rows(a, b),
                            .topk_idx = chunked.idx.t().rows(a, b),
                            .topk_w = chunked.w.t().rows(a, b),
                            .counts = chunked.counts,
                            .logits = chunked.logits.t().rows(a, b),
                            .bias = chunked.bias,
                            .opt = opt});
  }
  EXPECT_EQ(test::to_vector(big.scores), test::to_vector(chunked.scores));
  EXPECT_EQ(big.indices(), chunked.indices());
  EXPECT_EQ(test::to_vector(big.w), test::to_vector(chunked.w));
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(big.counts.at<int32_t>(e), chunked.counts.at<int32_t>(e));

  Owned dw({N, K}, DType::kF32), dz_big({N, E}, DType::kF32), dz_chunked({N, E}, DType::kF32);
  test::fill_normal(dw, 123);
  cpu().router_bwd(
      kCtx, {.dlogits = dz_big, .dtopk_w = dw, .scores = big.scores, .topk_idx = big.idx, .topk_w = big.w, .opt = opt});
  for (int64_t a = 0; a < N; a += kChunk) {
    const int64_t b = std::min(N, a + kChunk);
    cpu().router_bwd(kCtx, {.dlogits = dz_chunked.t().rows(a, b),
                            .dtopk_w = dw.t().rows(a, b),
                            .scores = big.scores.t().rows(a, b),
                            .topk_idx = big.idx.t().rows(a, b),
                            .topk_w = big.w.t().rows(a, b),
                            .opt = opt});
  }
  EXPECT_EQ(test::to_vector(dz_big), test::to_vector(dz_chunked));

  Plan plan(N, K, E);
  plan.build(big.idx, E);
  check_plan(big.idx, plan, E);
  Owned x({N, D}, DType::kF32), y_perm({R, D}, DType::kF32), dy({N, D}, DType::kF32);
  test::fill_normal(x, 124);
  test::fill_normal(y_perm, 125);
  test::fill_normal(dy, 126);
  Owned xp_big({R, D}, DType::kF32), xp_chunked({R, D}, DType::kF32);
  Owned y_big({N, D}, DType::kF32), y_chunked({N, D}, DType::kF32);
  Owned dyp_big({R, D}, DType::kF32), dyp_chunked({R, D}, DType::kF32);
  Owned dwc_big({N, K}, DType::kF32), dwc_chunked({N, K}, DType::kF32);
  Owned dx_big({N, D}, DType::kF32), dx_chunked({N, D}, DType::kF32);
  cpu().moe_gather(kCtx, {.x_perm = xp_big, .x = x, .src_row = plan.src_row});
  cpu().moe_combine_fwd(kCtx, {.y = y_big, .y_perm = y_perm, .topk_w = big.w, .slot_pos = plan.slot_pos});
  cpu().moe_combine_bwd(
      kCtx,
      {.dy_perm = dyp_big, .dtopk_w = dwc_big, .dy = dy, .y_perm = y_perm, .topk_w = big.w, .slot_pos = plan.slot_pos});
  cpu().moe_gather_bwd(kCtx, {.dx = dx_big, .dx_perm = y_perm, .slot_pos = plan.slot_pos});
  for (int64_t a = 0; a < N; a += kChunk) {
    const int64_t b = std::min(N, a + kChunk);
    cpu().moe_gather(
        kCtx, {.x_perm = xp_chunked.t().rows(a * K, b * K), .x = x, .src_row = plan.src_row.t().rows(a * K, b * K)});
    cpu().moe_combine_fwd(kCtx, {.y = y_chunked.t().rows(a, b),
                                 .y_perm = y_perm,
                                 .topk_w = big.w.t().rows(a, b),
                                 .slot_pos = plan.slot_pos.t().rows(a, b)});
    cpu().moe_combine_bwd(kCtx, {.dy_perm = dyp_chunked,
                                 .dtopk_w = dwc_chunked.t().rows(a, b),
                                 .dy = dy.t().rows(a, b),
                                 .y_perm = y_perm,
                                 .topk_w = big.w.t().rows(a, b),
                                 .slot_pos = plan.slot_pos.t().rows(a, b)});
    cpu().moe_gather_bwd(
        kCtx, {.dx = dx_chunked.t().rows(a, b), .dx_perm = y_perm, .slot_pos = plan.slot_pos.t().rows(a, b)});
  }
  EXPECT_EQ(test::to_vector(xp_big), test::to_vector(xp_chunked));
  EXPECT_EQ(test::to_vector(y_big), test::to_vector(y_chunked));
  EXPECT_EQ(test::to_vector(dyp_big), test::to_vector(dyp_chunked));
  EXPECT_EQ(test::to_vector(dwc_big), test::to_vector(dwc_chunked));
  EXPECT_EQ(test::to_vector(dx_big), test::to_vector(dx_chunked));
}

// ------------------------------------------------------------------ finite differences (f64)

// Router buffers in f64 for the gradient checks, with a guard: a perturbation of ±h must never
// change the selection (the loss is only differentiable where the selection is constant).
struct RouterFd {
  RouterFd(int64_t n, int64_t e, const RouterOptions& o, uint64_t seed, double bias_std)
      : opt(o), r(n, e, o.top_k, DType::kF64) {
    test::fill_normal(r.logits, seed, 1.0);
    test::fill_normal(r.bias, seed + 1, bias_std);
    r.forward(opt);
    base_idx = r.indices();
  }
  void forward_checked() {
    r.forward(opt);
    if (r.indices() != base_idx) ++selection_flips;
  }
  RouterOptions opt;
  Router r;
  std::vector<int32_t> base_idx;
  int selection_flips = 0;
};

void check_router_bwd_fd(const RouteCase& c) {
  constexpr int64_t kTokens = 7;
  RouterFd f(kTokens, c.n_experts, c.opt, 71, c.bias_std);
  const int64_t K = c.opt.top_k, E = c.n_experts;
  Owned proj({kTokens, K}, DType::kF64);
  test::fill_normal(proj, 72);
  const std::vector<double> numerical = test::numerical_grad(f.r.logits, [&] {
    f.forward_checked();
    return test::dot(f.r.w, proj);
  });
  EXPECT_EQ(f.selection_flips, 0) << c.name;
  f.r.forward(c.opt);
  Owned dlogits({kTokens, E}, DType::kF64);
  test::fill_normal(dlogits, 73);  // garbage: must be overwritten
  cpu().router_bwd(
      kCtx,
      {.dlogits = dlogits, .dtopk_w = proj, .scores = f.r.scores, .topk_idx = f.r.idx, .topk_w = f.r.w, .opt = c.opt});
  const std::vector<double> analytic = test::to_vector(dlogits);
  expect_grad(std::string("router_bwd ") + c.name, analytic, numerical);
  double norm = 0;
  for (double v : analytic) norm += v * v;
  EXPECT_GT(norm, 1e-6) << "trivial gradient";
  if (c.opt.score_func == ScoreFunc::kSigmoid) {  // sigmoid: no gradient to unselected experts
    for (int64_t n = 0; n < kTokens; ++n)
      for (int64_t e = 0; e < E; ++e) {
        const int32_t* idx = f.r.idx.ptr<int32_t>() + n * K;
        if (std::find(idx, idx + K, e) == idx + K) {
          EXPECT_EQ(dlogits.at<double>(n * E + e), 0.0);
        }
      }
  }
}

TEST(RouterFd, RouterBwd) {
  for (const RouteCase& c : route_cases()) check_router_bwd_fd(c);
}

// Aux loss value against the Megatron form of docs/derivations.md §4.6:
//   L_b = Σ_i (Σ_t s'_{t,i}) · count_i · E·α / (K·T²),   loss = mean_b L_b.
TEST(AuxLoss, ValueMatchesMegatronForm) {
  constexpr int64_t B = 2, T = 5, E = 8, K = 2, N = B * T;
  constexpr double alpha = 0.3, loss_before = 0.25;
  for (ScoreFunc func : {ScoreFunc::kSigmoid, ScoreFunc::kSoftmax}) {
    Router r(N, E, K, DType::kF64);
    test::fill_normal(r.logits, 81);
    r.forward({.score_func = func, .n_groups = 1, .n_limited_groups = 1, .top_k = K, .use_bias = false});
    Owned loss({1}, DType::kF64);
    loss.at<double>(0) = loss_before;
    cpu().aux_loss_fwd(
        kCtx, {.loss = loss, .scores = r.scores, .seq_len = T, .top_k = K, .alpha = alpha, .score_func = func});
    double want = 0;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<double> count(E, 0), p_sum(E, 0);
      for (int64_t t = b * T; t < (b + 1) * T; ++t) {
        const double* s = r.scores.ptr<double>() + t * E;
        const RefRoute top = reference_route(s, s, E, 1, 1, K, false, false);
        for (int i : top.idx) count[i] += 1;
        const double norm = func == ScoreFunc::kSigmoid ? std::accumulate(s, s + E, 0.0) : 1.0;
        for (int64_t i = 0; i < E; ++i) p_sum[i] += s[i] / norm;
      }
      for (int64_t i = 0; i < E; ++i) want += p_sum[i] * count[i] * E * alpha / (K * T * T) / B;
    }
    EXPECT_NEAR(loss.at<double>(0) - loss_before, want, 1e-14);
    EXPECT_GT(want, 0.01);
  }
  Router r(7, E, K, DType::kF64);
  Owned loss({1}, DType::kF64);
  expect_error(
      [&] { cpu().aux_loss_fwd(kCtx, {.loss = loss, .scores = r.scores, .seq_len = 5, .top_k = K, .alpha = alpha}); },
      {"[aux_loss_fwd]"});
}

TEST(AuxLossFd, AuxLossBwd) {
  constexpr int64_t B = 2, T = 5, E = 8, K = 2, N = B * T;
  constexpr double alpha = 0.3, dloss = 0.7;
  for (ScoreFunc func : {ScoreFunc::kSigmoid, ScoreFunc::kSoftmax}) {
    // The router with plain top-K gives the scores and, as idx, the aux loss's own selection.
    const RouterOptions plain = {
        .score_func = func, .n_groups = 1, .n_limited_groups = 1, .top_k = K, .use_bias = false};
    RouterFd f(N, E, plain, 91, 0.0);
    Owned loss({1}, DType::kF64);
    const std::vector<double> numerical = test::numerical_grad(f.r.logits, [&] {
      f.forward_checked();
      loss.at<double>(0) = 0;
      cpu().aux_loss_fwd(
          kCtx, {.loss = loss, .scores = f.r.scores, .seq_len = T, .top_k = K, .alpha = alpha, .score_func = func});
      return loss.at<double>(0);
    });
    const char* name =
        func == ScoreFunc::kSigmoid ? "aux_loss_bwd sigmoid, 2 sequences" : "aux_loss_bwd softmax, 2 sequences";
    EXPECT_EQ(f.selection_flips, 0) << name;
    f.r.forward(plain);
    // dlogits accumulates: start from P, compare (dlogits − P) with dloss · numerical.
    Owned dlogits({N, E}, DType::kF64);
    test::fill_normal(dlogits, 92);
    const std::vector<double> before = test::to_vector(dlogits);
    cpu().aux_loss_bwd(kCtx, {.dlogits = dlogits,
                              .scores = f.r.scores,
                              .seq_len = T,
                              .top_k = K,
                              .alpha = alpha,
                              .dloss = dloss,
                              .score_func = func});
    std::vector<double> added = test::to_vector(dlogits), want = numerical;
    for (size_t i = 0; i < added.size(); ++i) {
      added[i] -= before[i];
      want[i] *= dloss;
    }
    expect_grad(name, added, want);
  }
}

// One composed check: loss(z) = Σ proj ⊙ (y0 + combine(y_perm, w(z))) through router_fwd, permute
// and combine with a fixed y_perm; the gradient comes back through combine_bwd → router_bwd.
TEST(MoeComposedFd, RouterThroughCombine) {
  constexpr int64_t N = 7, E = 12, K = 3, D = 4;
  const std::vector<RouterOptions> options = {{.score_func = ScoreFunc::kSigmoid,
                                               .n_groups = 4,
                                               .n_limited_groups = 2,
                                               .top_k = K,
                                               .route_scale = 2.5,
                                               .use_bias = true},
                                              {.score_func = ScoreFunc::kSoftmax,
                                               .n_groups = 4,
                                               .n_limited_groups = 2,
                                               .top_k = K,
                                               .route_scale = 1.0,
                                               .use_bias = false}};
  for (const RouterOptions& opt : options) {
    RouterFd f(N, E, opt, 101, 0.1);
    Plan plan(N, K, E);
    Owned y0({N, D}, DType::kF64), y({N, D}, DType::kF64), y_perm({N * K, D}, DType::kF64), proj({N, D}, DType::kF64);
    test::fill_normal(y0, 102);
    test::fill_normal(y_perm, 103);
    test::fill_normal(proj, 104);
    auto loss = [&] {
      f.forward_checked();
      plan.build(f.r.idx, E);
      copy_values(y, y0);
      cpu().moe_combine_fwd(kCtx, {.y = y, .y_perm = y_perm, .topk_w = f.r.w, .slot_pos = plan.slot_pos});
      return test::dot(y, proj);
    };
    const std::vector<double> numerical = test::numerical_grad(f.r.logits, loss);
    const char* name = opt.score_func == ScoreFunc::kSigmoid ? "router→combine sigmoid, groups+bias"
                                                             : "router→combine softmax, groups";
    EXPECT_EQ(f.selection_flips, 0) << name;
    loss();  // restore the forward state at the unperturbed logits
    Owned dy_perm({N * K, D}, DType::kF64), dw({N, K}, DType::kF64), dlogits({N, E}, DType::kF64);
    cpu().moe_combine_bwd(
        kCtx,
        {.dy_perm = dy_perm, .dtopk_w = dw, .dy = proj, .y_perm = y_perm, .topk_w = f.r.w, .slot_pos = plan.slot_pos});
    cpu().router_bwd(
        kCtx,
        {.dlogits = dlogits, .dtopk_w = dw, .scores = f.r.scores, .topk_idx = f.r.idx, .topk_w = f.r.w, .opt = opt});
    expect_grad(name, test::to_vector(dlogits), numerical);
  }
}

// ------------------------------------------------------------------ bias update

TEST(MoeBiasUpdate, SignRule) {
  constexpr double rate = 1e-3;
  // i32 counts with mean 4: below → +rate, equal → 0 (sign(0) = 0), above → −rate.
  Owned bias({6}, DType::kF32), counts({6}, DType::kI32);
  test::fill_normal(bias, 111, 0.05);
  const std::vector<int32_t> c = {2, 4, 6, 4, 3, 5};
  for (int64_t i = 0; i < 6; ++i) counts.at<int32_t>(i) = c[i];
  const std::vector<double> before = test::to_vector(bias);
  cpu().moe_bias_update(kCtx, {.bias = bias, .counts = counts, .rate = rate});
  const std::vector<double> sign = {+1, 0, -1, 0, +1, -1};
  for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(bias.at<float>(i), before[i] + rate * sign[i], 1e-8) << i;

  // Float counts with a fractional mean (2.5) and a different rate, in f64.
  Owned bias64({4}, DType::kF64), counts64({4}, DType::kF64);
  test::fill_normal(bias64, 112, 0.05);
  set_values(counts64, {1.0, 2.5, 4.0, 2.5});
  const std::vector<double> before64 = test::to_vector(bias64);
  cpu().moe_bias_update(kCtx, {.bias = bias64, .counts = counts64, .rate = 0.25});
  const std::vector<double> sign64 = {+1, 0, -1, 0};
  for (int64_t i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(bias64.at<double>(i), before64[i] + 0.25 * sign64[i]) << i;

  // Balanced load: nothing moves.
  for (int64_t i = 0; i < 6; ++i) counts.at<int32_t>(i) = 9;
  const std::vector<double> balanced = test::to_vector(bias);
  cpu().moe_bias_update(kCtx, {.bias = bias, .counts = counts, .rate = rate});
  EXPECT_EQ(test::to_vector(bias), balanced);

  Owned counts_f32({4}, DType::kF32);
  expect_error([&] { cpu().moe_bias_update(kCtx, {.bias = bias64, .counts = counts_f32}); }, {"[moe_bias_update]"});
}

// The dtype rules of bf16 rows (the bf16 GEMM mode's expert activations, docs/model.md §7), shared by every
// backend: they pair with f32 (an f64 call refuses them, naming the op and the field), and a bf16
// grouped GEMM output needs the bf16 GEMM mode. (The values: test_bf16_fields.cpp.)
TEST(MoeDataMovement, Bf16RowsPairWithF32) {
  const int64_t N = 2, K = 2, D = 8;
  Owned x({N, D}, DType::kF64), rows16({N * K, D}, DType::kBF16);
  Owned rows({N * K, D}, DType::kF64), w({N, K}, DType::kF64), slot({N, K}, DType::kI32), src({N * K}, DType::kI32);
  Owned dtw({N, K}, DType::kF64), grouped16({N * K, D}, DType::kBF16), rows32({N * K, D}, DType::kF32);
  Owned weights({2, D, D}, DType::kF32), offsets({3}, DType::kI32);
  for (int64_t i = 0; i < N * K; ++i) {
    slot.at<int32_t>(i) = static_cast<int32_t>(i);
    src.at<int32_t>(i) = static_cast<int32_t>(i % N);
  }
  offsets.at<int32_t>(1) = 2;
  offsets.at<int32_t>(2) = 4;
  const std::string f64 = "expected dtype f64, got bf16";
  expect_error([&] { cpu().moe_gather_bwd(kCtx, {.dx = x, .dx_perm = rows16, .slot_pos = slot}); },
               {"[moe_gather_bwd]", "dx_perm", f64});
  expect_error([&] { cpu().moe_combine_fwd(kCtx, {.y = x, .y_perm = rows16, .topk_w = w, .slot_pos = slot}); },
               {"[moe_combine_fwd]", "y_perm", f64});
  expect_error(
      [&] {
        cpu().moe_combine_bwd(
            kCtx, {.dy_perm = rows, .dtopk_w = dtw, .dy = x, .y_perm = rows16, .topk_w = w, .slot_pos = slot});
      },
      {"[moe_combine_bwd]", "y_perm", f64});
  expect_error([&] { cpu().swiglu_fwd(kCtx, {.h = rows16, .a = rows, .b = rows}); }, {"[swiglu_fwd]", "h", f64});
  expect_error(
      [&] {
        cpu().grouped_gemm(kCtx, {.c = grouped16, .a = rows32, .b = weights, .offsets = offsets, .trans_b = true});
      },
      {"[grouped_gemm]", "c is bf16", "bf16 GEMM mode"});
}

}  // namespace
}  // namespace diffmoe
