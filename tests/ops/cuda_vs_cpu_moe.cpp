// CUDA vs CPU, second half (see cuda_vs_cpu.cpp for the method): SwiGLU, the MoE router and its
// aux loss, the routing plan and data movement, the bias update, cross-entropy, AdamW; then the
// device-side index checks, the shared validation, and bitwise run-to-run determinism.
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};

// ================================================================ SwiGLU

// The extremes of a: e^−a beyond the f32 range (a < −88.7), the zero of silu'(a) near −1.27846
// (cancellation in 1 + a(1 − σ)), and a large positive a (σ = 1).
void set_swiglu_extremes(Dual& a) {
  float* h = a.host().ptr<float>();
  const float special[] = {-85.0f, -100.0f, -1.27846f, -1.2785f, -1.275f, 120.0f, -88.9f};
  for (size_t i = 0; i < std::size(special); ++i) h[i * 7] = special[i];
  a.to_gpu();
}

// offset 0: float4 pieces and a scalar tail (57·37 = 2109 elements); offset 1: unaligned views, the
// scalar path.
TEST(CudaSwiglu, ForwardBackward) {
  DIFFMOE_REQUIRE_CUDA();
  const Shape shape{57, 37};
  const int64_t n = shape.numel();
  for (const int64_t offset : {int64_t{0}, int64_t{1}}) {
    const Shape flat{n + 1};
    Dual a(flat), b(flat), h(flat), dh(flat), da(flat), db(flat);
    a.normal(70, 4.0);  // includes large negative a, where σ(a) underflows
    set_swiglu_extremes(a);
    b.normal(71);
    dh.normal(72);
    for (Dual* d : {&h, &da, &db}) {  // overwritten outputs; the element outside the view stays as set
      d->poison();
      d->host().ptr<float>()[offset == 0 ? n : 0] = 0.5f;
      d->to_gpu();
    }
    const auto v = [&](const Dual& d, Side s) { return offset_view(d, s, shape, offset); };
    run_both([&](Backend& be, Side s) { be.swiglu_fwd({}, {.h = v(h, s), .a = v(a, s), .b = v(b, s)}); });
    expect_close(h, kRoundOnce, fmt::format("swiglu_fwd offset {}", offset));
    run_both([&](Backend& be, Side s) {
      be.swiglu_bwd({}, {.da = v(da, s), .db = v(db, s), .dh = v(dh, s), .a = v(a, s), .b = v(b, s)});
    });
    expect_close(da, kRoundOnce, fmt::format("swiglu_bwd da offset {}", offset));
    expect_close(db, kRoundOnce, fmt::format("swiglu_bwd db offset {}", offset));
  }
}

// ================================================================ router and aux loss

struct RouterCase {
  int64_t N, E, K, groups, limited;
  ScoreFunc func;
  bool bias;
  double route_scale;
  std::string name() const {
    return fmt::format("N={} E={} K={} G={}/{} {} bias={}", N, E, K, limited, groups,
                       func == ScoreFunc::kSigmoid ? "sigmoid" : "softmax", bias);
  }
  RouterOptions options() const {
    return RouterOptions{.score_func = func, .n_groups = groups, .n_limited_groups = limited, .top_k = K,
                         .route_scale = route_scale, .use_bias = bias};
  }
};

// Every branch: groups with the top-2 score (bias on) and the max score (bias off), no groups,
// sigmoid and softmax, E = 8 … 256 (one to eight experts per lane). N = 300 gives the aux loss
// two sequences of 150 tokens, each spread over three 64-token blocks.
const RouterCase kRouterCases[] = {
    {203, 64, 6, 8, 3, ScoreFunc::kSigmoid, true, 2.5},  {97, 8, 2, 1, 1, ScoreFunc::kSoftmax, false, 1.0},
    {67, 256, 8, 8, 4, ScoreFunc::kSigmoid, true, 1.5},  {50, 12, 3, 4, 2, ScoreFunc::kSigmoid, false, 1.0},
    {58, 16, 2, 4, 1, ScoreFunc::kSoftmax, true, 1.0},   {300, 32, 4, 4, 2, ScoreFunc::kSigmoid, true, 1.0}};

