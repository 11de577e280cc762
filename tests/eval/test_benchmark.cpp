// The throughput benchmark (src/train/benchmark.h) on a small model: every measurement is present
// and consistent with its own times, the decode engine is the function the options name, the
// Generator decode engine runs the cases it is given; the bandwidth bound's byte count on a
// hand-counted micro config, and the greedy agreement on hand-made token lists.
#include <gtest/gtest.h>

#include "eval_test_util.h"
#include "train/benchmark.h"

namespace diffmoe {
namespace {

TEST(Benchmark, ReportsEveryMeasurement) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32, 5, 32);
  BenchOptions o;
  o.train_batch = 2;
  o.train_seq = 8;
  o.train_steps = 2;
  o.warmup_steps = 1;
  o.decode_batches = {1, 3};
  o.prompt_len = 5;
  o.new_tokens = 3;
  o.peak_tflops = 1.0;
  std::vector<std::string> lines;
  const BenchReport r = run_benchmark(*model, o, [&](std::string_view s) { lines.emplace_back(s); });
  ASSERT_TRUE(r.train.has_value());
  const TrainStepBench& t = *r.train;
  EXPECT_EQ(t.batch, 2);
  EXPECT_EQ(t.seq, 8);
  EXPECT_EQ(t.steps, 2);
  EXPECT_EQ(t.warmup_steps, 1);
  EXPECT_GT(t.median_s, 0);
  EXPECT_LE(t.min_s, t.median_s);
  EXPECT_GE(t.max_s, t.median_s);
  EXPECT_DOUBLE_EQ(t.tokens_per_s, 16.0 / t.median_s);
  ASSERT_TRUE(t.mfu.has_value());
  EXPECT_DOUBLE_EQ(*t.mfu, t.tokens_per_s * t.flops_per_token / 1e12);
  EXPECT_TRUE(std::isfinite(t.loss));
  EXPECT_GT(t.loss, 0.0);
  ASSERT_EQ(r.decode.size(), 2u);
  for (const DecodeBench& d : r.decode) {
    EXPECT_GT(d.prefill_s, 0);
    EXPECT_GT(d.decode_s, 0);
    EXPECT_DOUBLE_EQ(d.prefill_tokens_per_s, static_cast<double>(d.c.batch * 5) / d.prefill_s);
    EXPECT_DOUBLE_EQ(d.decode_tokens_per_s, static_cast<double>(d.c.batch * 3) / d.decode_s);
    EXPECT_DOUBLE_EQ(d.ms_per_step, d.decode_s / 3 * 1000);
  }
  EXPECT_EQ(r.decode[1].c.batch, 3);
  EXPECT_EQ(lines.size(), 4u) << "the copy bandwidth, one line per decode batch and one for the train step";
  ASSERT_TRUE(r.copy.has_value());
  EXPECT_EQ(r.copy->bytes, int64_t{64} << 20) << "the CPU's default copy";
  EXPECT_DOUBLE_EQ(r.copy->bytes_per_s, 2.0 * static_cast<double>(r.copy->bytes) * r.copy->repeats / r.copy->seconds);
  for (const DecodeBench& d : r.decode) {
    EXPECT_FALSE(d.experts_counted) << "the Generator does not count";
    EXPECT_EQ(d.bytes.experts_per_layer, max_experts_per_layer(model->config(), d.c.batch));
    EXPECT_EQ(d.bytes.total(), decode_step_bytes(*model, d.c, d.bytes.experts_per_layer).total());
    EXPECT_DOUBLE_EQ(d.bound_ms_per_step, d.bytes.total() / r.copy->bytes_per_s * 1000);
    EXPECT_DOUBLE_EQ(d.fraction_of_bound, d.bound_ms_per_step / d.ms_per_step);
  }
  EXPECT_FALSE(r.agreement.has_value()) << "no reference engine";
  const nlohmann::ordered_json j = bench_json(r);
  EXPECT_EQ(j["train_step"]["batch"], 2);
  EXPECT_EQ(j["decode"].size(), 2u);
  EXPECT_EQ(j["decode"][1]["batch"], 3);
  for (const char* k : {"decode_tokens_per_s", "weight_bytes_per_step", "cache_bytes_per_step", "bytes_per_step",
                        "experts_per_moe_layer", "experts_counted", "bound_ms_per_step", "fraction_of_bound"})
    EXPECT_TRUE(j["decode"][0].contains(k)) << k;
  EXPECT_EQ(j["engine"], "generator");
  EXPECT_EQ(j["weights"], "model");
  EXPECT_EQ(j["copy_bandwidth"]["bytes"], int64_t{64} << 20);
  EXPECT_TRUE(j["greedy_agreement"].is_null());
}

