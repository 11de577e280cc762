// `diffmoe serve --checkpoint PATH [...]`: the OpenAI-compatible HTTP server (docs/serving.md).
// Loads the model and tokenizer, starts the scheduler's engine thread and the HTTP server, and runs
// until SIGINT or SIGTERM: then new requests get 503, requests in flight finish (streams included)
// for up to --shutdown-timeout seconds, the rest are cancelled, and the process exits 0.
#include <fmt/core.h>
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "backend/backend_registry.h"
#include "cli/commands.h"
#include "io/file_util.h"
#include "model/precision_plan.h"
#include "serve/http_server.h"
#include "serve/scheduler.h"
#include "train/checkpoint_reader.h"

namespace diffmoe::cli {

namespace {

struct ServeArgs {
  std::string checkpoint, tokenizer, device = "cpu", precision = "f32", weights = "model", host = "127.0.0.1",
                                     model_name = "diffmoe";
  std::string port_file;
  int port = 8000;
  int64_t max_batch = 16, max_context = 0, max_tokens = 4096, max_concurrency = 64, max_step_tokens = 0;
  int64_t prefill_chunk = 256, block_size = 16, cache_blocks = 0, max_waiting = 1024;
  size_t max_request_bytes = size_t{1} << 20;
  double shutdown_timeout = 30.0;
  bool no_verify = false, no_cuda_graphs = false, no_expanded_prefill = false;
};

int run_serve(const ServeArgs& a) {
  // SIGINT/SIGTERM go to one watcher thread (sigwait), never to a worker: block them before any
  // thread exists (OpenMP and BLAS pools start while the model loads). SIGUSR1 ends the watcher
  // when the server stops for another reason.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGUSR1);
  DIFFMOE_CHECK(pthread_sigmask(SIG_BLOCK, &signals, nullptr) == 0, "serve: cannot block SIGINT/SIGTERM");

  // Values the server would silently misread: a port past 65535 wraps to another port, a NaN
  // timeout is undefined as milliseconds, a zero limit refuses every request.
  DIFFMOE_CHECK(a.port >= 0 && a.port <= 65535, "--port: must be in [0, 65535] (0 = any free port), got {}", a.port);
  DIFFMOE_CHECK(std::isfinite(a.shutdown_timeout) && a.shutdown_timeout >= 0 && a.shutdown_timeout <= 1e9,
                "--shutdown-timeout: must be a finite number of seconds in [0, 1e9], got {}", a.shutdown_timeout);
  DIFFMOE_CHECK(a.max_tokens >= 1, "--max-tokens: must be >= 1, got {}", a.max_tokens);
  DIFFMOE_CHECK(a.max_request_bytes >= 1, "--max-request-bytes: must be >= 1, got {}", a.max_request_bytes);
  DIFFMOE_CHECK(a.max_waiting >= 1, "--max-waiting: must be >= 1, got {}", a.max_waiting);
  // Before the model loads; the file is replaced by rename, which would replace a device node or FIFO.
  if (!a.port_file.empty()) io::check_output_path(a.port_file, "port file");
  auto be = make_backend(a.device);
  const ModelOptions mo{.precision = parse_precision(a.precision, "--precision")};
  // The engine's own layers run the forward (bf16 or f32 GEMMs); FP8 serving is --weights fp8.
  DIFFMOE_CHECK(mo.precision != Precision::kFP8,
                "--precision fp8 is a training mode; serve with --precision bf16 --weights fp8");
  DIFFMOE_CHECK(a.weights == "model" || a.weights == "fp8", "--weights: '{}' is not one of model, fp8", a.weights);
  LoadedCheckpoint ck =
      open_trained_model(a.checkpoint, *be, DType::kF32,
                         OpenModelOptions{.tokenizer_path = a.tokenizer, .verify = !a.no_verify, .model = mo});
  DIFFMOE_CHECK(ck.tokenizer != nullptr, "{}: no tokenizer in the checkpoint; pass --tokenizer", a.checkpoint);
  const ModelConfig& c = ck.model->config();
  serve::SchedulerOptions so{.engine = {.max_batch = a.max_batch,
                                        .max_step_tokens = a.max_step_tokens,
                                        .max_context = a.max_context,
                                        .block_size = a.block_size,
                                        .n_blocks = a.cache_blocks,
                                        .fp8_weights = a.weights == "fp8",
                                        .cuda_graphs = !a.no_cuda_graphs,
                                        .expanded_prefill = !a.no_expanded_prefill},
                             .prefill_chunk = a.prefill_chunk,
                             .max_waiting = a.max_waiting};
  if (so.engine.max_step_tokens == 0) so.engine.max_step_tokens = a.max_batch + a.prefill_chunk;
  serve::Scheduler scheduler(*ck.model, *ck.tokenizer, so);
  serve::ServerOptions ho{.host = a.host,
                          .port = a.port,
                          .model_name = a.model_name,
                          .limits = {.max_tokens = a.max_tokens},
                          .max_request_bytes = a.max_request_bytes,
                          .max_concurrency = a.max_concurrency};
  serve::HttpServer server(scheduler, ho);
  const int port = server.bind();
  scheduler.start();
  if (!a.port_file.empty()) {  // for scripts that pass --port 0
    const std::string text = fmt::format("{}\n", port);
    io::check_output_path(a.port_file, "port file");
    const io::Failure f =
        io::replace_file(a.port_file, [&](int fd) { return io::write_all(fd, text.data(), text.size()); });
    DIFFMOE_CHECK(!f, "{}: cannot write the port file ({} failed: {})", a.port_file, f.step, std::strerror(f.err));
  }
  const serve::SchedulerStats st = scheduler.stats();
  const double cache_mib =
      static_cast<double>(st.total_blocks * st.block_size * c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim)) *
      static_cast<double>(dtype_size(ck.model->dtype())) / (1 << 20);
  fmt::print(
      stderr,
      "[serve] {}: {} layers, vocab {}, {}{} on {}, checkpoint step {}; cache {} blocks of {} tokens ({:.1f} MiB); "
      "listening on http://{}:{}\n",
      a.model_name, c.n_layers, c.vocab_size, a.precision, a.weights == "fp8" ? " with fp8 weights" : "", be->name(),
      ck.step, st.total_blocks, st.block_size, cache_mib, a.host, port);