// Scores: sigmoid in f32 (the GPU's expf vs glibc's differ by up to 2 ulps) or softmax with an f64
// denominator; the weights divide those scores in f64: relative 1e-6.
constexpr Tol kScoreTol{1e-6, 1e-8, "f32 expf (≤ 2 ulp apart) / f64 softmax"};

// A routed batch computed by the CPU, uploaded for the ops downstream of the router.
struct Routed {
  explicit Routed(const RouterCase& c)
      : logits(Shape{c.N, c.E}), bias(Shape{c.E}), scores(Shape{c.N, c.E}), idx(Shape{c.N, c.K}, DType::kI32),
        w(Shape{c.N, c.K}), counts(Shape{c.E}, DType::kI32) {
    logits.normal(80 + static_cast<uint64_t>(c.E), 2.0);
    bias.normal(81, 0.05);
    counts.ints(82, 0, 5);  // counts accumulate
    scores.poison();
    idx.poison();
    w.poison();
  }
  RouterFwdArgs args(const RouterCase& c, Side s) const {
    return RouterFwdArgs{.scores = scores[s], .topk_idx = idx[s], .topk_w = w[s], .counts = counts[s],
                         .logits = logits[s], .bias = c.bias ? bias[s] : Tensor{}, .opt = c.options()};
  }
  Dual logits, bias, scores, idx, w, counts;
};

TEST(CudaMoe, RouterForward) {
  DIFFMOE_REQUIRE_CUDA();
  for (const RouterCase& c : kRouterCases) {
    Routed r(c);
    run_both([&](Backend& be, Side s) { be.router_fwd({}, r.args(c, s)); });
    expect_close(r.scores, kScoreTol, "router_fwd scores " + c.name());
    expect_close(r.idx, kExact, "router_fwd topk_idx " + c.name());
    expect_close(r.w, kScoreTol, "router_fwd topk_w " + c.name());
    expect_close(r.counts, kExact, "router_fwd counts " + c.name());
  }
}

TEST(CudaMoe, RouterBackwardAndAuxLoss) {
  DIFFMOE_REQUIRE_CUDA();
  for (const RouterCase& c : kRouterCases) {
    Routed r(c);
    cpu().router_fwd({}, r.args(c, Side::kCpu));
    r.scores.to_gpu();  // both sides continue from the CPU's routing
    r.idx.to_gpu();
    r.w.to_gpu();
    Dual dw(Shape{c.N, c.K}), dlogits(Shape{c.N, c.E});
    dw.normal(83);
    dlogits.poison();
    run_both([&](Backend& be, Side s) {
      be.router_bwd({}, {.dlogits = dlogits[s], .dtopk_w = dw[s], .scores = r.scores[s], .topk_idx = r.idx[s],
                         .topk_w = r.w[s], .opt = c.options()});
    });
    // f64 per-token sums in the CPU's k order on one lane: rounded once.
    expect_close(dlogits, kRoundOnce, "router_bwd " + c.name());
    // Aux loss over whole sequences (N = B·T); the plain top-K picks come from the same scores.
    int64_t seq = 1;
    for (int64_t t : {29, 11, 25, 97, 67, 5, 150})
      if (c.N % t == 0) seq = std::max(seq, t);
    Dual loss(Shape{1}), daux(Shape{c.N, c.E});
    loss.set({0.25});  // accumulates
    daux.normal(84);   // accumulates
    const int64_t top_k = std::min<int64_t>(c.K, c.E);
    run_both([&](Backend& be, Side s) {
      be.aux_loss_fwd({}, {.loss = loss[s], .scores = r.scores[s], .seq_len = seq, .top_k = top_k, .alpha = 0.01,
                           .score_func = c.func});
      be.aux_loss_bwd({}, {.dlogits = daux[s], .scores = r.scores[s], .seq_len = seq, .top_k = top_k, .alpha = 0.01,
                           .dloss = 1.3, .score_func = c.func});
    });
    expect_close(loss, kRoundOnce, fmt::format("aux_loss_fwd T={} {}", seq, c.name()));
    expect_close(daux, kRoundOnce, fmt::format("aux_loss_bwd T={} {}", seq, c.name()));
  }
}

