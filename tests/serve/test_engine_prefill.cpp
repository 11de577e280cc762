// The engine's expanded prefill (engine.h, docs/serving.md "Expanded prefill") against its latent path: the same
// scenario through two engines on one model, EngineOptions::expanded_prefill on and off, every logit row compared.
// The scenario has prompts in one chunk and in several (the first chunk expanded, the later ones latent), prompts of
// equal length in one step (one batched attention call), one-position prompts (latent), and prompts joining while
// other sequences decode (steps with both paths on disjoint rows). The two paths are one function
// (docs/derivations.md §2.4, §3.3), so the rows agree up to summation order: in f64, f32 and the bf16 GEMM mode, on
// differential and plain configs. Pure decode steps run the same ops either way: on a one-layer model, whose cache
// after the prefill does not depend on the attention, they are bitwise equal. And an attention op that refuses the
// longest chunk turns the path off at construction, with its message.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "graph_test_util.h"
#include "model/micro_config.h"
#include "recording_backend.h"
#include "serve/engine.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace dt = diffmoe::test;
namespace st = diffmoe::serve::test;

// A sequence of the scenario: it joins at step `join`, feeds its first `prompt` tokens in chunks of `chunk` (every
// row's logits), then one token a step (the last row's logits). Tokens are fixed in advance (teacher-forced).
struct Client {
  int64_t join = 0, prompt = 1, chunk = 1, total = 1;
  std::vector<int32_t> tokens = {};
  int64_t ids[2] = {-1, -1}, done = 0;
};

std::vector<Client> make_clients(const ModelConfig& cfg, uint64_t seed) {
  const int64_t T = cfg.max_seq_len;  // the micro configs' 8 positions bound every sequence
  std::vector<Client> c = {
      {.join = 0, .prompt = 5, .chunk = 2, .total = T},      // chunked: 2 expanded, then 2 + 1 latent
      {.join = 0, .prompt = 5, .chunk = 5, .total = T},      // one chunk, beside the chunked one's first
      {.join = 0, .prompt = 1, .chunk = 1, .total = T - 1},  // one position: latent
      {.join = 2, .prompt = 4, .chunk = 4, .total = T},      // joins while the others decode ...
      {.join = 2, .prompt = 4, .chunk = 4, .total = T - 2},  // ... with a chunk of the same length: one call
      {.join = 3, .prompt = 6, .chunk = 3, .total = T},      // chunked, joining late
  };
  for (size_t i = 0; i < c.size(); ++i) {
    c[i].tokens.resize(static_cast<size_t>(c[i].total));
    for (int64_t t = 0; t < c[i].total; ++t)
      c[i].tokens[static_cast<size_t>(t)] = static_cast<int32_t>(uniform_at(seed + i, 0x9f, static_cast<uint64_t>(t)) *
                                                                 (static_cast<double>(cfg.vocab_size) - 1e-9));
  }
  return c;
}

// What a run of the scenario saw: every logit row of every step, per engine (in step and batch order), and what the
// first engine (the expanded one) did.
struct ScenarioRun {
  std::vector<std::vector<double>> logits;  // per engine: [rows, V]
  int64_t expanded_rows = 0;                // rows the first engine expanded
  int64_t mixed_steps = 0;                  // steps with expanded and latent rows
  int64_t decode_rows_after = 0;            // decode rows of sequences whose first chunk was expanded
};

