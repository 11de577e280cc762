// `diffmoe bench --engine serve` (src/serve/bench_decode.h) on the CPU: the serving engine's decode
// engine chooses the same greedy tokens as the Generator's on the same prompts, counts the routed
// experts its steps read, reports its own weight copies in bytes, and the greedy agreement of FP8
// weights with the model weights (exactly 1 for the same weights) through run_benchmark.
#include <gtest/gtest.h>

#include <cstdio>
#include <set>

#include "backend/cpu/cpu_backend.h"
#include "model/micro_config.h"
#include "serve/bench_decode.h"
#include "serve/engine.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace dt = diffmoe::test;
namespace st = diffmoe::serve::test;

std::unique_ptr<Model> bench_model(Backend& be) {
  auto m = std::make_unique<Model>(st::serve_config(), be, DType::kF32);
  dt::randomize_for_test(*m, 17);
  return m;
}

// The same math on the same prompts (engine.h: a row's logits are the full forward's): the greedy
// tokens match the Generator's token for token. Random O(1) weights make exact logit ties (where
// the two summation orders could pick different argmaxes) practically impossible.
TEST(BenchDecode, ServeEngineChoosesTheGeneratorsTokens) {
  CpuBackend be;
  auto m = bench_model(be);
  const DecodeCase c{.batch = 3, .prompt_len = 5, .new_tokens = 6, .seed = 77};
  const DecodeTiming serve = time_engine_decode(*m, c, {}), gen = time_generator_decode(*m, c);
  EXPECT_GT(serve.prefill_s, 0);
  EXPECT_GT(serve.decode_s, 0);
  ASSERT_EQ(serve.tokens.size(), 18u) << "[new_tokens, batch]";
  EXPECT_EQ(serve.tokens, gen.tokens);
  EXPECT_FALSE(serve.experts_per_layer.has_value()) << "counted only when asked";
  int calls = 0;
  DecodeCase hooked = c;
  hooked.on_decode = [&] { ++calls; };
  time_engine_decode(*m, hooked, {});
  EXPECT_EQ(calls, 1) << "once, between the prefill and the decode steps";
  time_generator_decode(*m, hooked);
  EXPECT_EQ(calls, 2);
  std::set<int32_t> distinct(serve.tokens.begin(), serve.tokens.end());
  EXPECT_GT(distinct.size(), 1u) << "not a constant answer";
  EXPECT_THROW(time_engine_decode(*m, DecodeCase{.batch = 1, .prompt_len = 60, .new_tokens = 5}, {}), Error)
      << "past max_seq_len";
  EXPECT_THROW(time_engine_decode(*m, DecodeCase{.batch = 0, .prompt_len = 2, .new_tokens = 1}, {}), Error);
}

// EngineDecodeBench keeps one engine per case shape: runs of the same case reuse it (its cache holds
// no sequence between runs) and give the one-shot engine's tokens; another shape builds a new engine.
// On the CPU nothing is recorded (the backend has no graphs) and no recording error is kept.
TEST(BenchDecode, KeptEngineRunsEachCaseAsAFreshOne) {
  CpuBackend be;
  auto m = bench_model(be);
  EngineDecodeBench bench(BenchEngineOptions{});
  const DecodeEngine engine = bench;  // copies share the kept engine
  const DecodeCase c{.batch = 3, .prompt_len = 5, .new_tokens = 6, .seed = 77};
  const DecodeTiming once = time_engine_decode(*m, c, {});
  for (int run = 0; run < 3; ++run) EXPECT_EQ(engine(*m, c).tokens, once.tokens) << "run " << run;
  const DecodeCase wider{.batch = 4, .prompt_len = 7, .new_tokens = 3, .seed = 5};
  EXPECT_EQ(bench(*m, wider).tokens, time_engine_decode(*m, wider, {}).tokens);
  EXPECT_EQ(engine(*m, c).tokens, once.tokens) << "back to the first shape";
  const GraphStats g = bench.graph_stats();
  EXPECT_EQ(g.captures, 0);
  EXPECT_EQ(g.replays, 0);
  EXPECT_TRUE(bench.graph_error().empty());
  EXPECT_THROW(bench(*m, DecodeCase{.batch = 1, .prompt_len = 60, .new_tokens = 5}), Error) << "past max_seq_len";
}

// The experts the decode steps read: between top_k (one sequence) and min(E, batch·top_k).
TEST(BenchDecode, CountsTheExpertsRead) {
  CpuBackend be;
  auto m = bench_model(be);
  const ModelConfig& cfg = m->config();
  for (const int64_t b : {1, 2, 5}) {
    const DecodeTiming t =
        time_engine_decode(*m, DecodeCase{.batch = b, .prompt_len = 4, .new_tokens = 3, .count_experts = true}, {});
    ASSERT_TRUE(t.experts_per_layer.has_value());
    if (b == 1) {
      EXPECT_DOUBLE_EQ(*t.experts_per_layer, static_cast<double>(cfg.n_activated_experts));
    }
    EXPECT_GE(*t.experts_per_layer, static_cast<double>(cfg.n_activated_experts));
    EXPECT_LE(*t.experts_per_layer, max_experts_per_layer(cfg, b));
  }
}

