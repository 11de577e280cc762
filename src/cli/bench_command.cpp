// `diffmoe bench (--config YAML | --checkpoint X) [--device cpu|cuda] [--engine generator|serve]
// [--weights model|fp8] [--report FILE] ...`: train-step, prefill and decode throughput of a preset (spec
// initialisation) or a trained model, the decode steps against their bandwidth bound, and with FP8
// weights their greedy agreement with the model weights (train/benchmark.h, serve/bench_decode.h;
// docs/evaluation.md "Benchmark"). Defaults are small on the CPU.
#include <fmt/core.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>

#include "backend/backend_registry.h"
#include "backend/cuda/op_profiler.h"
#include "cli/commands.h"
#include "core/error.h"
#include "io/file_util.h"
#include "model/parameters.h"
#include "serve/bench_decode.h"
#include "train/benchmark.h"
#include "train/checkpoint_reader.h"

namespace diffmoe::cli {

namespace {

struct BenchArgs {
  std::string config, checkpoint, device = "cpu", precision = "f32", report, engine = "generator", weights = "model";
  int64_t agreement_prompts = -1;  // −1: the largest decode batch, with --weights fp8 only
  std::vector<int64_t> decode_batches = {1, 8, 64};
  // −1: the device's default (run_bench).
  int64_t batch = -1, seq = -1, prompt_len = -1, new_tokens = -1;
  int steps = -1, warmup = -1, repeats = -1;
  double peak_tflops = -1;
  bool no_train = false, no_decode = false, no_verify = false, no_cuda_graphs = false, no_expanded_prefill = false;
  uint64_t seed = 1234;
};

int run_bench(const BenchArgs& a) {
  DIFFMOE_CHECK(a.config.empty() != a.checkpoint.empty(),
                "give exactly one of --config (a preset, spec initialisation) and --checkpoint");
  // Before the benchmark, and again before the rename that would replace a device node or FIFO.
  if (!a.report.empty()) io::check_output_path(a.report, "bench report");
  // The decode engine's flags, checked before the model loads; --weights as `diffmoe serve` reads it.
  DIFFMOE_CHECK(a.engine == "generator" || a.engine == "serve", "--engine: '{}' is not one of generator, serve",
                a.engine);
  DIFFMOE_CHECK(a.weights == "model" || a.weights == "fp8", "--weights: '{}' is not one of model, fp8", a.weights);
  DIFFMOE_CHECK(a.weights == "model" || a.engine == "serve",
                "--weights fp8 needs --engine serve (the generator decodes with the model's weights)");
  DIFFMOE_CHECK(!a.no_cuda_graphs || a.engine == "serve",
                "--no-cuda-graphs applies to --engine serve (the generator records no graphs)");
  DIFFMOE_CHECK(!a.no_expanded_prefill || a.engine == "serve",
                "--no-expanded-prefill applies to --engine serve (the generator prefills through its latent cache)");
  DIFFMOE_CHECK(a.agreement_prompts == -1 || a.agreement_prompts >= 1,
                "--agreement-prompts: must be >= 1 (greedy sequences compared), got {}", a.agreement_prompts);
  auto be = make_backend(a.device);
  const ModelOptions mo{.precision = parse_precision(a.precision, "--precision")};
  // The serving engine's own layers run the forward (bf16 or f32 GEMMs), as in `diffmoe serve`.
  DIFFMOE_CHECK(a.engine != "serve" || a.no_decode || mo.precision != Precision::kFP8,
                "--precision fp8 is a training mode; decode with --engine serve --precision bf16 --weights fp8");
  std::unique_ptr<Model> model;
  nlohmann::ordered_json source;
  if (!a.config.empty()) {
    model = std::make_unique<Model>(load_model_config(a.config), *be, DType::kF32, mo);
    model->init_weights(a.seed);
    source = {{"config", a.config}};
  } else {
    LoadedCheckpoint ck = open_trained_model(
        a.checkpoint, *be, DType::kF32, OpenModelOptions{.tokenizer_path = "", .verify = !a.no_verify, .model = mo});
    model = std::move(ck.model);
    source = {{"checkpoint", ck.model_path},
              {"step", ck.step >= 0 ? nlohmann::ordered_json(ck.step) : nlohmann::ordered_json(nullptr)}};
  }
  const ModelConfig& cfg = model->config();
  const bool gpu = be->device() == Device::kCUDA;
  const auto pick = [](auto given, auto fallback) { return given >= 0 ? given : fallback; };
  BenchOptions o;
  o.train = !a.no_train;
  o.decode = !a.no_decode;
  o.train_batch = pick(a.batch, int64_t{gpu ? 8 : 4});
  o.train_seq = pick(a.seq, std::min<int64_t>(cfg.max_seq_len, gpu ? cfg.max_seq_len : 128));
  o.train_steps = pick(a.steps, gpu ? 10 : 3);
  o.warmup_steps = pick(a.warmup, gpu ? 3 : 1);
  o.decode_batches = a.decode_batches;
  o.new_tokens = pick(a.new_tokens, std::min<int64_t>(gpu ? 64 : 8, cfg.max_seq_len / 2));
  o.prompt_len = pick(a.prompt_len, std::min<int64_t>(gpu ? 512 : 32, cfg.max_seq_len - o.new_tokens));
  o.repeats = pick(a.repeats, gpu ? 3 : 1);
  o.seed = a.seed;
  o.peak_tflops = pick(a.peak_tflops, gpu ? 989.0 : 0.0);
  DIFFMOE_CHECK(o.train_seq >= 1 && o.train_seq <= cfg.max_seq_len, "--seq {} must be in [1, max_seq_len = {}]",
                o.train_seq, cfg.max_seq_len);
  DIFFMOE_CHECK(o.train_batch >= 1, "--batch must be >= 1, got {}", o.train_batch);
  for (const int64_t b : o.decode_batches) DIFFMOE_CHECK(b >= 1, "--decode-batch: {} is not a batch size (>= 1)", b);
  DIFFMOE_CHECK(o.prompt_len >= 1 && o.new_tokens >= 1 && o.prompt_len + o.new_tokens <= cfg.max_seq_len,
                "--prompt-len {} + --new-tokens {}: each >= 1, together at most max_seq_len = {}", o.prompt_len,
                o.new_tokens, cfg.max_seq_len);

  // The serving engine is kept between the runs of a case, so that its timed runs replay the CUDA graphs
  // the untimed run recorded (serve/bench_decode.h).
  std::optional<serve::EngineDecodeBench> engine_bench;
  if (a.engine == "serve") {
    const serve::BenchEngineOptions eo{.fp8_weights = a.weights == "fp8",
                                       .cuda_graphs = !a.no_cuda_graphs,
                                       .expanded_prefill = !a.no_expanded_prefill};
    engine_bench.emplace(eo);
    o.decode_engine = *engine_bench;
    o.engine_stored_bytes = serve::engine_stored_bytes(*model, eo);
    // The same engine on the model's weights: the reference of the greedy agreement.
    if (eo.fp8_weights || a.agreement_prompts >= 1)
      o.reference_engine = serve::EngineDecodeBench(
          serve::BenchEngineOptions{.cuda_graphs = eo.cuda_graphs, .expanded_prefill = eo.expanded_prefill});
  } else if (a.agreement_prompts >= 1) {
    o.reference_engine = time_generator_decode;  // the generator against itself: a determinism check
  }
  // DIFFMOE_CUDA_PROFILE=1 on --device cuda: where the decode time goes, per decode batch.
  if (auto* profiler = dynamic_cast<OpProfiler*>(be.get()); profiler != nullptr && profiler->profiling()) {
    o.decode_profile_start = [profiler] { profiler->reset_profile(); };
    o.decode_profile_report = [profiler](const DecodeBench& d) {
      fmt::print(
          "op profile of the {} decode steps of batch {} (the last timed run; events add a little time to each op):\n",
          d.c.new_tokens, d.c.batch);
      profiler->print_profile();
      profiler->reset_profile();
    };
  }
  o.engine_name = a.engine;
  o.weights_name = a.weights;
  o.agreement_prompts = std::max<int64_t>(a.agreement_prompts, 0);

  const ParamCounts pc = count_parameters(cfg, cfg.max_seq_len);
  fmt::print("bench {} on {} ({}): {:.2f}M parameters, {:.2f}M active; decode: {} engine, {} weights\n",
             a.config.empty() ? a.checkpoint : a.config, a.device, a.precision, static_cast<double>(pc.total) / 1e6,
             static_cast<double>(pc.active) / 1e6, a.engine, a.weights);
  const BenchReport r = run_benchmark(*model, o, [](std::string_view s) { fmt::print("{}\n", s); });
  std::optional<serve::GraphStats> graphs;
  if (engine_bench && !a.no_decode) {
    graphs = engine_bench->graph_stats();
    fmt::print("serve engine CUDA graphs{}: {} recorded, {} replayed steps, {} eager padded steps{}\n",
               a.no_cuda_graphs ? " (--no-cuda-graphs)" : "", graphs->captures, graphs->replays, graphs->eager_padded,
               engine_bench->graph_error().empty() ? "" : "; recording failed: " + engine_bench->graph_error());
    const std::string refused = engine_bench->expanded_prefill_error();
    fmt::print("serve engine prefill: {}\n", a.no_expanded_prefill ? "latent attention (--no-expanded-prefill)"
                                             : refused.empty()     ? "expanded, the training attention"
                                                                   : "latent attention; expanded refused: " + refused);
  }
  if (!a.report.empty()) {
    nlohmann::ordered_json j;
    j["model"] = source;
    j["model"]["parameters"] = pc.total;
    j["model"]["active_parameters"] = pc.active;
    j["device"] = a.device;
    j["precision"] = std::string(precision_name(model->plan().mode()));
    const nlohmann::ordered_json b = bench_json(r);
    for (const auto& [k, v] : b.items()) j[k] = v;
    if (graphs)
      j["cuda_graphs"] = {{"enabled", !a.no_cuda_graphs},
                          {"recorded", graphs->captures},
                          {"replayed_steps", graphs->replays},
                          {"eager_padded_steps", graphs->eager_padded},
                          {"error", engine_bench->graph_error()}};
    if (engine_bench && !a.no_decode)
      j["expanded_prefill"] = {{"enabled", !a.no_expanded_prefill && engine_bench->expanded_prefill_error().empty()},
                               {"error", engine_bench->expanded_prefill_error()}};
    const std::string text = j.dump(2) + "\n";
    io::check_output_path(a.report, "bench report");
    const io::Failure f =
        io::replace_file(a.report, [&](int fd) { return io::write_all(fd, text.data(), text.size()); });
    DIFFMOE_CHECK(!f, "{}: cannot write the report ({} failed: {})", a.report, f.step, std::strerror(f.err));
    fmt::print("report: {}\n", a.report);
  }
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd =
      app.add_subcommand("bench", "Throughput: train step, prefill and decode tokens/s of a preset or a checkpoint");
  auto a = std::make_shared<BenchArgs>();
  cmd->add_option("--config", a->config, "a preset / run config (model: section; spec initialisation)");
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint root, step directory or model .safetensors");
  cmd->add_option("--device", a->device, "cpu (default) or cuda");
  cmd->add_option("--precision", a->precision, "f32 (default) or bf16_gemm");
  cmd->add_option("--engine", a->engine,
                  "decode: generator (default; model/generator.h, one contiguous latent cache) or serve (the "
                  "serving engine: paged cache, batched steps)");
  cmd->add_option(
      "--weights", a->weights,
      "decode: model (default: the precision's weights) or fp8 (e4m3 dense Linear weights; --engine serve)");
  cmd->add_flag("--no-cuda-graphs", a->no_cuda_graphs,
                "decode, --engine serve: run every step eagerly (default: replay CUDA graphs of decode steps where "
                "the backend records them; docs/serving.md)");
  cmd->add_flag("--no-expanded-prefill", a->no_expanded_prefill,
                "decode, --engine serve: prefill through the absorbed latent attention (default: prompts take the "
                "training attention on expanded keys and values; docs/serving.md)");
  cmd->add_option("--agreement-prompts", a->agreement_prompts,
                  "decode: greedy tokens of this many prompts compared with the model weights' (default with "
                  "--weights fp8: the largest decode batch)");
  cmd->add_option("--batch", a->batch, "train step: sequences per step (default: 4 on the CPU, 8 on CUDA)");
  cmd->add_option("--seq", a->seq,
                  "train step: sequence length (default: min(128, max_seq_len) on the CPU, max_seq_len on CUDA)");
  cmd->add_option("--steps", a->steps, "train step: timed steps (default: 3 on the CPU, 10 on CUDA)");
  cmd->add_option("--warmup", a->warmup, "train step: untimed steps first (default: 1 on the CPU, 3 on CUDA)");
  cmd->add_option("--decode-batch", a->decode_batches, "decode: batch sizes (default 1,8,64)")->delimiter(',');
  cmd->add_option("--prompt-len", a->prompt_len,
                  "decode: prompt tokens per sequence (default: 32 on the CPU, 512 on CUDA)");
  cmd->add_option("--new-tokens", a->new_tokens, "decode: steps after the prompt (default: 8 on the CPU, 64 on CUDA)");
  cmd->add_option("--repeats", a->repeats,
                  "decode: timed runs per batch size, median (default: 1 on the CPU, 3 on CUDA)");
  cmd->add_option("--peak-tflops", a->peak_tflops,
                  "train step: MFU denominator (default: 989 on CUDA, none on the CPU)");
  cmd->add_flag("--no-train", a->no_train, "skip the train step");
  cmd->add_flag("--no-decode", a->no_decode, "skip prefill and decode");
  cmd->add_flag("--no-verify", a->no_verify, "--checkpoint: read it without checking it against its manifest");
  cmd->add_option("--seed", a->seed, "weights (with --config) and random tokens (default 1234)");
  cmd->add_option("--report", a->report, "write the results as JSON to this file");
  cmd->callback([&run, a] { run = [a] { return run_bench(*a); }; });
}

}  // namespace diffmoe::cli
