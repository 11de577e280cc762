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
// times and the tokens it chose, so that another engine can be timed by the same command.
// time_generator_decode is the latent-cache Generator of model/generator.h; serve/bench_decode.h
// times the serving engine (paged cache, optional FP8 weights).
// Each decode batch also gets its bandwidth bound (docs/evaluation.md "Bandwidth bound"): the bytes one
// decode step reads (decode_step_bytes) over a measured device copy bandwidth (measure_copy_bandwidth).
// With a reference engine (BenchOptions::reference_engine) the greedy tokens of both engines on the
// same prompts are compared (greedy_agreement).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"

namespace diffmoe {

struct DecodeCase {
  int64_t batch = 1;  // sequences decoded together
  int64_t prompt_len = 32;
  int64_t new_tokens = 8;  // decode steps after the prompt
  uint64_t seed = 1234;    // the prompt's random tokens
  // Also count the routed experts each decode step reads (DecodeTiming::experts_per_layer), where the
  // engine can; run_benchmark asks for it on the untimed run only (the count reads the device back).
  bool count_experts = false;
  // Called after the prefill, before the decode steps' clock starts (an op profile's reset).
  std::function<void()> on_decode = {};
};

struct DecodeTiming {
  double prefill_s = 0;              // the prompt, through the logits of its last position (synchronised)
  double decode_s = 0;               // all new_tokens steps, logits read back and the next tokens chosen
  std::vector<int32_t> tokens = {};  // [new_tokens, batch] the greedy choices, step by step
  // With DecodeCase::count_experts: the distinct routed experts one decode step reads per MoE layer,
  // averaged over the layers and steps. Empty where the engine does not count.
  std::optional<double> experts_per_layer = {};
};

using DecodeEngine = std::function<DecodeTiming(Model& model, const DecodeCase& c)>;

// The Generator (latent KV cache, model/generator.h) with room for prompt_len + new_tokens positions.
DecodeTiming time_generator_decode(Model& model, const DecodeCase& c);

// What every decode engine shares: the case's limits (throws naming them), its prompt ([batch,
// prompt_len] uniform random ids keyed by its seed) and the greedy choice on the host as
// `diffmoe generate` makes it (downloads f32 logits [batch, V] into `host`, writes each row's argmax
// to `next` and appends it to `tokens`).
void check_decode_case(const ModelConfig& cfg, const DecodeCase& c);
std::vector<int32_t> decode_prompt(const ModelConfig& cfg, const DecodeCase& c);
void choose_greedy(Backend& be, const Tensor& logits, std::vector<float>& host, std::vector<int32_t>& next,
                   std::vector<int32_t>& tokens);

// The bytes one decode step of c.batch sequences reads (docs/evaluation.md "Bandwidth bound"), mean
// over the case's new_tokens steps.
struct DecodeStepBytes {
  double weights = 0;            // every weight once in its stored dtype; routed experts: those hit
  double cache = 0;              // the latent cache rows the attention reads
  double experts_per_layer = 0;  // routed experts read per MoE layer (the count weights assumes)
  double total() const { return weights + cache; }
};
// stored_bytes: the weights the engine reads in another form than the model's compute weights, by
// parameter name (the serving engine's FP8 copies and W^UK/W^UV copies); the rest count
// Tensor::nbytes(). experts_per_layer: the routed experts one step reads per MoE layer
// (min(E, batch·top_k) when not counted). The latent cache is in the model's float type.
DecodeStepBytes decode_step_bytes(const Model& model, const DecodeCase& c, double experts_per_layer,
                                  const std::unordered_map<std::string, int64_t>& stored_bytes = {});
// min(E, batch · top_k): every routed expert a step can read.
double max_experts_per_layer(const ModelConfig& cfg, int64_t batch);

// A device-to-device copy of `bytes` (one warm-up copy, then `repeats` timed, synchronised):
// bytes_per_s = 2 · bytes · repeats / time, the read + write convention of copy benchmarks.
struct CopyBandwidth {
  int64_t bytes = 0;
  int repeats = 0;
  double seconds = 0;  // all timed copies
  double bytes_per_s = 0;
};
CopyBandwidth measure_copy_bandwidth(Backend& be, int64_t bytes, int repeats = 10);

// Greedy tokens of an engine against a reference on the same prompts ([new_tokens, prompts] each).
struct GreedyAgreement {
  int64_t prompts = 0, new_tokens = 0;
  double token_agreement = 0;     // tokens identical up to each sequence's first divergence / all tokens
  double sequence_agreement = 0;  // sequences whose tokens are all identical / prompts
};
GreedyAgreement greedy_agreement(std::span<const int32_t> tokens, std::span<const int32_t> reference, int64_t prompts,
                                 int64_t new_tokens);

struct DecodeBench;

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
  std::string engine_name = "generator", weights_name = "model";  // for the report
  // decode_step_bytes' stored_bytes for decode_engine.
  std::unordered_map<std::string, int64_t> engine_stored_bytes;
  // The device copy of the bandwidth bound: bytes copied (0 = 1 GiB on CUDA, 64 MiB elsewhere).
  int64_t copy_bytes = 0;
  // With a reference engine: the greedy tokens of decode_engine against it on agreement_prompts
  // prompts (0 = the largest decode batch) of prompt_len + new_tokens.
  DecodeEngine reference_engine;
  int64_t agreement_prompts = 0;
  // An op profile of the decode steps: decode_profile_start is each timed run's on_decode, and
  // decode_profile_report runs after the repeats of each decode batch (so it sees the last one's steps).
  std::function<void()> decode_profile_start;
  std::function<void(const DecodeBench&)> decode_profile_report;
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
  DecodeStepBytes bytes;
  bool experts_counted = false;  // bytes.experts_per_layer counted by the engine, else min(E, batch·top_k)
  double bound_ms_per_step = 0;  // bytes.total() / copy bandwidth
  double fraction_of_bound = 0;  // bound_ms_per_step / ms_per_step
};

struct BenchReport {
  std::optional<TrainStepBench> train;
  std::vector<DecodeBench> decode;
  std::optional<CopyBandwidth> copy;  // with decode
  std::optional<GreedyAgreement> agreement;
  std::string engine_name, weights_name;
};

// Runs the decode cases first (on the model's weights as loaded), then the train steps (which
// update the weights). `log` (optional) gets one line per finished measurement.
BenchReport run_benchmark(Model& model, const BenchOptions& opt, const std::function<void(std::string_view)>& log = {});

nlohmann::ordered_json bench_json(const BenchReport& r);

}  // namespace diffmoe