// docs/evaluation.md "Bandwidth bound" on micro_diff (f32: 4 bytes a value), counted by hand:
//   per layer, attention: attn_norm 16, wq_a 8·16, q_norm 8, wq_b 4·7·8, wkv_a 10·16, kv_norm 6,
//     wkv_b 4·6·6, wo 16·12, subln 6, λ 4·7, ffn_norm 16                                  = 928
//   layer 0 (dense FFN 3·20·16 = 960)                                                      = 1888
//   layers 1, 2 (gate 8·16, bias 8, shared 3·6·16; routed experts apart)                   = 1352 each
//   final norm 16, head 23·16 = 368, embedding rows batch·16; one routed expert 3·6·16 = 288 values.
// Batch 3, top-2 of 8 experts: min(8, 6) = 6 experts per MoE layer.
//   weights (1888 + 2·1352 + 16 + 368 + 3·16 + 2·6·288) · 4 = 8480 · 4 = 33920 bytes
//   cache: steps attend over 5, 6, 7 positions (prompt 4, 3 new tokens): mean 6;
//          3 sequences · 6 · 3 layers · (6 + 4) · 4 = 2160 bytes
TEST(Benchmark, DecodeStepBytesByHand) {
  CpuBackend be;
  Model m(test::micro_diff_config(), be, DType::kF32);
  const DecodeCase c{.batch = 3, .prompt_len = 4, .new_tokens = 3};
  EXPECT_EQ(max_experts_per_layer(m.config(), 3), 6.0);
  EXPECT_EQ(max_experts_per_layer(m.config(), 9), 8.0) << "at most every expert";
  const DecodeStepBytes b = decode_step_bytes(m, c, max_experts_per_layer(m.config(), 3));
  EXPECT_EQ(b.weights, 33920.0);
  EXPECT_EQ(b.cache, 2160.0);
  EXPECT_EQ(b.total(), 36080.0);
  EXPECT_EQ(b.experts_per_layer, 6.0);
  // A counted 2.5 experts per layer; an engine that stores wo of layer 0 in 100 bytes (192 values).
  const DecodeStepBytes counted = decode_step_bytes(m, c, 2.5, {{"layers.0.attn.wo.weight", 100}});
  EXPECT_EQ(counted.weights, 33920.0 - 2 * 3.5 * 288 * 4 - 192 * 4 + 100);
  // Tied embeddings (micro_plain): the head reads the whole table, no separate rows.
  Model tied(test::micro_plain_config(), be, DType::kF32);
  const DecodeStepBytes one = decode_step_bytes(tied, DecodeCase{.batch = 1, .prompt_len = 2, .new_tokens = 1}, 3);
  const DecodeStepBytes two = decode_step_bytes(tied, DecodeCase{.batch = 2, .prompt_len = 2, .new_tokens = 1}, 3);
  EXPECT_EQ(two.weights, one.weights) << "no per-row embedding bytes when the table is read whole";
  EXPECT_EQ(two.cache, 2 * one.cache);
}

// Tokens [new_tokens, prompts]: agreement counts each sequence's tokens up to its first divergence.
TEST(Benchmark, GreedyAgreementCountsUpToTheFirstDivergence) {
  // 3 prompts × 4 steps, step-major: sequence 0 identical, 1 diverges at step 1 (then agrees again,
  // which does not count), 2 diverges at step 3.
  const std::vector<int32_t> ref = {1, 2, 3, /**/ 4, 5, 6, /**/ 7, 8, 9, /**/ 10, 11, 12};
  const std::vector<int32_t> got = {1, 2, 3, /**/ 4, 0, 6, /**/ 7, 8, 9, /**/ 10, 11, 0};
  const GreedyAgreement a = greedy_agreement(got, ref, 3, 4);
  EXPECT_EQ(a.prompts, 3);
  EXPECT_EQ(a.new_tokens, 4);
  EXPECT_DOUBLE_EQ(a.token_agreement, (4.0 + 1.0 + 3.0) / 12.0);
  EXPECT_DOUBLE_EQ(a.sequence_agreement, 1.0 / 3.0);
  EXPECT_EQ(greedy_agreement(ref, ref, 3, 4).token_agreement, 1.0);
  EXPECT_THROW(greedy_agreement(got, ref, 4, 4), Error) << "sizes disagree with the shape";
}

