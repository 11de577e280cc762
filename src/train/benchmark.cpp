#include "train/benchmark.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <iterator>

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

void check_decode_case(const ModelConfig& cfg, const DecodeCase& c) {
  DIFFMOE_CHECK(c.batch >= 1 && c.prompt_len >= 1 && c.new_tokens >= 1,
                "[bench] decode batch {}, prompt {}, new tokens {}: each must be >= 1", c.batch, c.prompt_len,
                c.new_tokens);
  DIFFMOE_CHECK(c.prompt_len + c.new_tokens <= cfg.max_seq_len,
                "[bench] prompt {} + new tokens {} exceed max_seq_len = {}", c.prompt_len, c.new_tokens,
                cfg.max_seq_len);
}

std::vector<int32_t> decode_prompt(const ModelConfig& cfg, const DecodeCase& c) {
  return random_tokens(c.batch * c.prompt_len, cfg.vocab_size, c.seed, 1);
}

void choose_greedy(Backend& be, const Tensor& logits, std::vector<float>& host, std::vector<int32_t>& next,
                   std::vector<int32_t>& tokens) {
  DIFFMOE_CHECK(logits.dtype == DType::kF32, "[bench] decode logits are {}, expected f32", dtype_name(logits.dtype));
  const int64_t rows = logits.dim(0), V = logits.dim(1);
  host.resize(static_cast<size_t>(rows * V));
  next.resize(static_cast<size_t>(rows));
  be.download(host.data(), logits);
  for (int64_t b = 0; b < rows; ++b) {
    const float* row = host.data() + b * V;
    next[static_cast<size_t>(b)] = static_cast<int32_t>(std::max_element(row, row + V) - row);
  }
  tokens.insert(tokens.end(), next.begin(), next.end());
}

DecodeTiming time_generator_decode(Model& model, const DecodeCase& c) {
  const ModelConfig& cfg = model.config();
  check_decode_case(cfg, c);
  Backend& be = model.backend();
  Generator gen(model, GeneratorOptions{.batch = c.batch, .max_len = c.prompt_len + c.new_tokens});
  const Tensor prompt_dev = gen.upload_tokens(decode_prompt(cfg, c), c.prompt_len);
  std::vector<float> logits;
  std::vector<int32_t> next;
  DecodeTiming t;
  t.tokens.reserve(static_cast<size_t>(c.batch * c.new_tokens));
  be.synchronize({});
  auto t0 = Clock::now();
  Tensor l = gen.prefill({}, prompt_dev);
  be.synchronize({});
  t.prefill_s = seconds_since(t0);
  if (c.on_decode) c.on_decode();
  t0 = Clock::now();
  for (int64_t i = 0; i < c.new_tokens; ++i) {
    choose_greedy(be, l, logits, next, t.tokens);
    l = gen.step({}, gen.upload_tokens(next, 1));
  }
  be.synchronize({});
  t.decode_s = seconds_since(t0);
  return t;
}

double max_experts_per_layer(const ModelConfig& cfg, int64_t batch) {
  return static_cast<double>(std::min(cfg.n_routed_experts, batch * cfg.n_activated_experts));
}

