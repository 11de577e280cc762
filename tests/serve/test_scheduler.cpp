// The scheduler (src/serve/scheduler.h) on the serving test model, driven step by step without its
// thread (run_once) except where the thread itself is under test:
//  - greedy completions of requests batched together (joining at different steps, prompts longer
//    than a prefill chunk) equal greedy decoding of each prompt alone with model/generator.h;
//  - a seeded sampled request gives the same tokens alone and in a batch; another seed differs;
//  - stop strings end the text before their first occurrence, also across tokens and in the
//    streamed deltas; max_tokens ends with "length"; echo + logprobs give the full forward's
//    log-softmax for every prompt token;
//  - finished and cancelled requests give every cache block back; invalid requests are refused
//    naming the parameter; the thread serves concurrent submitters and drains on stop.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "model/generator.h"
#include "model/sampler.h"
#include "serve/scheduler.h"
#include "serve/text_stream.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace fs = std::filesystem;

struct Result {
  std::string text, finish_reason;
  std::vector<std::string> deltas;
  std::vector<int32_t> ids;
  std::vector<TokenLogprob> prompt;  // echo
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// Every event of a finished request.
Result collect(Request& r) {
  Result out;
  while (auto e = r.next_event(std::chrono::milliseconds(0))) {
    if (e->prompt) {
      out.prompt = e->tokens;
      continue;
    }
    if (!e->text.empty()) out.deltas.push_back(e->text);
    out.text += e->text;
    for (const TokenLogprob& t : e->tokens) out.ids.push_back(t.id);
    if (e->done) {
      out.finish_reason = e->finish_reason;
      out.prompt_tokens = e->prompt_tokens;
      out.completion_tokens = e->completion_tokens;
    }
  }
  return out;
}

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / fmt::format("diffmoe-serve-sched-{}", ::getpid());
    fs::create_directories(dir_);
    tok_ = test::test_tokenizer(dir_ / "tokenizer.json");
  }
  static void TearDownTestSuite() {
    tok_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  void SetUp() override {
    model_ = std::make_unique<Model>(test::serve_config(), be_, DType::kF64);
    diffmoe::test::randomize_for_test(*model_, 77);
  }
  std::unique_ptr<Scheduler> make(int64_t max_batch = 4, int64_t prefill_chunk = 5, int64_t block_size = 4) {
    SchedulerOptions o{
        .engine = {.max_batch = max_batch, .max_step_tokens = max_batch + prefill_chunk, .block_size = block_size},
        .prefill_chunk = prefill_chunk};
    return std::make_unique<Scheduler>(*model_, *tok_, o);
  }
  // Greedy tokens of `prompt` alone through the (one-batch) Generator.
  std::vector<int32_t> greedy_alone(const std::vector<int32_t>& prompt, int64_t n) {
    Generator gen(*model_, {.batch = 1});
    const Sampler greedy({.temperature = 0.0});
    Tensor logits = gen.prefill({}, gen.upload_tokens(prompt, static_cast<int64_t>(prompt.size())));
    std::vector<int32_t> out;
    for (int64_t i = 0; i < n; ++i) {
      out.push_back(greedy.sample_rows(be_, logits, 0)[0]);
      logits = gen.step({}, gen.upload_tokens(std::vector<int32_t>{out.back()}, 1));
    }
    return out;
  }
  static void drain(Scheduler& s) {
    while (s.run_once()) {
    }
  }

  static inline fs::path dir_;
  static inline std::unique_ptr<data::Tokenizer> tok_;
  CpuBackend be_;
  std::unique_ptr<Model> model_;
};

TEST_F(SchedulerTest, BatchedGreedyEqualsEachPromptAlone) {
  auto s = make();
  const std::vector<std::string> prompts = {"the captain walked to the sea", "café",
                                            "and she thought of the little garden with", "Zürich", "a whale"};
  std::vector<std::shared_ptr<Request>> reqs;
  // Two join at once, the others a few steps later (the batch is running), one waits for a slot.
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (i == 2) s->run_once(), s->run_once();
    reqs.push_back(s->submit(tok_->encode(prompts[i]), {.temperature = 0.0, .max_tokens = 12, .ignore_eos = true}));
  }
  drain(*s);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Result r = collect(*reqs[i]);
    EXPECT_EQ(r.finish_reason, "length");
    EXPECT_EQ(r.completion_tokens, 12);
    EXPECT_EQ(r.prompt_tokens, static_cast<int64_t>(tok_->encode(prompts[i]).size()));
    const std::vector<int32_t> want = greedy_alone(tok_->encode(prompts[i]), 12);
    EXPECT_EQ(r.ids, want) << "prompt " << i;
    EXPECT_EQ(r.text, tok_->decode(want)) << "prompt " << i;
  }
  const SchedulerStats st = s->stats();
  EXPECT_EQ(st.free_blocks, st.total_blocks) << "every block is free again";
  EXPECT_EQ(st.running, 0);
}