// Runs the clients through every engine, step by step, with the same batches. engines[0] expands prompts' first
// chunks: the rows it expands are checked against the scenario's.
ScenarioRun run_scenario(const std::vector<Engine*>& engines, std::vector<Client> clients) {
  const size_t E = engines.size();
  Engine& first = *engines[0];
  EXPECT_TRUE(first.expanded_prefill_enabled()) << first.expanded_prefill_error();
  ScenarioRun r;
  r.logits.resize(E);
  std::vector<std::vector<int64_t>> ids(clients.size(), std::vector<int64_t>(E, -1));
  for (int64_t step = 0; step < 64; ++step) {
    std::vector<std::vector<StepSequence>> batch(E);
    int64_t chunk_rows = 0, latent_rows = 0;
    for (size_t i = 0; i < clients.size(); ++i) {
      const Client& c = clients[i];
      if (step < c.join || c.done == c.total) continue;
      const bool prefill = c.done < c.prompt;
      const int64_t n = prefill ? std::min(c.chunk, c.prompt - c.done) : 1;
      (n >= 2 && c.done == 0 ? chunk_rows : latent_rows) += n;
      if (!prefill && c.chunk >= 2) r.decode_rows_after += 1;
      for (size_t e = 0; e < E; ++e) {
        if (ids[i][e] < 0) ids[i][e] = engines[e]->add_sequence();
        batch[e].push_back(
            {.seq = ids[i][e],
             .tokens = std::span<const int32_t>(c.tokens).subspan(static_cast<size_t>(c.done), static_cast<size_t>(n)),
             .logits = prefill ? LogitRows::kAll : LogitRows::kLast});
      }
    }
    if (batch[0].empty()) break;
    const int64_t before = first.expanded_rows();
    std::vector<int64_t> first_row;
    for (size_t e = 0; e < E; ++e) {
      const StepOutput out = engines[e]->step({}, batch[e]);
      const std::vector<double> l = st::host_logits(engines[e]->backend(), out.logits);
      r.logits[e].insert(r.logits[e].end(), l.begin(), l.end());
      if (e == 0) first_row = out.first_row;
      EXPECT_EQ(out.first_row, first_row) << "step " << step << ": logit rows in batch order on every engine";
    }
    EXPECT_EQ(first.expanded_rows() - before, chunk_rows) << "step " << step;
    r.mixed_steps += chunk_rows > 0 && latent_rows > 0;
    size_t k = 0;
    for (size_t i = 0; i < clients.size(); ++i) {
      Client& c = clients[i];
      if (step < c.join || c.done == c.total) continue;
      c.done += static_cast<int64_t>(batch[0][k++].tokens.size());
      if (c.done == c.total)
        for (size_t e = 0; e < E; ++e) engines[e]->release(ids[i][e]);
    }
  }
  r.expanded_rows = first.expanded_rows();
  for (size_t e = 0; e < E; ++e) EXPECT_EQ(engines[e]->cache().free_blocks(), engines[e]->cache().total_blocks());
  return r;
}

// The worst norm-wise relative error of a row of `got` against the same row of `want` ([rows, V] each).
double worst_row_error(const std::vector<double>& got, const std::vector<double>& want, int64_t V) {
  EXPECT_EQ(got.size(), want.size());
  double worst = 0.0;
  for (size_t row = 0; (row + 1) * static_cast<size_t>(V) <= std::min(got.size(), want.size()); ++row) {
    const auto x = got.begin() + static_cast<int64_t>(row) * V, y = want.begin() + static_cast<int64_t>(row) * V;
    worst = std::max(worst, dt::rel_error(std::vector<double>(x, x + V), std::vector<double>(y, y + V)));
  }
  return worst;
}

const EngineOptions kScenarioOptions{.max_batch = 6, .max_step_tokens = 24, .block_size = 3};

// The scenario covers what it claims: first chunks (2 + 5 + 4 + 4 + 3 rows), mixed steps, decode rows after them.
void expect_coverage(const ScenarioRun& r, const char* name) {
  EXPECT_EQ(r.expanded_rows, 18) << name;
  EXPECT_GE(r.mixed_steps, 2) << name;
  EXPECT_GE(r.decode_rows_after, 4) << name;
  EXPECT_GE(r.logits[0].size(), 40u * 19u) << name;
}

// The scenario on `m` through an expanded engine and a latent one; every row within tol.
void check_scenario(const char* name, Model& m, double tol, const char* why) {
  EngineOptions opt = kScenarioOptions;
  Engine on(m, opt);
  opt.expanded_prefill = false;
  Engine off(m, opt);
  EXPECT_FALSE(off.expanded_prefill_enabled());
  const ScenarioRun r = run_scenario({&on, &off}, make_clients(m.config(), 77));
  const int64_t V = m.config().vocab_size;
  const double worst = worst_row_error(r.logits[0], r.logits[1], V);
  std::printf(
      "[prefill] %s: %zu rows, %lld expanded, %lld mixed steps: max rel error of a row, on vs off %.3e "
      "(tolerance %.0e: %s)\n",
      name, r.logits[0].size() / static_cast<size_t>(V), static_cast<long long>(r.expanded_rows),
      static_cast<long long>(r.mixed_steps), worst, tol, why);
  EXPECT_LE(worst, tol) << name;
  EXPECT_EQ(off.expanded_rows(), 0);
  expect_coverage(r, name);
}

// f64: the paths differ in the order of sums of at most max(r_kv, d_nope, d_v, T) ≤ 8 terms per product, ~1e-16
// relative each, through three layers: measured ~1e-15. 1e-12 keeps three orders of margin; a wrong λ, scale, head
// or row is O(1e-2) or more.
constexpr double kF64Tol = 1e-12;

