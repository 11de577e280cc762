// The decode engine (src/serve/engine.h) against the training forward, on the micro configs:
//  - in a mixed batch (sequences decoding beside prompts prefilled in chunks, sequences joining and
//    leaving between steps, blocks reused), every logit row the engine returns equals the full
//    forward's row for that sequence and position, in f64 and in f32;
//  - the MoE layers read only the weights of the experts some row was routed to;
//  - cache blocks go back to the free list when sequences are released; refused steps change nothing.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "model/micro_config.h"
#include "serve/engine.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace dt = diffmoe::test;
namespace st = diffmoe::serve::test;
using dt::Owned;

// The full forward's logits of one sequence alone: [T, V].
std::vector<double> forward_logits(Model& m, const std::vector<int32_t>& tokens) {
  const int64_t T = static_cast<int64_t>(tokens.size());
  Owned t(Shape{1, T}, DType::kI32);
  for (int64_t i = 0; i < T; ++i) t.at<int32_t>(i) = tokens[static_cast<size_t>(i)];
  m.set_batch_shape(1, T);
  m.forward({}, t, Tensor{});
  return dt::to_vector(m.logits());
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    t[static_cast<size_t>(i)] =
        static_cast<int32_t>(uniform_at(seed, 0x5e, static_cast<uint64_t>(i)) * (static_cast<double>(vocab) - 1e-9));
  return t;
}

// A sequence of the test: its tokens, its engine id, how many are cached, and how it is fed.
struct Client {
  std::vector<int32_t> tokens;
  std::vector<double> reference = {};  // [T, V]
  int64_t start_step = 0;              // the step it joins at
  int64_t chunk = 1;                   // positions per step while prefilling (its first `prompt` tokens)
  int64_t prompt = 1;
  int64_t id = -1, done = 0;
};

// Runs the clients through the engine, step by step, and returns the worst norm-wise relative error
// of a returned logit row against the reference. Checks the block accounting on the way.
double run_mixed_batch(Model& m, const EngineOptions& opt, std::vector<Client>& clients) {
  Engine engine(m, opt);
  const int64_t V = m.config().vocab_size, total = engine.cache().total_blocks();
  double worst = 0.0;
  int64_t rows_checked = 0;
  for (int64_t step = 0;; ++step) {
    std::vector<StepSequence> batch;
    std::vector<Client*> in_batch;
    for (Client& c : clients) {
      const int64_t T = static_cast<int64_t>(c.tokens.size());
      if (step < c.start_step || c.done == T) continue;
      if (c.id < 0) c.id = engine.add_sequence();
      const int64_t n = c.done < c.prompt ? std::min(c.chunk, c.prompt - c.done) : 1;
      // Prompt chunks ask for every row's logits (prompt logprobs), decode steps for the last one.
      batch.push_back(
          {.seq = c.id,
           .tokens = std::span<const int32_t>(c.tokens).subspan(static_cast<size_t>(c.done), static_cast<size_t>(n)),
           .logits = c.done < c.prompt ? LogitRows::kAll : LogitRows::kLast});
      in_batch.push_back(&c);
    }
    if (batch.empty()) {
      if (std::all_of(clients.begin(), clients.end(),
                      [](const Client& c) { return c.done == static_cast<int64_t>(c.tokens.size()); }))
        break;
      continue;
    }
    const StepOutput out = engine.step({}, batch);
    const std::vector<double> logits = dt::to_vector(out.logits);
    for (size_t i = 0; i < batch.size(); ++i) {
      Client& c = *in_batch[i];
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      const int64_t first_pos = batch[i].logits == LogitRows::kAll ? c.done : c.done + n - 1;
      const int64_t rows = batch[i].logits == LogitRows::kAll ? n : 1;
      for (int64_t r = 0; r < rows; ++r) {
        const auto got = logits.begin() + (out.first_row[i] + r) * V;
        const auto want = c.reference.begin() + (first_pos + r) * V;
        worst = std::max(worst, dt::rel_error(std::vector<double>(got, got + V), std::vector<double>(want, want + V)));
        ++rows_checked;
      }
      c.done += n;
      EXPECT_EQ(engine.cache().length(c.id), c.done);
      if (c.done == static_cast<int64_t>(c.tokens.size())) engine.release(c.id);  // its blocks are free at once
    }
  }
  EXPECT_EQ(engine.cache().free_blocks(), total) << "every block is back on the free list";
  EXPECT_GT(rows_checked, 20);
  return worst;
}