// ================================================================ plan and data movement

struct Plan {
  Plan(int64_t N, int64_t K, int64_t E)
      : offsets(Shape{E + 1}, DType::kI32), src_row(Shape{N * K}, DType::kI32), slot_pos(Shape{N, K}, DType::kI32) {}
  MoePermuteArgs args(const Dual& idx, int64_t E, Side s) const {
    return MoePermuteArgs{.offsets = offsets[s], .src_row = src_row[s], .slot_pos = slot_pos[s], .topk_idx = idx[s], .n_experts = E};
  }
  Dual offsets, src_row, slot_pos;
};

TEST(CudaMoe, PermuteStableWithEmptyExperts) {
  DIFFMOE_REQUIRE_CUDA();
  // Random experts in [0, 6) of 16: experts 6 … 15 are empty; repeats within a token allowed.
  const int64_t N = 50, K = 3, E = 16;
  Dual idx(Shape{N, K}, DType::kI32);
  idx.ints(90, 0, 6);
  Plan p(N, K, E);
  for (Dual* d : {&p.offsets, &p.src_row, &p.slot_pos}) d->poison();
  run_both([&](Backend& be, Side s) { be.moe_permute({}, p.args(idx, E, s)); });
  expect_close(p.offsets, kExact, "moe_permute offsets (empty experts)");
  expect_close(p.src_row, kExact, "moe_permute src_row (empty experts)");
  expect_close(p.slot_pos, kExact, "moe_permute slot_pos (empty experts)");
}

TEST(CudaMoe, PermuteGatherCombine) {
  DIFFMOE_REQUIRE_CUDA();
  const RouterCase& c = kRouterCases[0];
  const int64_t N = c.N, K = c.K, E = c.E, NK = N * K;
  Routed r(c);
  cpu().router_fwd({}, r.args(c, Side::kCpu));
  r.idx.to_gpu();
  r.w.to_gpu();
  Plan p(N, K, E);
  for (Dual* d : {&p.offsets, &p.src_row, &p.slot_pos}) d->poison();
  run_both([&](Backend& be, Side s) { be.moe_permute({}, p.args(r.idx, E, s)); });
  expect_close(p.offsets, kExact, "moe_permute offsets");
  expect_close(p.src_row, kExact, "moe_permute src_row");
  expect_close(p.slot_pos, kExact, "moe_permute slot_pos");

  // D = 37: the scalar paths; D = 1028: float4 pieces, more than one pass of a warp's lanes and a
  // partial last pass. K = 6: one full group of four slots and a partial one (combine/gather_bwd).
  for (const int64_t D : {int64_t{37}, int64_t{1028}}) {
    Dual x(Shape{N, D}), x_perm(Shape{NK, D});
    x.normal(91);
    x_perm.poison();
    run_both([&](Backend& be, Side s) { be.moe_gather({}, {.x_perm = x_perm[s], .x = x[s], .src_row = p.src_row[s]}); });
    expect_close(x_perm, kExact, fmt::format("moe_gather D={}", D));

    Dual dx(Shape{N, D}), dx_perm(Shape{NK, D});
    dx.normal(92);  // accumulates (holds the shared expert's dx)
    dx_perm.normal(93);
    run_both([&](Backend& be, Side s) { be.moe_gather_bwd({}, {.dx = dx[s], .dx_perm = dx_perm[s], .slot_pos = p.slot_pos[s]}); });
    expect_close(dx, kRoundOnce, fmt::format("moe_gather_bwd D={} (f64 sum over k in order)", D));

    Dual y(Shape{N, D}), y_perm(Shape{NK, D});
    y.normal(94);  // accumulates
    y_perm.normal(95);
    run_both([&](Backend& be, Side s) {
      be.moe_combine_fwd({}, {.y = y[s], .y_perm = y_perm[s], .topk_w = r.w[s], .slot_pos = p.slot_pos[s]});
    });
    expect_close(y, kRoundOnce, fmt::format("moe_combine_fwd D={} (f64 sum over k in order)", D));

    Dual dy(Shape{N, D}), dy_perm(Shape{NK, D}), dtopk_w(Shape{N, K});
    dy.normal(96);
    dy_perm.poison();
    dtopk_w.poison();
    run_both([&](Backend& be, Side s) {
      be.moe_combine_bwd({}, {.dy_perm = dy_perm[s], .dtopk_w = dtopk_w[s], .dy = dy[s], .y_perm = y_perm[s],
                              .topk_w = r.w[s], .slot_pos = p.slot_pos[s]});
    });
    expect_close(dy_perm, kExact, fmt::format("moe_combine_bwd D={} dy_perm (one f32 product)", D));
    expect_close(dtopk_w, kRoundOnce, fmt::format("moe_combine_bwd D={} dtopk_w (f64 dot, other order)", D));
  }
}