  std::thread watcher([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig == SIGUSR1) return;
    fmt::print(stderr, "[serve] {}: finishing {} requests in flight (up to {:.0f} s), then stopping\n",
               sig == SIGINT ? "SIGINT" : "SIGTERM", server.in_flight(), a.shutdown_timeout);
    server.shutdown(std::chrono::milliseconds(static_cast<int64_t>(a.shutdown_timeout * 1000)));
  });
  server.serve();                                  // returns once the server stopped and its handlers returned
  pthread_kill(watcher.native_handle(), SIGUSR1);  // a no-op wake when the watcher already returned
  watcher.join();
  scheduler.stop(/*drain=*/false);
  const serve::SchedulerStats end = scheduler.stats();
  fmt::print(stderr, "[serve] stopped: {} requests finished, {} cancelled, {} tokens generated in {} steps\n",
             end.finished, end.cancelled, end.generated_tokens, end.steps);
  return 0;
}

}  // namespace

void add_serve_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("serve", "Serve a trained model over an OpenAI-compatible HTTP API (docs/serving.md)");
  auto a = std::make_shared<ServeArgs>();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint root, step directory or model .safetensors")->required();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer file (default: the checkpoint's copy)");
  cmd->add_option("--device", a->device, "cpu (default) or cuda");
  cmd->add_option("--precision", a->precision, "f32 (default) or bf16 (bf16 GEMM weights)");
  cmd->add_option("--weights", a->weights,
                  "model (default: the precision's weights) or fp8 (e4m3 dense Linear weights)");
  cmd->add_option("--host", a->host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--port", a->port, "port (default 8000; 0 = any free port, see --port-file)");
  cmd->add_option("--port-file", a->port_file, "write the port listened on to this file");
  cmd->add_option("--model-name", a->model_name, "the model id of /v1/models and requests (default diffmoe)");
  cmd->add_option("--max-batch", a->max_batch, "sequences decoded together (default 16)");
  cmd->add_option("--max-context", a->max_context, "prompt + completion tokens per request (default: max_seq_len)");
  cmd->add_option("--max-tokens", a->max_tokens, "largest max_tokens a request may ask for (default 4096)");
  cmd->add_option("--max-request-bytes", a->max_request_bytes, "largest request body (default 1 MiB)");
  cmd->add_option("--max-concurrency", a->max_concurrency, "generation requests in flight; more get 429 (default 64)");
  cmd->add_option("--max-waiting", a->max_waiting, "requests queued for the batch; more get 429 (default 1024)");
  cmd->add_option("--max-step-tokens", a->max_step_tokens,
                  "new positions per engine step (default max-batch + prefill-chunk)");
  cmd->add_option("--prefill-chunk", a->prefill_chunk, "prompt positions of one request per step (default 256)");
  cmd->add_option("--block-size", a->block_size, "cache positions per block (default 16)");
  cmd->add_option("--cache-blocks", a->cache_blocks, "cache blocks (default: max-batch full contexts)");
  cmd->add_option("--shutdown-timeout", a->shutdown_timeout,
                  "seconds to finish requests on SIGINT/SIGTERM (default 30)");
  cmd->add_flag("--no-verify", a->no_verify, "read the checkpoint without checking it against its manifest");
  cmd->add_flag("--no-cuda-graphs", a->no_cuda_graphs,
                "launch every op of decode steps instead of replaying recorded CUDA graphs (docs/serving.md)");
  cmd->add_flag("--no-expanded-prefill", a->no_expanded_prefill,
                "prefill prompts through the absorbed latent attention instead of the training attention on "
                "expanded keys and values (docs/serving.md)");
  cmd->callback([&run, a] { run = [a] { return run_serve(*a); }; });
}

}  // namespace diffmoe::cli