std::vector<Client> make_clients(Model& m, uint64_t seed) {
  const int64_t V = m.config().vocab_size, T = m.config().max_seq_len;
  // Different lengths and feeding: a long prompt in chunks of 3, a decode-only sequence, one that
  // joins late (reusing the blocks of one that finished), a one-token prompt, a prompt in one chunk.
  std::vector<Client> c(5);
  c[0] = {.tokens = random_tokens(T, V, seed), .start_step = 0, .chunk = 3, .prompt = 7};
  c[1] = {.tokens = random_tokens(T - 2, V, seed + 1), .start_step = 0, .chunk = 1, .prompt = 1};
  c[2] = {.tokens = random_tokens(T - 1, V, seed + 2), .start_step = 4, .chunk = 2, .prompt = 5};
  c[3] = {.tokens = random_tokens(3, V, seed + 3), .start_step = 1, .chunk = 1, .prompt = 1};
  c[4] = {.tokens = random_tokens(T, V, seed + 4), .start_step = 2, .chunk = 6, .prompt = 6};
  for (Client& x : c) x.reference = forward_logits(m, x.tokens);
  return c;
}

// Same ops in f64 as the training forward except the attention core (absorbed vs up-projected,
// tests/model/test_generator.cpp (a)) and GEMMs over other row counts and head-major row orders:
// differences are ~1e-15 relative. 1e-9 per row keeps six orders of margin and still catches a
// wrong position, slot, block or head (all O(1e-2) or more).
constexpr double kF64Tol = 1e-9;

void check_engine(const ModelConfig& cfg, uint64_t seed) {
  CpuBackend be;
  Model m(cfg, be, DType::kF64);
  dt::randomize_for_test(m, seed);
  std::vector<Client> clients = make_clients(m, seed + 100);
  // Blocks of 3 rows (sequences cross block boundaries); 6 sequences' worth of blocks for 5
  // sequences of which at most 4 run at once.
  const EngineOptions opt{.max_batch = 4, .max_step_tokens = 14, .block_size = 3, .n_blocks = 12};
  const double worst = run_mixed_batch(m, opt, clients);
  std::printf("[engine] %s f64: max rel error of a logit row vs the full forward %.3e\n",
              cfg.differential ? "micro_diff" : "micro_plain", worst);
  EXPECT_LE(worst, kF64Tol);
}

TEST(Engine, MixedBatchMatchesFullForwardMicroDiff) { check_engine(dt::micro_diff_config(), 3); }
TEST(Engine, MixedBatchMatchesFullForwardMicroPlain) { check_engine(dt::micro_plain_config(), 8); }

// f32 (the CPU backend's working precision): three layers of O(1) activations accumulate ~1e-6
// relative rounding; 1e-4 keeps two orders of margin below any real mistake (as test_generator.cpp).
TEST(Engine, MixedBatchMatchesFullForwardF32) {
  CpuBackend be;
  Model m(dt::micro_diff_config(), be, DType::kF32);
  dt::randomize_for_test(m, 17);
  std::vector<Client> clients = make_clients(m, 400);
  const double worst =
      run_mixed_batch(m, {.max_batch = 4, .max_step_tokens = 12, .block_size = 2, .n_blocks = 17}, clients);
  std::printf("[engine] micro_diff f32: max rel error %.3e\n", worst);
  EXPECT_LE(worst, 1e-4);
}