// The data movement ops on views one element past an aligned start (D = 64 would take float4
// pieces if aligned): the scalar paths with sizes that are multiples of 4. A plan with K = 3 slots
// per token in token order: slot_pos[n, k] = n·K + k, src_row[r] = r / K.
TEST(CudaMoe, GatherCombineUnalignedViews) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t N = 45, K = 3, D = 64, NK = N * K;
  std::vector<double> src(static_cast<size_t>(NK)), slot(static_cast<size_t>(NK));
  for (int64_t i = 0; i < NK; ++i) {
    src[static_cast<size_t>(i)] = static_cast<double>(i / K);
    slot[static_cast<size_t>(i)] = static_cast<double>(i);
  }
  Dual src_row(Shape{NK}, DType::kI32), slot_pos(Shape{N, K}, DType::kI32), w(Shape{N, K});
  src_row.set(src);
  slot_pos.set(slot);
  w.normal(140);
  const Shape tok{N, D}, perm{NK, D};
  // Overwritten outputs: poisoned, except the element before the view (never written).
  const auto poison_view = [](Dual& d) {
    d.poison();
    d.host().ptr<float>()[0] = 0.5f;
    d.to_gpu();
  };
  Dual x(Shape{N * D + 1}), x_perm(Shape{NK * D + 1});
  x.normal(141);
  poison_view(x_perm);
  run_both([&](Backend& be, Side s) {
    be.moe_gather({}, {.x_perm = offset_view(x_perm, s, perm, 1), .x = offset_view(x, s, tok, 1), .src_row = src_row[s]});
  });
  expect_close(x_perm, kExact, "moe_gather unaligned");
  Dual dx(Shape{N * D + 1}), dx_perm(Shape{NK * D + 1});
  dx.normal(142);
  dx_perm.normal(143);
  run_both([&](Backend& be, Side s) {
    be.moe_gather_bwd({}, {.dx = offset_view(dx, s, tok, 1), .dx_perm = offset_view(dx_perm, s, perm, 1),
                           .slot_pos = slot_pos[s]});
  });
  expect_close(dx, kRoundOnce, "moe_gather_bwd unaligned");
  Dual y(Shape{N * D + 1}), y_perm(Shape{NK * D + 1});
  y.normal(144);
  y_perm.normal(145);
  run_both([&](Backend& be, Side s) {
    be.moe_combine_fwd({}, {.y = offset_view(y, s, tok, 1), .y_perm = offset_view(y_perm, s, perm, 1), .topk_w = w[s],
                            .slot_pos = slot_pos[s]});
  });
  expect_close(y, kRoundOnce, "moe_combine_fwd unaligned");
  Dual dy(Shape{N * D + 1}), dy_perm(Shape{NK * D + 1}), dtopk_w(Shape{N, K});
  dy.normal(146);
  poison_view(dy_perm);
  dtopk_w.poison();
  run_both([&](Backend& be, Side s) {
    be.moe_combine_bwd({}, {.dy_perm = offset_view(dy_perm, s, perm, 1), .dtopk_w = dtopk_w[s],
                            .dy = offset_view(dy, s, tok, 1), .y_perm = offset_view(y_perm, s, perm, 1), .topk_w = w[s],
                            .slot_pos = slot_pos[s]});
  });
  expect_close(dy_perm, kExact, "moe_combine_bwd unaligned dy_perm");
  expect_close(dtopk_w, kRoundOnce, "moe_combine_bwd unaligned dtopk_w");
}