TEST_F(SchedulerTest, SeedGivesTheSameTokensWhateverSharesTheBatch) {
  const SamplingParams p{
      .temperature = 1.0, .top_k = 50, .top_p = 0.95, .seed = 1234, .max_tokens = 20, .ignore_eos = true};
  const std::vector<int32_t> prompt = tok_->encode("the house and the garden");
  auto alone = make();
  auto r1 = alone->submit(prompt, p);
  drain(*alone);
  auto busy = make();
  auto other = busy->submit(tok_->encode("señor"), {.temperature = 0.7, .seed = 5, .max_tokens = 30});
  busy->run_once();
  auto r2 = busy->submit(prompt, p);
  SamplingParams q = p;
  q.seed = 4321;
  auto r3 = busy->submit(prompt, q);
  drain(*busy);
  const Result a = collect(*r1), b = collect(*r2), c = collect(*r3);
  EXPECT_EQ(a.ids.size(), 20u);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.text, b.text);
  EXPECT_NE(a.ids, c.ids) << "another seed draws other tokens";
  (void)collect(*other);
}

// A model vocabulary wider than the tokenizer's (padded, as a 32768-wide model with a 29765-id tokenizer): the ids past
// the tokenizer are masked (−inf logits) and never sampled, in greedy and random sampling and with prompt logprobs.
TEST_F(SchedulerTest, IdsTheTokenizerLacksAreNeverSampled) {
  const int64_t tokenizer_ids = tok_->vocab_size();
  model_ = std::make_unique<Model>(test::serve_config(tokenizer_ids + 20), be_, DType::kF64);
  diffmoe::test::randomize_for_test(*model_, 78);
  auto s = make();
  const std::vector<int32_t> prompt = tok_->encode("the house and the garden");
  std::vector<std::shared_ptr<Request>> reqs;
  for (uint64_t seed = 0; seed < 4; ++seed)
    reqs.push_back(s->submit(prompt, {.temperature = seed == 0 ? 0.0 : 2.0,
                                      .seed = seed,
                                      .max_tokens = 24,
                                      .logprobs = seed == 1 ? 2 : -1,
                                      .echo = seed == 1,
                                      .ignore_eos = true}));
  drain(*s);
  for (const auto& r : reqs) {
    const Result got = collect(*r);
    EXPECT_EQ(got.finish_reason, "length");
    ASSERT_EQ(got.ids.size(), 24u);
    for (const int32_t id : got.ids) EXPECT_LT(id, tokenizer_ids);
  }
}

TEST_F(SchedulerTest, StopStringsEndTheTextBeforeTheirFirstOccurrence) {
  const std::vector<int32_t> prompt = tok_->encode("the ship");
  auto s = make();
  auto free_run = s->submit(prompt, {.temperature = 0.0, .max_tokens = 30, .ignore_eos = true});
  drain(*s);
  const Result full = collect(*free_run);
  ASSERT_GE(full.text.size(), 12u);
  // A stop string taken from the middle of the text (3 bytes: it may span tokens); it must end the
  // text at its FIRST occurrence.
  const std::string stop = full.text.substr(8, 3);
  const size_t first = full.text.find(stop);
  auto stopped =
      s->submit(prompt, {.temperature = 0.0, .max_tokens = 30, .stop = {"never appears", stop}, .ignore_eos = true});
  drain(*s);
  const Result r = collect(*stopped);
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_EQ(r.text, full.text.substr(0, first));
  for (const std::string& d : r.deltas) EXPECT_EQ(d.find(stop), std::string::npos) << "a delta leaked the stop string";
  // Streamed deltas are whole UTF-8: each one decodes on its own.
  for (const std::string& d : r.deltas) EXPECT_EQ(complete_utf8_prefix(d), d.size()) << "delta '" << d << "'";
  EXPECT_EQ(s->stats().free_blocks, s->stats().total_blocks);
}

TEST_F(SchedulerTest, CancelFreesBlocksAtOnce) {
  auto s = make(2, 4, 2);
  const int64_t total = s->stats().total_blocks;
  auto r =
      s->submit(tok_->encode("the morning letter was"), {.temperature = 0.0, .max_tokens = 40, .ignore_eos = true});
  auto waiting = s->submit(tok_->encode("a"), {.max_tokens = 40, .ignore_eos = true});  // sampled: no EOS stop
  auto blocked = s->submit(tok_->encode("in the garden"), {.temperature = 0.0, .max_tokens = 40, .ignore_eos = true});
  for (int i = 0; i < 6; ++i) s->run_once();
  EXPECT_LT(s->stats().free_blocks, total);
  r->cancel();
  waiting->cancel();
  s->run_once();
  const Result a = collect(*r), b = collect(*waiting);
  EXPECT_EQ(a.finish_reason, "cancelled");
  EXPECT_EQ(b.finish_reason, "cancelled");
  EXPECT_GT(a.completion_tokens, 0);
  drain(*s);
  EXPECT_EQ(collect(*blocked).finish_reason, "length");
  EXPECT_EQ(s->stats().free_blocks, total);
  EXPECT_EQ(s->stats().cancelled, 2);
}

