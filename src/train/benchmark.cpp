#include "train/benchmark.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>

#include "core/rng.h"
#include "model/generator.h"
#include "model/parameters.h"
#include "train/optimizer.h"

namespace diffmoe {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Uniform random token ids in [0, vocab), keyed by (seed, stream).
std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed, uint64_t stream) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (size_t i = 0; i < t.size(); ++i)
    t[i] = static_cast<int32_t>(
        std::min<double>(static_cast<double>(vocab - 1), uniform_at(seed, stream, i) * static_cast<double>(vocab)));
  return t;
}

}  // namespace

DecodeTiming time_generator_decode(Model& model, const DecodeCase& c) {
  const ModelConfig& cfg = model.config();
  const int64_t max_len = c.prompt_len + c.new_tokens;
  DIFFMOE_CHECK(c.batch >= 1 && c.prompt_len >= 1 && c.new_tokens >= 1,
                "[bench] decode batch {}, prompt {}, new tokens {}: each must be >= 1", c.batch, c.prompt_len,
                c.new_tokens);
  DIFFMOE_CHECK(max_len <= cfg.max_seq_len, "[bench] prompt {} + new tokens {} exceed max_seq_len = {}", c.prompt_len,
                c.new_tokens, cfg.max_seq_len);
  Backend& be = model.backend();
  Generator gen(model, GeneratorOptions{.batch = c.batch, .max_len = max_len});
  const std::vector<int32_t> prompt = random_tokens(c.batch * c.prompt_len, cfg.vocab_size, c.seed, 1);
  const Tensor prompt_dev = gen.upload_tokens(prompt, c.prompt_len);
  std::vector<float> logits(static_cast<size_t>(c.batch * cfg.vocab_size));
  std::vector<int32_t> next(static_cast<size_t>(c.batch));
  const auto choose = [&](const Tensor& l) {  // greedy, on the host, as `diffmoe generate` samples
    DIFFMOE_CHECK(l.dtype == DType::kF32, "[bench] decode logits are {}, expected f32", dtype_name(l.dtype));
    be.download(logits.data(), l);
    for (int64_t b = 0; b < c.batch; ++b) {
      const float* row = logits.data() + b * cfg.vocab_size;
      next[static_cast<size_t>(b)] = static_cast<int32_t>(std::max_element(row, row + cfg.vocab_size) - row);
    }
  };
  DecodeTiming t;
  be.synchronize({});
  auto t0 = Clock::now();
  Tensor l = gen.prefill({}, prompt_dev);
  be.synchronize({});
  t.prefill_s = seconds_since(t0);
  t0 = Clock::now();
  for (int64_t i = 0; i < c.new_tokens; ++i) {
    choose(l);
    l = gen.step({}, gen.upload_tokens(next, 1));
  }
  be.synchronize({});
  t.decode_s = seconds_since(t0);
  return t;
}

