// `diffmoe bench --engine serve`: the serving engine (engine.h) as a DecodeEngine of train/benchmark.h
// (docs/evaluation.md "Benchmark"). A case adds batch sequences, prefills every prompt in one step
// (all prompts' positions packed, the last position's logits), then runs new_tokens batched decode
// steps of one row per sequence, choosing each next token on the host from the logits read back, as
// time_generator_decode does with the Generator. The engine (its cache, its FP8 copies) is built
// before the timed part and dropped after it.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>

#include "train/benchmark.h"

namespace diffmoe::serve {

struct BenchEngineOptions {
  bool fp8_weights = false;  // EngineOptions::fp8_weights
  int64_t block_size = 16;   // EngineOptions::block_size
};

DecodeTiming time_engine_decode(Model& model, const DecodeCase& c, const BenchEngineOptions& opt);

// The engine's own copies of weights, by the parameter they stand for, in bytes one step reads
// (decode_step_bytes' stored_bytes): W^UK and W^UV for wkv_b (W^UK padded to d_qk rows), and with
// fp8_weights the e4m3 weights and their f32 128×128-block scales.
std::unordered_map<std::string, int64_t> engine_stored_bytes(const Model& model, const BenchEngineOptions& opt);

}  // namespace diffmoe::serve