// The engine's copies: W^UK padded to d_qk rows plus W^UV for wkv_b; e4m3 values plus f32 block scales.
TEST(BenchDecode, StoredBytesOfTheEnginesCopies) {
  CpuBackend be;
  auto m = bench_model(be);
  const ModelConfig& c = m->config();  // H 4, d_qk 16, d_v 8, r_kv 16; dim 32, q_lora 16, inter 64
  const auto model_bytes = engine_stored_bytes(*m, {});
  EXPECT_EQ(model_bytes.size(), static_cast<size_t>(c.n_layers));
  EXPECT_EQ(model_bytes.at("layers.1.attn.wkv_b.weight"), 4 * (16 + 8) * 16 * 4);
  const auto fp8 = engine_stored_bytes(*m, {.fp8_weights = true});
  EXPECT_EQ(fp8.size(), c.n_layers + fp8_weight_names(c).size());
  // wq_a [16, 32]: 512 e4m3 bytes, one 128×128 block with its scale row padded to 4 f32.
  EXPECT_EQ(fp8.at("layers.0.attn.wq_a.weight"), 16 * 32 + 1 * 4 * 4);
  EXPECT_EQ(fp8.at("layers.0.ffn.w2.weight"), 32 * 64 + 1 * 4 * 4);
  EXPECT_FALSE(fp8.contains("layers.1.ffn.experts.w1")) << "the routed experts keep the compute dtype";
  // In the bound: the model weights' f32 dense matrices count 4 bytes a value, the FP8 copies about 1.
  const DecodeCase dc{.batch = 1, .prompt_len = 4, .new_tokens = 2};
  const double w32 = decode_step_bytes(*m, dc, 2, model_bytes).weights, w8 = decode_step_bytes(*m, dc, 2, fp8).weights;
  EXPECT_LT(w8, w32);
}

BenchOptions agreement_options(DecodeEngine engine, DecodeEngine reference) {
  BenchOptions o;
  o.train = false;
  o.decode_batches = {2};
  o.prompt_len = 6;
  o.new_tokens = 8;
  o.copy_bytes = 1 << 20;
  o.decode_engine = std::move(engine);
  o.reference_engine = std::move(reference);
  o.agreement_prompts = 6;
  return o;
}

TEST(BenchDecode, GreedyAgreementOfTheSameWeightsIsOne) {
  CpuBackend be;
  auto m = bench_model(be);
  const DecodeEngine serve = [](Model& mm, const DecodeCase& c) { return time_engine_decode(mm, c, {}); };
  const BenchReport r = run_benchmark(*m, agreement_options(serve, serve));
  ASSERT_TRUE(r.agreement.has_value());
  EXPECT_EQ(r.agreement->prompts, 6);
  EXPECT_EQ(r.agreement->new_tokens, 8);
  EXPECT_EQ(r.agreement->token_agreement, 1.0);
  EXPECT_EQ(r.agreement->sequence_agreement, 1.0);
  const nlohmann::ordered_json j = bench_json(r);
  EXPECT_EQ(j["greedy_agreement"]["token_agreement"], 1.0);
}

TEST(BenchDecode, Fp8GreedyAgreementIsAFraction) {
  CpuBackend be;
  auto m = bench_model(be);
  const DecodeEngine fp8 = [](Model& mm, const DecodeCase& c) {
    return time_engine_decode(mm, c, {.fp8_weights = true});
  };
  const DecodeEngine ref = [](Model& mm, const DecodeCase& c) { return time_engine_decode(mm, c, {}); };
  const BenchReport r = run_benchmark(*m, agreement_options(fp8, ref));
  ASSERT_TRUE(r.agreement.has_value());
  std::printf("[bench] fp8 weights: %.1f%% of tokens, %.1f%% of sequences agree\n", 100 * r.agreement->token_agreement,
              100 * r.agreement->sequence_agreement);
  EXPECT_GE(r.agreement->token_agreement, 0.0);
  // randomize_for_test's O(1) weights and 300-token vocabulary: e4m3's 2^-4 relative rounding flips
  // some of the 48 argmaxes (58% agree on the CPU); 1 would mean the FP8 copies were not used.
  EXPECT_LT(r.agreement->token_agreement, 1.0);
  EXPECT_GE(r.agreement->sequence_agreement, 0.0);
  EXPECT_LE(r.agreement->sequence_agreement, r.agreement->token_agreement)
      << "a fully identical sequence has all its tokens identical";
  ASSERT_EQ(r.decode.size(), 1u);
  EXPECT_TRUE(r.decode[0].experts_counted);
}

}  // namespace
}  // namespace diffmoe::serve
