// `diffmoe bench --engine serve`: the serving engine (engine.h) as a DecodeEngine of train/benchmark.h
// (docs/evaluation.md "Benchmark"). A case adds batch sequences, prefills every prompt in one step
// (all prompts' positions packed, the last position's logits), then runs new_tokens batched decode
// steps of one row per sequence, choosing each next token on the host from the logits read back, as
// time_generator_decode does with the Generator. The engine (its cache, its FP8 copies) is built
// before the timed part. time_engine_decode drops it after the case; EngineDecodeBench keeps it for
// the next run of the same case, so that the untimed first run records the decode steps' CUDA graphs
// (docs/serving.md "CUDA graphs") and the timed runs replay them, as a server that has been running does.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "serve/engine.h"
#include "train/benchmark.h"

namespace diffmoe::serve {

struct BenchEngineOptions {
  bool fp8_weights = false;      // EngineOptions::fp8_weights
  int64_t block_size = 16;       // EngineOptions::block_size
  bool cuda_graphs = true;       // EngineOptions::cuda_graphs
  bool expanded_prefill = true;  // EngineOptions::expanded_prefill
};

DecodeTiming time_engine_decode(Model& model, const DecodeCase& c, const BenchEngineOptions& opt);

// A DecodeEngine over one serving engine kept between runs of the same case (model, batch, prompt_len,
// new_tokens; each run's sequences are released after it). A case of another shape drops the engine
// first, then builds one for it. Copies share the engine.
class EngineDecodeBench {
 public:
  explicit EngineDecodeBench(BenchEngineOptions opt);
  DecodeTiming operator()(Model& model, const DecodeCase& c);
  // The graph counters summed over every engine built so far, and the last recording error ("" if none).
  GraphStats graph_stats() const;
  std::string graph_error() const;
  // Why an engine built so far turned its expanded prefill off (Engine::expanded_prefill_error; "" if none did).
  std::string expanded_prefill_error() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// The engine's own copies of weights, by the parameter they stand for, in bytes one step reads
// (decode_step_bytes' stored_bytes): W^UK and W^UV for wkv_b (W^UK padded to d_qk rows), and with
// fp8_weights the e4m3 weights and their f32 128×128-block scales.
std::unordered_map<std::string, int64_t> engine_stored_bytes(const Model& model, const BenchEngineOptions& opt);

}  // namespace diffmoe::serve