TEST(CudaMoe, BiasUpdate) {
  DIFFMOE_REQUIRE_CUDA();
  // Mean 3: experts at the mean keep their bias (sign 0).
  const std::vector<double> counts = {3, 0, 6, 3, 1, 5, 2, 4, 3, 3, 7, -1};
  for (DType ct : {DType::kI32, DType::kF32}) {
    Dual bias(Shape{12}), c(Shape{12}, ct);
    bias.normal(97, 0.1);
    c.set(counts);
    run_both([&](Backend& be, Side s) { be.moe_bias_update({}, {.bias = bias[s], .counts = c[s], .rate = 1e-3}); });
    expect_close(bias, kExact, fmt::format("moe_bias_update counts {}", dtype_name(ct)));
  }
}

// ================================================================ cross-entropy

// The GPU takes exp in f32 (the CPU in f64) and sums groups of four f32 terms in f32, the groups in
// f64 (≤ 3·2^-24 relative): per-row lse and each probability differ by ~1e-6 relative (f32 rounding
// of z − lse, |z − lse| ≲ 20; the output's f32 products add ~1e-7); the absolute floor 1e-8 is 1e-6
// of grad_scale/valid, for p − 1 near 0.
constexpr Tol kCeTol{1e-5, 1e-8, "f32 exp vs f64 exp, f64 sums"};

// Every path: the row cached in shared memory (N = 57 rows; V = 1001: element-wise copies and
// stores, V = 1000: float4 pieces) and streamed from global memory (V = 60000 and 60001 need
// 240 KB, over the 227 KB of shared memory per block of an H100 or H200; N = 3 rows).
TEST(CudaLoss, CrossEntropy) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    int64_t N, V;
  };
  for (const Case c : {Case{57, 1001}, Case{57, 1000}, Case{3, 60000}, Case{3, 60001}}) {
    const int64_t N = c.N, V = c.V;
    for (DType valid_type : {DType::kF32, DType::kI32}) {
      Dual logits(Shape{N, V}), targets(Shape{N}, DType::kI32), loss(Shape{1}), valid(Shape{1}, valid_type);
      logits.normal(100, 3.0);
      std::vector<double> t(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n) t[static_cast<size_t>(n)] = n % 5 == 3 || n == 1 ? -1 : (n * 389) % V;  // some ignored
      targets.set(t);
      loss.set({1.5});  // accumulates
      valid.set({3});   // accumulates
      run_both([&](Backend& be, Side s) {
        be.cross_entropy_fwd({}, {.loss_sum = loss[s], .valid = valid[s], .logits = logits[s], .targets = targets[s]});
      });
      const std::string what = fmt::format("N={} V={} valid {}", N, V, dtype_name(valid_type));
      expect_close(loss, kCeTol, "cross_entropy_fwd loss_sum " + what);
      expect_close(valid, kExact, "cross_entropy_fwd valid " + what);
      Dual dlogits(Shape{N, V});
      dlogits.poison();
      run_both([&](Backend& be, Side s) {
        be.cross_entropy_bwd({}, {.dlogits = dlogits[s], .logits = logits[s], .targets = targets[s], .valid = valid[s],
                                  .grad_scale = 0.7});
      });
      expect_close(dlogits, kCeTol, "cross_entropy_bwd " + what);
    }
  }
  // No valid target at all: the gradient is 0 everywhere (never a division by 0).
  Dual logits(Shape{4, 33}), targets(Shape{4}, DType::kI32), valid(Shape{1}), dlogits(Shape{4, 33});
  logits.normal(101);
  targets.set({-1, -1, -1, -1});
  valid.set({0});
  dlogits.poison();
  run_both([&](Backend& be, Side s) {
    be.cross_entropy_bwd({}, {.dlogits = dlogits[s], .logits = logits[s], .targets = targets[s], .valid = valid[s]});
  });
  expect_close(dlogits, kExact, "cross_entropy_bwd no valid target");
}