BenchReport run_benchmark(Model& model, const BenchOptions& opt, const std::function<void(std::string_view)>& log) {
  BenchReport r;
  Backend& be = model.backend();
  const ModelConfig& cfg = model.config();
  const auto say = [&](const std::string& s) {
    if (log) log(s);
  };
  if (opt.decode) {
    DIFFMOE_CHECK(opt.repeats >= 1, "[bench] repeats must be >= 1, got {}", opt.repeats);
    for (const int64_t b : opt.decode_batches) {
      const DecodeCase c{.batch = b, .prompt_len = opt.prompt_len, .new_tokens = opt.new_tokens, .seed = opt.seed};
      opt.decode_engine(model, c);  // untimed: first-call setup, GEMM algorithm timing
      for (int extra = 0; be.tuning() && extra < 8; ++extra) opt.decode_engine(model, c);
      std::vector<double> pre, dec;
      for (int i = 0; i < opt.repeats; ++i) {
        const DecodeTiming t = opt.decode_engine(model, c);
        pre.push_back(t.prefill_s);
        dec.push_back(t.decode_s);
      }
      DecodeBench d;
      d.c = c;
      d.prefill_s = median(pre);
      d.decode_s = median(dec);
      d.prefill_tokens_per_s = static_cast<double>(b * opt.prompt_len) / d.prefill_s;
      d.decode_tokens_per_s = static_cast<double>(b * opt.new_tokens) / d.decode_s;
      d.ms_per_step = d.decode_s / static_cast<double>(opt.new_tokens) * 1000.0;
      say(fmt::format(
          "decode batch {:>3}: prefill {} tokens {:.0f} tokens/s, decode {} steps {:.0f} tokens/s ({:.2f} ms/step)", b,
          b * opt.prompt_len, d.prefill_tokens_per_s, opt.new_tokens, d.decode_tokens_per_s, d.ms_per_step));
      r.decode.push_back(d);
    }
  }
  if (opt.train) {
    DIFFMOE_CHECK(opt.train_steps >= 1 && opt.warmup_steps >= 0, "[bench] train steps {} (>= 1), warm-up {} (>= 0)",
                  opt.train_steps, opt.warmup_steps);
    const int64_t B = opt.train_batch, T = opt.train_seq;
    model.set_batch_shape(B, T);
    AdamW adamw(model, OptimConfig{});
    adamw.init_masters(opt.seed);
    Arena io;
    io.add("tokens", Shape{B, T}, DType::kI32);
    io.add("targets", Shape{B, T}, DType::kI32);
    io.allocate(be.allocator());
    be.upload(io.get("tokens"), random_tokens(B * T, cfg.vocab_size, opt.seed, 2).data());
    be.upload(io.get("targets"), random_tokens(B * T, cfg.vocab_size, opt.seed, 3).data());
    const auto step = [&] {
      const auto t0 = Clock::now();
      model.zero_grads({});
      model.zero_expert_counts({});
      model.forward({}, io.get("tokens"), io.get("targets"));
      model.backward({}, 1.0);
      adamw.step({}, 1e-5);
      be.synchronize({});
      return seconds_since(t0);
    };
    be.synchronize({});
    int warm = 0;
    // As bench_step: more warm-up steps while the backend still times its GEMM algorithms.
    for (; warm < opt.warmup_steps || (be.tuning() && warm < opt.warmup_steps + 40); ++warm) step();
    std::vector<double> times;
    for (int s = 0; s < opt.train_steps; ++s) times.push_back(step());
    TrainStepBench t;
    t.batch = B;
    t.seq = T;
    t.steps = opt.train_steps;
    t.warmup_steps = warm;
    t.median_s = median(times);
    t.min_s = *std::min_element(times.begin(), times.end());
    t.max_s = *std::max_element(times.begin(), times.end());
    t.tokens_per_s = static_cast<double>(B * T) / t.median_s;
    t.flops_per_token = count_parameters(cfg, T).flops_per_token;
    if (opt.peak_tflops > 0) t.mfu = t.tokens_per_s * t.flops_per_token / (opt.peak_tflops * 1e12);
    t.loss = model.losses().lm_loss;
    say(fmt::format("train step {}x{}: median {:.4f} s ({} steps after {} warm-up), {:.0f} tokens/s{}", B, T,
                    t.median_s, t.steps, warm, t.tokens_per_s,
                    t.mfu ? fmt::format(", MFU {:.2f}%", 100.0 * *t.mfu) : ""));
    r.train = t;
  }
  return r;
}

nlohmann::ordered_json bench_json(const BenchReport& r) {
  nlohmann::ordered_json j;
  if (r.train) {
    const TrainStepBench& t = *r.train;
    j["train_step"] = {{"batch", t.batch},
                       {"seq", t.seq},
                       {"steps", t.steps},
                       {"warmup_steps", t.warmup_steps},
                       {"median_s", t.median_s},
                       {"min_s", t.min_s},
                       {"max_s", t.max_s},
                       {"tokens_per_s", t.tokens_per_s},
                       {"flops_per_token", t.flops_per_token},
                       {"mfu", t.mfu ? nlohmann::ordered_json(*t.mfu) : nlohmann::ordered_json(nullptr)},
                       {"loss", t.loss}};
  } else {
    j["train_step"] = nullptr;
  }
  j["decode"] = nlohmann::ordered_json::array();
  for (const DecodeBench& d : r.decode)
    j["decode"].push_back({{"batch", d.c.batch},
                           {"prompt_len", d.c.prompt_len},
                           {"new_tokens", d.c.new_tokens},
                           {"prefill_s", d.prefill_s},
                           {"prefill_tokens_per_s", d.prefill_tokens_per_s},
                           {"decode_s", d.decode_s},
                           {"decode_tokens_per_s", d.decode_tokens_per_s},
                           {"ms_per_step", d.ms_per_step}});
  return j;
}

}  // namespace diffmoe