// The routed experts' GEMMs read only the experts some row went to: after a step, every expert of
// every MoE layer that no row used is overwritten with NaN, and the same step on fresh sequences
// gives bit-identical logits (a NaN read anywhere would spread to every logit of its rows).
TEST(Engine, MoeReadsOnlyTheRoutedExperts) {
  CpuBackend be;
  const ModelConfig cfg = dt::micro_diff_config();
  Model m(cfg, be, DType::kF64);
  dt::randomize_for_test(m, 29);
  Engine engine(m, {.max_batch = 2, .max_step_tokens = 4, .block_size = 4});
  const std::vector<int32_t> a = {5, 11}, b = {7};
  const auto run = [&] {
    const int64_t sa = engine.add_sequence(), sb = engine.add_sequence();
    const StepSequence batch[] = {{.seq = sa, .tokens = a, .logits = LogitRows::kAll}, {.seq = sb, .tokens = b}};
    const std::vector<double> logits = dt::to_vector(engine.step({}, batch).logits);
    engine.release(sa);
    engine.release(sb);
    return logits;
  };
  const std::vector<double> before = run();
  int64_t poisoned = 0;
  for (int64_t l = cfg.n_dense_layers; l < cfg.n_layers; ++l) {
    const Tensor counts = engine.expert_counts(l);
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e) {
      if (counts.ptr<int32_t>()[e] != 0) continue;
      ++poisoned;
      for (const char* w : {"w1", "w2", "w3"}) {
        const Tensor stack = m.params().get(fmt::format("layers.{}.ffn.experts.{}", l, w));  // [E, ·, ·]
        const Tensor expert = stack[e];
        for (int64_t i = 0; i < expert.numel(); ++i) expert.ptr<double>()[i] = std::numeric_limits<double>::quiet_NaN();
      }
    }
  }
  // 3 rows × K = 2 experts leave at least 2 of the 8 experts unused in each of the 2 MoE layers.
  EXPECT_GE(poisoned, 4);
  const std::vector<double> after = run();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) ASSERT_EQ(after[i], before[i]) << "logit " << i;
}

TEST(Engine, RefusedStepsChangeNothing) {
  CpuBackend be;
  const ModelConfig cfg = dt::micro_plain_config();
  Model m(cfg, be, DType::kF32);
  dt::randomize_for_test(m, 2);
  Engine engine(m, {.max_batch = 2, .max_step_tokens = 5, .max_context = 6, .block_size = 2, .n_blocks = 4});
  const int64_t s = engine.add_sequence(), t = engine.add_sequence(), u = engine.add_sequence();
  const std::vector<int32_t> five = {1, 2, 3, 4, 5}, one = {1}, bad = {1, 19};
  const auto expect_refused = [&](std::vector<StepSequence> batch, const std::string& why) {
    dt::expect_error([&] { engine.step({}, batch); }, {"[engine]", why});
    EXPECT_EQ(engine.cache().free_blocks(), 4);
    EXPECT_EQ(engine.cache().length(s), 0);
  };
  expect_refused({{.seq = s, .tokens = five}, {.seq = t, .tokens = one}}, "max_step_tokens");
  expect_refused({{.seq = s, .tokens = one}, {.seq = t, .tokens = one}, {.seq = u, .tokens = one}}, "max_batch");
  expect_refused({{.seq = s, .tokens = bad}}, "token id 19");
  expect_refused({{.seq = s, .tokens = one}, {.seq = s, .tokens = one}}, "twice");
  engine.step({}, std::vector<StepSequence>{{.seq = s, .tokens = five}});  // 3 blocks
  EXPECT_EQ(engine.cache().free_blocks(), 1);
  dt::expect_error(
      [&] {
        engine.step({}, std::vector<StepSequence>{{.seq = s, .tokens = std::vector<int32_t>{1, 2}}});
      },
      {"[engine]", "max_context = 6"});
  const std::vector<int32_t> three = {1, 2, 3};
  dt::expect_error([&] { engine.step({}, std::vector<StepSequence>{{.seq = t, .tokens = three}}); },
                   {"[engine]", "cache blocks"});
  EXPECT_EQ(engine.cache().length(t), 0);
  engine.release(s);
  EXPECT_EQ(engine.cache().free_blocks(), 4);
  engine.step({}, std::vector<StepSequence>{{.seq = t, .tokens = three}});  // fits now, in the released blocks
  EXPECT_EQ(engine.cache().free_blocks(), 2);
}

}  // namespace
}  // namespace diffmoe::serve