// echo + logprobs + max_tokens 0 (lm-evaluation-harness's loglikelihood requests): the logprob of
// prompt token t is log_softmax(forward logits of position t − 1)[token t], position 0 has none.
// Same f64 model on both sides (engine vs training forward, 1e-15 apart), rounded to f32 for the
// host: 1e-5 absolute on O(1) logprobs covers the f32 rounding of logits of magnitude ~10.
TEST_F(SchedulerTest, EchoLogprobsAreTheFullForwardsLogSoftmax) {
  auto s = make(2, 3);
  const std::vector<int32_t> prompt = tok_->encode("the captain looked at the whale and the sea");
  auto r = s->submit(prompt, {.temperature = 0.0, .max_tokens = 0, .logprobs = 2, .echo = true});
  drain(*s);
  const Result res = collect(*r);
  ASSERT_EQ(res.prompt.size(), prompt.size());
  EXPECT_EQ(res.finish_reason, "length");
  EXPECT_EQ(res.completion_tokens, 0);
  const int64_t T = static_cast<int64_t>(prompt.size()), V = model_->config().vocab_size;
  diffmoe::test::Owned t(Shape{1, T}, DType::kI32);
  for (int64_t i = 0; i < T; ++i) t.at<int32_t>(i) = prompt[static_cast<size_t>(i)];
  model_->set_batch_shape(1, T);
  model_->forward({}, t, Tensor{});
  const std::vector<double> logits = diffmoe::test::to_vector(model_->logits());
  EXPECT_FALSE(res.prompt[0].logprob.has_value());
  for (int64_t p = 1; p < T; ++p) {
    const double* z = logits.data() + (p - 1) * V;
    double m = z[0], sum = 0.0;
    for (int64_t i = 0; i < V; ++i) m = std::max(m, z[i]);
    for (int64_t i = 0; i < V; ++i) sum += std::exp(z[i] - m);
    const double want = z[prompt[static_cast<size_t>(p)]] - m - std::log(sum);
    ASSERT_TRUE(res.prompt[static_cast<size_t>(p)].logprob.has_value());
    EXPECT_NEAR(*res.prompt[static_cast<size_t>(p)].logprob, want, 1e-5) << "position " << p;
    ASSERT_EQ(res.prompt[static_cast<size_t>(p)].top.size(), 2u);
    EXPECT_GE(res.prompt[static_cast<size_t>(p)].top[0].second, *res.prompt[static_cast<size_t>(p)].logprob - 1e-9);
  }
  EXPECT_EQ(s->stats().free_blocks, s->stats().total_blocks);
}

TEST_F(SchedulerTest, RefusesRequestsThatCannotRun) {
  auto s = make();
  const auto param_of = [&](std::vector<int32_t> prompt, SamplingParams p) -> std::string {
    try {
      s->submit(std::move(prompt), std::move(p));
    } catch (const InvalidRequest& e) {
      return e.param;
    }
    return "accepted";
  };
  const std::vector<int32_t> long_prompt(64, 40);  // max_seq_len 64
  EXPECT_EQ(param_of(long_prompt, {.max_tokens = 1}), "prompt");
  EXPECT_EQ(param_of({1, 2, 3}, {.max_tokens = 62}), "max_tokens");
  EXPECT_EQ(param_of({1, 2, 3}, {.max_tokens = 61}), "accepted");
  EXPECT_EQ(param_of({}, {}), "prompt");
  EXPECT_EQ(param_of({300}, {}), "prompt");
  EXPECT_EQ(param_of({1}, {.temperature = -1.0}), "temperature");
  EXPECT_EQ(param_of({1}, {.top_p = 0.0}), "top_p");
  EXPECT_EQ(param_of({1}, {.logprobs = 21}), "logprobs");
}

TEST_F(SchedulerTest, ThreadServesConcurrentSubmittersAndDrains) {
  auto s = make(3, 4);
  s->start();
  std::vector<std::thread> clients;
  std::vector<Result> results(6);
  for (int i = 0; i < 6; ++i) {
    clients.emplace_back([&, i] {
      auto r = s->submit(tok_->encode(i % 2 ? "the sea" : "déjà vu"),
                         {.temperature = 0.0, .max_tokens = 8, .ignore_eos = true});
      Result& out = results[static_cast<size_t>(i)];
      while (auto e = r->next_event(std::chrono::seconds(30))) {
        out.text += e->text;
        if (e->done) out.finish_reason = e->finish_reason;
      }
    });
  }
  for (auto& t : clients) t.join();
  s->stop(/*drain=*/true);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(results[static_cast<size_t>(i)].finish_reason, "length");
    EXPECT_EQ(results[static_cast<size_t>(i)].text, results[static_cast<size_t>(i % 2)].text);
  }
  EXPECT_EQ(s->stats().free_blocks, s->stats().total_blocks);
  EXPECT_THROW(s->submit({1}, {}), ServerBusy);
}

}  // namespace
}  // namespace diffmoe::serve