// docs/evaluation.md "Bandwidth bound".
DecodeStepBytes decode_step_bytes(const Model& model, const DecodeCase& c, double experts_per_layer,
                                  const std::unordered_map<std::string, int64_t>& stored_bytes) {
  const ModelConfig& cfg = model.config();
  DecodeStepBytes r;
  r.experts_per_layer = cfg.n_layers > cfg.n_dense_layers ? experts_per_layer : 0.0;
  for (const ParamSpec& p : model.specs()) {
    const Tensor t = model.params().get(p.name);
    const auto it = stored_bytes.find(p.name);
    const double bytes = static_cast<double>(it != stored_bytes.end() ? it->second : static_cast<int64_t>(t.nbytes()));
    if (p.kind == ParamKind::kExpert) {  // [E, out, in]: the experts some row was routed to
      r.weights += bytes / static_cast<double>(t.dim(0)) * experts_per_layer;
    } else if (p.kind == ParamKind::kEmbedding && !cfg.tie_embeddings) {  // the batch's rows
      r.weights += bytes / static_cast<double>(t.dim(0)) * static_cast<double>(c.batch);
    } else {  // read whole: the tied embedding is the head
      r.weights += bytes;
    }
  }
  // Step i (0-based) attends over prompt_len + i + 1 positions: the mean over the steps.
  const double context = static_cast<double>(c.prompt_len) + static_cast<double>(c.new_tokens + 1) / 2.0;
  r.cache = static_cast<double>(c.batch) * context *
            static_cast<double>(cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)) *
            static_cast<double>(dtype_size(model.dtype()));
  return r;
}

CopyBandwidth measure_copy_bandwidth(Backend& be, int64_t bytes, int repeats) {
  DIFFMOE_CHECK(bytes >= 4 && repeats >= 1, "[bench] copy bandwidth: {} bytes (>= 4), {} repeats (>= 1)", bytes,
                repeats);
  const int64_t n = bytes / 4;
  Arena a;
  a.add("src", Shape{n}, DType::kF32);
  a.add("dst", Shape{n}, DType::kF32);
  a.allocate(be.allocator());
  be.fill({}, {.out = a.get("src"), .value = 1.0});
  be.copy({}, {.dst = a.get("dst"), .src = a.get("src")});  // warm-up: first-touch pages, lazy set-up
  be.synchronize({});
  const auto t0 = Clock::now();
  for (int i = 0; i < repeats; ++i) be.copy({}, {.dst = a.get("dst"), .src = a.get("src")});
  be.synchronize({});
  CopyBandwidth r{.bytes = n * 4, .repeats = repeats, .seconds = seconds_since(t0)};
  r.bytes_per_s = 2.0 * static_cast<double>(r.bytes) * repeats / r.seconds;
  return r;
}