// ================================================================ AdamW

TEST(CudaOptim, AdamW) {
  DIFFMOE_REQUIRE_CUDA();
  for (double max_norm : {0.0, 1.0}) {
    const Shape shape{1003};
    Dual p(shape), m(shape), v(shape), g(shape), gsq(Shape{1});
    p.normal(110);
    m.normal(111, 0.1);
    std::vector<double> vv(1003);
    for (size_t i = 0; i < vv.size(); ++i) vv[i] = 0.01 * (1.0 + std::pow(normal_at(112, 0, i), 2));
    v.set(vv);
    g.normal(113);
    gsq.set({7.3});  // clip = 1 / (√7.3 + 1e-6) < 1
    Dual copy(shape, DType::kBF16);  // the bf16 weight copy written in the same pass
    copy.poison();
    run_both([&](Backend& be, Side s) {
      be.adamw({}, {.param = p[s], .m = m[s], .v = v[s], .grad = g[s], .grad_sq = max_norm > 0 ? gsq[s] : Tensor{},
                    .lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1, .max_norm = max_norm,
                    .step = 3, .param_bf16 = copy[s]});
    });
    for (const auto& [d, name] : {std::pair{&p, "param"}, {&m, "m"}, {&v, "v"}})
      expect_close(*d, kRoundOnce, fmt::format("adamw {} max_norm={}", name, max_norm));
    // The copy is bf16 of the GPU's own updated param, exactly (float4 body and scalar tail).
    const std::vector<double> got = copy.device_values(), param = p.device_values();
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], bf16_to_f32(f32_to_bf16(static_cast<float>(param[i])))) << "adamw bf16 copy element " << i;
    EXPECT_TRUE(copy.guard_intact()) << "adamw bf16 copy";
  }
}

// ================================================================ device-side index checks

TEST(CudaChecks, BadIndicesAreReportedAtSynchronize) {
  DIFFMOE_REQUIRE_CUDA();
  Dual table(Shape{5, 3}), tokens(Shape{4}, DType::kI32), out(Shape{4, 3});
  table.normal(120);
  tokens.set({0, 4, 99, 1});
  expect_error([&] {
    gpu().embedding_fwd({}, {.out = out[Side::kGpu], .tokens = tokens[Side::kGpu], .table = table[Side::kGpu]});
    gpu().synchronize({});
  }, {"[embedding_fwd]", "tokens[2] = 99", "[0, 5)"});
  gpu().synchronize({});  // reported once; the backend stays usable

  Dual logits(Shape{3, 7}), targets(Shape{3}, DType::kI32), loss(Shape{1}), valid(Shape{1});
  logits.normal(121);
  targets.set({1, -1, 7});
  expect_error([&] {
    gpu().cross_entropy_fwd({}, {.loss_sum = loss[Side::kGpu], .valid = valid[Side::kGpu], .logits = logits[Side::kGpu],
                                 .targets = targets[Side::kGpu]});
    std::vector<float> host(1);
    gpu().download(host.data(), loss[Side::kGpu]);  // download reports too
  }, {"[cross_entropy_fwd]", "targets[2] = 7", "neither"});

  Dual idx(Shape{2, 2}, DType::kI32);
  idx.set({0, 1, 5, 2});
  Plan p(2, 2, 4);
  expect_error([&] {
    gpu().moe_permute({}, p.args(idx, 4, Side::kGpu));
    gpu().synchronize({});
  }, {"[moe_permute]", "topk_idx[2] = 5"});
}

// ================================================================ validation (shared with the CPU)

