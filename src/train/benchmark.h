// `diffmoe bench`: throughput of a model on a backend (docs/evaluation.md "Benchmark").
//  * train step: forward + backward + AdamW (global-norm clip, bias update) on random tokens of
//    [batch, seq], median over the timed steps (the backend synchronised around each), as
//    bench/step_bench.cpp times it; tokens/s = batch·seq / median step time;
//  * prefill and decode per decode batch b: a prompt of [b, prompt_len] random tokens into an
//    empty cache (prefill tokens/s = b·prompt_len / its time), then new_tokens greedy steps, each
//    reading the logits back to the host to choose every sequence's next token as generation
//    does (decode tokens/s = b·new_tokens / their time). Each case runs once untimed, then
//    `repeats` times (median).
// The decode side goes through a DecodeEngine: one function that runs one case and returns its two
// times, so that another engine (a paged cache, continuous batching) can be timed by the same
// command. time_generator_decode is the latent-cache Generator of model/generator.h.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"

namespace diffmoe {

struct DecodeCase {
  int64_t batch = 1;  // sequences decoded together
  int64_t prompt_len = 32;
  int64_t new_tokens = 8;  // decode steps after the prompt
  uint64_t seed = 1234;    // the prompt's random tokens
};

struct DecodeTiming {
  double prefill_s = 0;  // the prompt, through the logits of its last position (synchronised)
  double decode_s = 0;   // all new_tokens steps, logits read back and the next tokens chosen
};

using DecodeEngine = std::function<DecodeTiming(Model& model, const DecodeCase& c)>;

// The Generator (latent KV cache, model/generator.h) with room for prompt_len + new_tokens positions.
DecodeTiming time_generator_decode(Model& model, const DecodeCase& c);

struct BenchOptions {
  bool train = true;
  int64_t train_batch = 4, train_seq = 128;
  int train_steps = 3, warmup_steps = 1;
  bool decode = true;
  std::vector<int64_t> decode_batches = {1, 8, 64};
  int64_t prompt_len = 32, new_tokens = 8;
  int repeats = 1;
  uint64_t seed = 1234;
  double peak_tflops = 0;  // MFU denominator of the train step (docs/model.md §9 FLOPs); 0 = no MFU
  DecodeEngine decode_engine = time_generator_decode;
};

struct TrainStepBench {
  int64_t batch = 0, seq = 0, steps = 0, warmup_steps = 0;
  double median_s = 0, min_s = 0, max_s = 0;
  double tokens_per_s = 0;
  double flops_per_token = 0;
  std::optional<double> mfu;  // fraction of peak_tflops
  double loss = 0;            // of the last step (random tokens: about ln V)
};

struct DecodeBench {
  DecodeCase c;
  double prefill_s = 0, decode_s = 0;  // medians over the repeats
  double prefill_tokens_per_s = 0, decode_tokens_per_s = 0;
  double ms_per_step = 0;  // decode_s / new_tokens · 1000: the latency of one token per sequence
};

struct BenchReport {
  std::optional<TrainStepBench> train;
  std::vector<DecodeBench> decode;
};

// Runs the decode cases first (on the model's weights as loaded), then the train steps (which
// update the weights). `log` (optional) gets one line per finished measurement.
BenchReport run_benchmark(Model& model, const BenchOptions& opt, const std::function<void(std::string_view)>& log = {});

nlohmann::ordered_json bench_json(const BenchReport& r);

}  // namespace diffmoe