TEST(Benchmark, CopyBandwidthCountsReadAndWrite) {
  CpuBackend be;
  const CopyBandwidth c = measure_copy_bandwidth(be, 1 << 20, 3);
  EXPECT_EQ(c.bytes, 1 << 20);
  EXPECT_EQ(c.repeats, 3);
  EXPECT_GT(c.seconds, 0);
  EXPECT_DOUBLE_EQ(c.bytes_per_s, 2.0 * (1 << 20) * 3 / c.seconds);
  EXPECT_THROW(measure_copy_bandwidth(be, 0), Error);
}

TEST(Benchmark, DecodeGoesThroughTheEngineGiven) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32, 5, 32);
  BenchOptions o;
  o.train = false;
  o.decode_batches = {2, 4};
  o.prompt_len = 4;
  o.new_tokens = 2;
  o.repeats = 3;
  o.copy_bytes = 1 << 20;
  std::vector<DecodeCase> seen;
  int starts = 0;
  std::vector<int64_t> reported;
  o.decode_profile_start = [&] { ++starts; };
  o.decode_profile_report = [&](const DecodeBench& d) { reported.push_back(d.c.batch); };
  o.decode_engine = [&](Model& m, const DecodeCase& c) {
    seen.push_back(c);
    if (c.on_decode) c.on_decode();
    return DecodeTiming{.prefill_s = 0.5 * static_cast<double>(seen.size()), .decode_s = 0.25};
  };
  const BenchReport r = run_benchmark(*model, o);
  EXPECT_FALSE(r.train.has_value());
  ASSERT_EQ(seen.size(), 8u) << "per batch: one untimed run, then 3 timed";
  EXPECT_EQ(seen[0].batch, 2);
  EXPECT_EQ(seen[4].batch, 4);
  EXPECT_EQ(seen[0].prompt_len, 4);
  EXPECT_TRUE(seen[0].count_experts && seen[4].count_experts) << "the untimed run counts the experts";
  EXPECT_FALSE(seen[1].count_experts || seen[3].count_experts || seen[5].count_experts) << "timed runs do not";
  EXPECT_EQ(starts, 6) << "the profile restarts at each timed run's decode steps, not the untimed ones'";
  EXPECT_EQ(reported, (std::vector<int64_t>{2, 4})) << "reported once per decode batch";
  ASSERT_EQ(r.decode.size(), 2u);
  EXPECT_DOUBLE_EQ(r.decode[0].prefill_s, 1.5) << "the median of the timed runs 2..4 (1.0, 1.5, 2.0)";
  EXPECT_DOUBLE_EQ(r.decode[1].prefill_s, 3.5);
  EXPECT_DOUBLE_EQ(r.decode[0].decode_tokens_per_s, 2 * 2 / 0.25);
}

TEST(Benchmark, GeneratorEngineChecksItsCase) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32, 5, 16);
  const DecodeTiming t = time_generator_decode(*model, DecodeCase{.batch = 2, .prompt_len = 6, .new_tokens = 4});
  EXPECT_GT(t.prefill_s, 0);
  EXPECT_GT(t.decode_s, 0);
  EXPECT_EQ(t.tokens.size(), 8u) << "[new_tokens, batch]";
  for (const int32_t id : t.tokens) EXPECT_TRUE(id >= 0 && id < model->config().vocab_size) << id;
  EXPECT_THROW(time_generator_decode(*model, DecodeCase{.batch = 1, .prompt_len = 12, .new_tokens = 5}), Error)
      << "past max_seq_len";
  EXPECT_THROW(time_generator_decode(*model, DecodeCase{.batch = 0, .prompt_len = 2, .new_tokens = 1}), Error);
}

}  // namespace
}  // namespace diffmoe