TEST(EnginePrefill, MatchesLatentPathF64MicroDiff) {
  CpuBackend be;
  Model m(dt::micro_diff_config(), be, DType::kF64);
  dt::randomize_for_test(m, 5);
  check_scenario("micro_diff f64", m, kF64Tol, "summation order");
}

TEST(EnginePrefill, MatchesLatentPathF64MicroPlain) {
  CpuBackend be;
  Model m(dt::micro_plain_config(), be, DType::kF64);
  dt::randomize_for_test(m, 6);
  check_scenario("micro_plain f64", m, kF64Tol, "summation order");
}

// The serving tests' model (two layers, r_kv 16, d_qk 16, V 300), differential or plain.
ModelConfig serve_model(bool differential) {
  nlohmann::ordered_json j = st::serve_config(300, 8).to_json();
  j["differential"] = differential;
  return ModelConfig::from_json(j, differential ? "serve_diff" : "serve_plain");
}

// f32: the same reordering at u = 6e-8: a reordered sum of K ≤ 16 O(1) products moves by ~√K·u ≈ 2.4e-7 relative,
// the softmax turns score errors into relative weight errors of the same size, and two layers and the head carry
// them to the logits: measured ~3e-7 per row. 1e-5 per row is ~30x that and still three orders below a wrong λ sign
// or a misplaced row.
constexpr double kF32Tol = 1e-5;

TEST(EnginePrefill, MatchesLatentPathF32Diff) {
  CpuBackend be;
  Model m(serve_model(true), be, DType::kF32);
  dt::randomize_for_test(m, 7);
  check_scenario("serve_diff f32", m, kF32Tol, "f32 summation order");
}

TEST(EnginePrefill, MatchesLatentPathF32Plain) {
  CpuBackend be;
  Model m(serve_model(false), be, DType::kF32);
  dt::randomize_for_test(m, 8);
  check_scenario("serve_plain f32", m, kF32Tol, "f32 summation order");
}

// The bf16 GEMM mode: each path rounds its own GEMM operands to bf16 (u = 2^-9 ≈ 2e-3 relative per value): the
// latent path q^C, W^UK, the latent output L and W^UV; the expanded path ĉ and W_kvb. So each is its own few bf16
// roundings per layer away from the f32 function, compounding over two layers and the head (the bf16 mode is
// ~7e-3 from f32 on this model, Engine.Fp8WeightsAgreeWithF32Greedy), and the two are about √2 of that apart.
// Checked: against the f32 latent engine, the expanded path's error (norm-wise over every row; measured ~7e-3, the
// latent path's own) is no more than 1.5x the latent path's; and the two bf16 paths are within 2e-2 of each other
// per row (two such errors; measured ~8e-3). A wrong λ sign or row is O(1e-1) or more.
TEST(EnginePrefill, MatchesLatentPathBf16GemmMode) {
  CpuBackend be;
  for (const bool differential : {true, false}) {
    const char* name = differential ? "serve_diff bf16 GEMMs" : "serve_plain bf16 GEMMs";
    const ModelConfig cfg = serve_model(differential);
    Model f32(cfg, be, DType::kF32);
    dt::randomize_for_test(f32, 9);
    Model m(cfg, be, DType::kF32, {.precision = Precision::kBF16});
    for (const ParamSpec& p : f32.specs()) m.set_param(p.name, dt::to_vector(f32.params().get(p.name)));
    EngineOptions opt = kScenarioOptions;
    Engine on(m, opt);
    opt.expanded_prefill = false;
    Engine off(m, opt), ref(f32, opt);
    const ScenarioRun r = run_scenario({&on, &off, &ref}, make_clients(cfg, 77));
    const double rows = worst_row_error(r.logits[0], r.logits[1], cfg.vocab_size);
    const double err_on = dt::rel_error(r.logits[0], r.logits[2]), err_off = dt::rel_error(r.logits[1], r.logits[2]);
    std::printf(
        "[prefill] %s: max rel error of a row, on vs off %.3e (tolerance 2e-2); vs f32, norm-wise: expanded "
        "%.3e, latent %.3e\n",
        name, rows, err_on, err_off);
    EXPECT_LE(rows, 2e-2) << name;
    EXPECT_LE(err_on, 1.5 * err_off) << name;
    expect_coverage(r, name);
  }
  be.set_gemm_precision(GemmPrecision::kF32);
}