namespace diffmoe::serve {
namespace {

namespace dt = diffmoe::test;
namespace st = diffmoe::serve::test;

// FP8 weights (EngineOptions::fp8_weights) against f32 inference, teacher-forced: the same four
// 48-token sequences through an f32 engine, an FP8-weight engine and a bf16-weight engine (the
// model's bf16 GEMM mode), every position's logits compared: the share of positions whose argmax
// (the greedy token) agrees with f32, and the norm-wise relative error of the logits.
TEST(Engine, Fp8WeightsAgreeWithF32Greedy) {
  CpuBackend be;
  const ModelConfig cfg = st::serve_config();
  const auto run = [&](Model& m, bool fp8) {
    Engine engine(m, {.max_batch = 4, .max_step_tokens = 192, .block_size = 16, .fp8_weights = fp8});
    std::vector<std::vector<int32_t>> seqs;
    std::vector<StepSequence> batch;
    for (int b = 0; b < 4; ++b) {
      seqs.push_back(random_tokens(48, cfg.vocab_size, 900 + static_cast<uint64_t>(b)));
      batch.push_back({.seq = engine.add_sequence(), .tokens = seqs.back(), .logits = LogitRows::kAll});
    }
    return dt::to_vector(engine.step({}, batch).logits);  // [192, V]
  };
  Model f32_model(cfg, be, DType::kF32);
  dt::randomize_for_test(f32_model, 41);
  const std::vector<double> ref = run(f32_model, false), fp8 = run(f32_model, true);
  Model bf16_model(cfg, be, DType::kF32, {.precision = Precision::kBF16});
  for (const ParamSpec& p : f32_model.specs()) {  // the same weights, rounded to bf16 where GEMMs read them
    std::vector<double> v = dt::to_vector(f32_model.params().get(p.name));
    bf16_model.set_param(p.name, v);
  }
  const std::vector<double> bf16 = run(bf16_model, false);
  be.set_gemm_precision(GemmPrecision::kF32);
  const int64_t V = cfg.vocab_size, rows = static_cast<int64_t>(ref.size()) / V;
  const auto compare = [&](const std::vector<double>& got, double& agree, double& err) {
    int64_t same = 0;
    err = dt::rel_error(got, ref);
    for (int64_t r = 0; r < rows; ++r) {
      const auto g = got.begin() + r * V, w = ref.begin() + r * V;
      same += std::max_element(g, g + V) - g == std::max_element(w, w + V) - w;
    }
    agree = static_cast<double>(same) / static_cast<double>(rows);
  };
  double agree_fp8 = 0, err_fp8 = 0, agree_bf16 = 0, err_bf16 = 0;
  compare(fp8, agree_fp8, err_fp8);
  compare(bf16, agree_bf16, err_bf16);
  std::printf(
      "[engine] fp8 weights: greedy agreement with f32 %.1f%%, logits rel error %.3e; bf16 weights: %.1f%%, %.3e\n",
      100 * agree_fp8, err_fp8, 100 * agree_bf16, err_bf16);
  // e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4 per value, per-block or per-tile
  // scaled; weights and activations both quantised) against bf16's 8: a few percent per GEMM,
  // compounding over two layers of O(1) random weights. Measured on this model: FP8 92% greedy
  // agreement at 9.5e-2 logits error, bf16 100% at 6.7e-3. The bounds leave room for another seed
  // and still fail for a wrong scale or a mis-laid-out block (agreement near chance, 1/300; error O(1)).
  EXPECT_GE(agree_fp8, 0.75);
  EXPECT_LE(err_fp8, 0.2);
  EXPECT_GT(err_fp8, err_bf16) << "the FP8 path ran (its error is the larger one)";
}

}  // namespace
}  // namespace diffmoe::serve