GreedyAgreement greedy_agreement(std::span<const int32_t> tokens, std::span<const int32_t> reference, int64_t prompts,
                                 int64_t new_tokens) {
  DIFFMOE_CHECK(prompts >= 1 && new_tokens >= 1 && std::ssize(tokens) == prompts * new_tokens &&
                    std::ssize(reference) == prompts * new_tokens,
                "[bench] greedy agreement: {} and {} tokens for {} prompts of {} new tokens", tokens.size(),
                reference.size(), prompts, new_tokens);
  int64_t same_tokens = 0, same_sequences = 0;
  for (int64_t b = 0; b < prompts; ++b) {
    int64_t i = 0;
    const auto at = [&](int64_t step) { return static_cast<size_t>(step * prompts + b); };
    while (i < new_tokens && tokens[at(i)] == reference[at(i)]) ++i;
    same_tokens += i;
    same_sequences += i == new_tokens ? 1 : 0;
  }
  return GreedyAgreement{
      .prompts = prompts,
      .new_tokens = new_tokens,
      .token_agreement = static_cast<double>(same_tokens) / static_cast<double>(prompts * new_tokens),
      .sequence_agreement = static_cast<double>(same_sequences) / static_cast<double>(prompts)};
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
    r.engine_name = opt.engine_name;
    r.weights_name = opt.weights_name;
    const int64_t copy_bytes = opt.copy_bytes > 0             ? opt.copy_bytes
                               : be.device() == Device::kCUDA ? int64_t{1} << 30
                                                              : int64_t{64} << 20;
    r.copy = measure_copy_bandwidth(be, copy_bytes);
    say(fmt::format("copy bandwidth: {:.1f} GB/s (2 x {} MiB per copy / time, {} copies)", r.copy->bytes_per_s / 1e9,
                    r.copy->bytes >> 20, r.copy->repeats));
    for (const int64_t b : opt.decode_batches) {
      DecodeCase c{.batch = b, .prompt_len = opt.prompt_len, .new_tokens = opt.new_tokens, .seed = opt.seed};
      c.count_experts = true;  // untimed: first-call setup, GEMM algorithm timing, the experts read
      const std::optional<double> counted = opt.decode_engine(model, c).experts_per_layer;
      c.count_experts = false;
      for (int extra = 0; be.tuning() && extra < 8; ++extra) opt.decode_engine(model, c);
      c.on_decode = opt.decode_profile_start;
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
      d.experts_counted = counted.has_value();
      d.bytes = decode_step_bytes(model, c, counted.value_or(max_experts_per_layer(cfg, b)), opt.engine_stored_bytes);
      d.bound_ms_per_step = d.bytes.total() / r.copy->bytes_per_s * 1000.0;
      d.fraction_of_bound = d.bound_ms_per_step / d.ms_per_step;
      say(fmt::format(
          "decode batch {:>3}: prefill {} tokens {:.0f} tokens/s, decode {} steps {:.0f} tokens/s ({:.2f} ms/step); "
          "bound {:.3f} ms/step ({:.1f} MB weights, {:.1f} MB cache, {:.1f} experts/layer), {:.1f}% of it",
          b, b * opt.prompt_len, d.prefill_tokens_per_s, opt.new_tokens, d.decode_tokens_per_s, d.ms_per_step,
          d.bound_ms_per_step, d.bytes.weights / 1e6, d.bytes.cache / 1e6, d.bytes.experts_per_layer,
          100.0 * d.fraction_of_bound));
      if (opt.decode_profile_report) opt.decode_profile_report(d);
      r.decode.push_back(d);
    }
    if (opt.reference_engine) {
      const int64_t n = opt.agreement_prompts > 0
                            ? opt.agreement_prompts
                            : *std::max_element(opt.decode_batches.begin(), opt.decode_batches.end());
      const DecodeCase c{.batch = n, .prompt_len = opt.prompt_len, .new_tokens = opt.new_tokens, .seed = opt.seed};
      const DecodeTiming got = opt.decode_engine(model, c), ref = opt.reference_engine(model, c);
      r.agreement = greedy_agreement(got.tokens, ref.tokens, n, opt.new_tokens);
      say(fmt::format(
          "greedy agreement with the model weights, {} prompts x {} tokens: {:.1f}% of tokens, {:.1f}% of "
          "sequences identical",
          n, opt.new_tokens, 100.0 * r.agreement->token_agreement, 100.0 * r.agreement->sequence_agreement));
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
  if (r.copy) {
    j["engine"] = r.engine_name;
    j["weights"] = r.weights_name;
    j["copy_bandwidth"] = {{"bytes", r.copy->bytes},
                           {"repeats", r.copy->repeats},
                           {"seconds", r.copy->seconds},
                           {"bytes_per_s", r.copy->bytes_per_s},
                           {"convention", "2 * bytes * repeats / seconds (read + write)"}};
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
                           {"ms_per_step", d.ms_per_step},
                           {"weight_bytes_per_step", d.bytes.weights},
                           {"cache_bytes_per_step", d.bytes.cache},
                           {"bytes_per_step", d.bytes.total()},
                           {"experts_per_moe_layer", d.bytes.experts_per_layer},
                           {"experts_counted", d.experts_counted},
                           {"bound_ms_per_step", d.bound_ms_per_step},
                           {"fraction_of_bound", d.fraction_of_bound}});
  if (r.agreement) {
    j["greedy_agreement"] = {{"prompts", r.agreement->prompts},
                             {"new_tokens", r.agreement->new_tokens},
                             {"token_agreement", r.agreement->token_agreement},
                             {"sequence_agreement", r.agreement->sequence_agreement}};
  } else {
    j["greedy_agreement"] = nullptr;
  }
  return j;
}

}  // namespace diffmoe
