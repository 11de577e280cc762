// The run configuration: every section of a config file other than `model:` (which
// model/config.h owns). Each key has a type and a default; an unknown key or a wrong type is an
// error naming the file and the dotted key. The resolved config (defaults filled in) is printed
// at the start of a run and saved with it.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace diffmoe {

struct TokenizerConfig {
  std::string path;           // tokenizer file (ours, HF tokenizer.json, or .tiktoken)
  std::string train_inputs;   // when `path` does not exist: train our BPE on these files
  int64_t vocab_size = 4096;  // for training
};

struct DataConfig {
  std::string inputs;  // text/JSONL(.gz/.zst) files, directories, globs (comma-separated)
  std::string text_field = "text";
  std::string shards;          // prepared shard directory; prepared from `inputs` when missing
  double val_fraction = 0.01;  // share of documents held out for validation
  int64_t doc_bytes = 16384;   // plain text is cut into documents of about this size at paragraph
                               // breaks, so a held-out share samples the whole corpus
};

struct TrainSettings {
  std::string out_dir = "runs/default";
  std::string device = "cpu";
  uint64_t seed = 1234;
  int64_t micro_batch = 8;  // sequences per micro-batch
  int64_t seq_len = 0;      // 0: model.max_seq_len
  int64_t grad_accum = 1;   // micro-batches per optimizer step
  int64_t max_steps = 1000;
  int64_t log_every = 10;
  double peak_tflops = 989.0;      // MFU denominator (docs/model.md §9: H100/H200 dense bf16)
  int64_t max_bad_steps = 1;       // consecutive non-finite steps before stopping
  int64_t stop_after = 0;          // stop after this many steps of this invocation, as if interrupted
                                   // (no extra checkpoint; the LR schedule still spans max_steps);
                                   // 0 = run to max_steps
  std::string precision = "f32";   // "f32": every op in f32; "bf16_gemm" (any device; the CPU is the
                                   // reference): the GEMMs round their inputs to bf16 and accumulate in
                                   // f32, GEMM-only activations are bf16 (Backend::set_gemm_precision;
                                   // docs/model.md §7); "fp8": bf16_gemm plus the DeepSeek-V3 FP8
                                   // recipe for the attention and FFN Linears (docs/model.md §7)
  std::string recompute = "none";  // activation recompute (model/recompute.h): "none" keeps every
                                   // activation; "attention", "moe" or "full" recompute those parts
                                   // in the backward (less memory, more backward work, the same
                                   // gradients)
};

struct OptimConfig {
  double lr = 3e-4;
  double min_lr = 3e-5;
  int64_t warmup_steps = 100;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;  // matrices only (see ParamSpec::decayed)
  double grad_clip = 1.0;     // global-norm clip; 0 disables
  // The Adam moments' storage: "f32" (the masters' dtype) or "bf16" (half the bytes; updated in f32
  // and rounded to nearest even on store, docs/model.md §7). The masters stay f32.
  std::string moment_dtype = "f32";
};

struct EvalConfig {
  int64_t every = 100;   // validation every N steps (0: only at the end)
  int64_t batches = 20;  // micro-batches per validation
};

struct CheckpointConfig {
  int64_t every = 500;  // steps between checkpoints (and always at the end)
  int64_t keep_last = 3;
  int64_t keep_every = 0;  // also keep every checkpoint whose step is a multiple of this
  std::string dir;         // default <out_dir>/checkpoints
};

struct LogConfig {
  bool tensorboard = true;        // <out_dir>/tb/events.out.tfevents.*
  bool jsonl = true;              // <out_dir>/metrics.jsonl
  std::string progress = "auto";  // "auto" (bar on a terminal), "bar", "lines"
};

// How the ranks of a run split the work (docs/model.md §12, docs/parallelism.md). The data-parallel degree is
// what remains: world size / expert.
struct ParallelConfig {
  int64_t expert = 1;                // expert-parallel ranks: the routed experts are split over them
  int64_t bucket_size = 40'000'000;  // gradient bucket size in elements (reduce-scatter granularity)
  // 1: ZeRO-1 (optimizer state sharded); 2: ZeRO-2 (gradients too: bucket slots, docs/parallelism.md §4).
  int64_t zero_stage = 1;
  int64_t grad_slots = 0;  // ZeRO-2: gradient slots per data-parallel group; 0 = automatic
};

struct RunConfig {
  ModelConfig model;
  TokenizerConfig tokenizer;
  DataConfig data;
  TrainSettings train;
  OptimConfig optim;
  EvalConfig eval;
  CheckpointConfig checkpoint;
  LogConfig log;
  ParallelConfig parallel;
  nlohmann::ordered_json resolved;  // every section with defaults filled in
};

// Reads a YAML config file, applies "a.b=value" overrides, checks every key.
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from an already-parsed document (`source` names it in errors).
RunConfig run_config_from_json(nlohmann::ordered_json doc, const std::string& source);

}  // namespace diffmoe
