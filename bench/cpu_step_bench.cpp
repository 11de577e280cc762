// CPU forward+backward throughput of a preset (the number issue #2 asks for in bench/RESULTS.md).
// Usage: bench_cpu_step --config configs/tiny.yaml [--batch 16] [--seq 256] [--steps 5] [--warmup 1]
// Times whole forward+backward passes on random tokens with the spec initialisation; prints the
// median step time and tokens/s. Threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS as usual.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "model/model.h"

using namespace diffmoe;

int main(int argc, char** argv) {
  CLI::App app{"CPU forward+backward benchmark"};
  std::string config;
  int64_t batch = 16, seq = 0;
  int steps = 5, warmup = 1;
  app.add_option("--config", config)->required();
  app.add_option("--batch", batch);
  app.add_option("--seq", seq, "default: max_seq_len");
  app.add_option("--steps", steps);
  app.add_option("--warmup", warmup);
  CLI11_PARSE(app, argc, argv);
  try {
    const ModelConfig cfg = load_model_config(config);
    if (seq <= 0) seq = cfg.max_seq_len;
    CpuBackend be;
    Model m(cfg, be, DType::kF32);
    m.init_weights(1234);
    m.set_batch_shape(batch, seq);
    Arena io;
    io.add("tokens", Shape{batch, seq}, DType::kI32);
    io.add("targets", Shape{batch, seq}, DType::kI32);
    io.allocate(cpu_allocator());
    const Tensor tok = io.get("tokens"), tgt = io.get("targets");
    for (int64_t i = 0; i < batch * seq; ++i) {
      tok.ptr<int32_t>()[i] = static_cast<int32_t>(uniform_at(7, 1, static_cast<uint64_t>(i)) * static_cast<double>(cfg.vocab_size - 1));
      tgt.ptr<int32_t>()[i] = static_cast<int32_t>(uniform_at(7, 2, static_cast<uint64_t>(i)) * static_cast<double>(cfg.vocab_size - 1));
    }
    std::vector<double> times;
    for (int s = 0; s < warmup + steps; ++s) {
      const auto t0 = std::chrono::steady_clock::now();
      m.zero_grads({});
      m.forward({}, tok, tgt);
      m.backward({}, 1.0);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s >= warmup) times.push_back(dt);
    }
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    const LossValues l = m.losses();
    fmt::print("config {}  batch {}  seq {}  tokens/step {}\n", config, batch, seq, batch * seq);
    fmt::print("fwd+bwd step: median {:.3f} s (min {:.3f}, max {:.3f}, {} steps)  ->  {:.0f} tokens/s  (loss {:.4f})\n", med,
               times.front(), times.back(), times.size(), static_cast<double>(batch * seq) / med, l.lm_loss);
    return 0;
  } catch (const Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