// Pure decode steps take the latent path in both engines, with the same index layout. On a one-layer model the cache
// rows depend only on the embedding, so after prompts prefilled expanded (on) and latent (off) the two caches are
// bitwise equal, and so must be every logit of the decode steps that follow.
TEST(EnginePrefill, PureDecodeStepsAreBitwiseUnchanged) {
  CpuBackend be;
  nlohmann::ordered_json j = st::serve_config(300, 32).to_json();
  j["n_layers"] = 1;
  j["n_dense_layers"] = 1;
  Model m(ModelConfig::from_json(j, "serve_one_layer"), be, DType::kF32);
  dt::randomize_for_test(m, 10);
  Engine on(m, {.max_batch = 3, .max_step_tokens = 32, .block_size = 4});
  Engine off(m, {.max_batch = 3, .max_step_tokens = 32, .block_size = 4, .expanded_prefill = false});
  const std::vector<int32_t> p0 = {3, 141, 59, 26, 53, 58, 97}, p1 = {93, 238, 46, 26, 43, 38, 32}, p2 = {79, 50, 288};
  std::vector<StepSequence> a, b;
  // Shortest first: the expanded engine lays its chunks out by length, so both engines put every row at the same
  // place and their GEMMs see the same matrices (a BLAS may round a row differently at another place).
  for (const auto* p : {&p2, &p0, &p1}) {
    a.push_back({.seq = on.add_sequence(), .tokens = *p});
    b.push_back({.seq = off.add_sequence(), .tokens = *p});
  }
  const std::vector<double> prefill_on = st::host_logits(be, on.step({}, a).logits),
                            prefill_off = st::host_logits(be, off.step({}, b).logits);
  EXPECT_EQ(on.expanded_rows(), 17) << "every prompt expanded (no latent row in the step)";
  EXPECT_LE(dt::rel_error(prefill_on, prefill_off), kF32Tol);
  EXPECT_NE(prefill_on, prefill_off) << "the prefill took different paths (summation order differs)";
  const Tensor ca = on.cache().layer(0), cb = off.cache().layer(0);
  ASSERT_EQ(std::memcmp(ca.data, cb.data, ca.nbytes()), 0) << "the caches after the prefill";
  std::vector<int32_t> next(3);
  for (int step = 0; step < 6; ++step) {
    for (size_t i = 0; i < 3; ++i) {
      next[i] = static_cast<int32_t>((step * 31 + static_cast<int>(i) * 7 + 5) % 300);
      a[i].tokens = b[i].tokens = std::span<const int32_t>(&next[i], 1);
    }
    const std::vector<double> la = st::host_logits(be, on.step({}, a).logits),
                              lb = st::host_logits(be, off.step({}, b).logits);
    ASSERT_EQ(la, lb) << "decode step " << step;
  }
  EXPECT_EQ(on.expanded_rows(), 17);
}

TEST(EnginePrefill, RefusedAttentionFallsBackToLatentPath) {
  // An attention op that takes at most 4 query rows (as a kernel with a shared-memory bound would).
  CpuBackend cpu;
  st::RecordingBackend be(cpu);
  be.offer_graphs = false;
  be.max_attention_seq = 4;
  Model m(dt::micro_diff_config(), be, DType::kF64);
  dt::randomize_for_test(m, 11);
  Engine refused(m, {.max_batch = 2, .max_step_tokens = 8, .block_size = 4});
  EXPECT_FALSE(refused.expanded_prefill_enabled());
  EXPECT_NE(refused.expanded_prefill_error().find("this backend takes T <= 4, got 8"), std::string::npos)
      << refused.expanded_prefill_error();
  // With chunks the op takes (max_context 4), the path stays on.
  Engine taken(m, {.max_batch = 2, .max_step_tokens = 8, .max_context = 4, .block_size = 4});
  EXPECT_TRUE(taken.expanded_prefill_enabled()) << taken.expanded_prefill_error();
  const std::vector<int32_t> prompt = {4, 8, 15, 16};
  const std::vector<StepSequence> one = {{.seq = refused.add_sequence(), .tokens = prompt, .logits = LogitRows::kAll}};
  const std::vector<StepSequence> two = {{.seq = taken.add_sequence(), .tokens = prompt, .logits = LogitRows::kAll}};
  const std::vector<double> la = st::host_logits(be, refused.step({}, one).logits),
                            lb = st::host_logits(be, taken.step({}, two).logits);
  EXPECT_EQ(refused.expanded_rows(), 0);
  EXPECT_EQ(taken.expanded_rows(), 4);
  EXPECT_LE(dt::rel_error(la, lb), kF64Tol);
}

}  // namespace
}  // namespace diffmoe::serve