TEST(CudaChecks, ValidationNamesOpAndField) {
  DIFFMOE_REQUIRE_CUDA();
  Dual y64(Shape{4}, DType::kF64), x64(Shape{4}, DType::kF64);
  expect_error([&] { gpu().axpy({}, {.y = y64[Side::kGpu], .x = x64[Side::kGpu]}); }, {"[axpy]", "f32", "f64"});
  Dual a(Shape{3, 5}), b(Shape{4, 7}), c(Shape{3, 7});
  expect_error([&] { gpu().gemm({}, {.c = c[Side::kGpu], .a = a[Side::kGpu], .b = b[Side::kGpu]}); },
               {"[gemm]", "[3, 5]", "[4, 7]"});
  Dual h(Shape{6});
  expect_error([&] { gpu().swiglu_fwd({}, {.h = h[Side::kGpu], .a = h[Side::kCpu], .b = h[Side::kGpu]}); },
               {"[swiglu_fwd]", "a is on cpu"});
  Dual lg(Shape{2, 300}), sc(Shape{2, 300}), ix(Shape{2, 1}, DType::kI32), w(Shape{2, 1}), cnt(Shape{300}, DType::kI32);
  expect_error([&] {
    gpu().router_fwd({}, {.scores = sc[Side::kGpu], .topk_idx = ix[Side::kGpu], .topk_w = w[Side::kGpu],
                          .counts = cnt[Side::kGpu], .logits = lg[Side::kGpu], .bias = {},
                          .opt = {.top_k = 1, .use_bias = false}});
  }, {"[router_fwd]", "at most 256"});
}

// ================================================================ determinism

TEST(CudaChecks, DeterministicOpsAreBitwiseReproducible) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t V = 17, N = 513, D = 70;
  Dual tokens(Shape{N}, DType::kI32), dout(Shape{N, D}), dtable(Shape{V, D});
  tokens.ints(130, 0, static_cast<int32_t>(V));
  dout.normal(131);
  std::vector<double> first_table;
  for (int run = 0; run < 2; ++run) {
    dtable.set(std::vector<double>(static_cast<size_t>(V * D), 0.5));
    gpu().embedding_bwd({}, {.dtable = dtable[Side::kGpu], .tokens = tokens[Side::kGpu], .dout = dout[Side::kGpu]});
    if (run == 0) first_table = dtable.device_values();
    else EXPECT_EQ(dtable.device_values(), first_table) << "embedding_bwd differs between two runs";
  }
  // rmsnorm_bwd's dw on both paths of norm_ops.cu: general (width 70), vector with a warp per row
  // (72) and with a block per row (772); 1100 rows make 35 row chunks on the vector path.
  for (const int64_t width : {int64_t{70}, int64_t{72}, int64_t{772}}) {
    const int64_t rows = width == 70 ? N : 1100;
    Dual x(Shape{rows, width}), dy(Shape{rows, width}), w(Shape{width}), rstd(Shape{rows}), dx(Shape{rows, width});
    Dual dw(Shape{width});
    x.normal(132);
    dy.normal(133);
    w.normal(134);
    rstd.normal(135, 0.1, 1.0);
    std::vector<double> first_dw, first_dx;
    for (int run = 0; run < 2; ++run) {
      dw.set(std::vector<double>(static_cast<size_t>(width), 0.25));
      gpu().rmsnorm_bwd({}, {.dx = dx[Side::kGpu], .dw = dw[Side::kGpu], .dy = dy[Side::kGpu], .x = x[Side::kGpu],
                             .w = w[Side::kGpu], .rstd = rstd[Side::kGpu], .rows = rows, .width = width});
      if (run == 0) {
        first_dw = dw.device_values();
        first_dx = dx.device_values();
      } else {
        EXPECT_EQ(dw.device_values(), first_dw) << "rmsnorm_bwd dw differs between two runs, width " << width;
        EXPECT_EQ(dx.device_values(), first_dx) << "rmsnorm_bwd dx differs between two runs, width " << width;
      }
    }
  }
}

}  // namespace
}  // namespace diffmoe::cudatest
