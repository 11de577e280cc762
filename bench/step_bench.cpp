// Training-step throughput of a preset on a backend: forward + backward (+ AdamW with --optim).
// Usage: bench_step --config configs/tiny.yaml [--device cpu|cuda] [--batch 16] [--seq 256]
//                   [--steps 5] [--warmup 1] [--optim] [--precision f32|bf16_gemm|fp8]
//                   [--recompute none|attention|moe|full] [--moment-dtype f32|bf16]
//                   [--data-parallel [--zero-stage 1|2]]
// Times whole steps on random tokens with the spec initialisation (the backend is synchronised
// around each step); prints the median step time, tokens/s, MFU by docs/model.md §9 (÷ 989 TFLOP/s) and
// the bytes of the model's arenas (parameters, gradients, activations, the bf16 weight copies;
// optimizer state with --optim; the backend's scratch buffers are not counted).
// --precision bf16_gemm (cuda only): the bf16 mode of docs/architecture.md (bf16 weight copies,
// bf16 tensor-core GEMMs and attention, f32 masters; Backend::set_gemm_precision, train.precision).
// --precision fp8 (cuda only): the bf16 mode plus the FP8 recipe for the attention and FFN Linears
// (docs/model.md §7; the routed experts run one FP8 GEMM per expert, not a grouped kernel).
// --recompute: activation recompute (train.recompute, model/recompute.h): the activation arena it
// plans is printed on its own line, to set against the step time of --recompute none.
// --moment-dtype: the AdamW moments' storage with --optim (optim.moment_dtype; docs/training.md).
// --data-parallel: the step through the trainer's distributed path (DataParallel; buckets of the
// trainer's default 40M elements); under mpirun or a torchrun-style launch (dist/launch.h) every
// rank runs it on its own micro-batch (one GPU each: cuda:<local rank>), rank 0 prints.
// --zero-stage 2 (with --data-parallel): ZeRO-2, the gradients in bucket slots reduce-scattered in
// the backward (parallel.zero_stage, docs/parallelism.md §4); with one rank nothing is data
// parallel and it changes nothing.
// CPU threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS as usual.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "backend/backend_registry.h"
#include "backend/cuda/op_profiler.h"
#include "core/rng.h"
#include "dist/device_world.h"
#include "dist/dist_context.h"
#include "dist/launch.h"
#include "dist/process_grid.h"
#include "model/model.h"
#include "model/parameters.h"
#include "train/data_parallel.h"
#include "train/memory_plan.h"
#include "train/optimizer.h"
#include "train/train_config.h"

using namespace diffmoe;

int main(int argc, char** argv) {
  CLI::App app{"training-step benchmark"};
  std::string config, device = "cpu", precision = "f32", recompute = "none", moment_dtype = "f32";
  bool with_optim = false, data_parallel = false;
  int64_t batch = 16, seq = 0;
  int steps = 5, warmup = 1, zero_stage = 1;
  app.add_option("--config", config)->required();
  app.add_option("--batch", batch);
  app.add_option("--seq", seq, "default: max_seq_len");
  app.add_option("--steps", steps);
  app.add_option("--warmup", warmup);
  app.add_option("--device", device, "cpu or cuda");
  app.add_flag("--optim", with_optim, "include the AdamW step (global-norm clip, bias update)");
  app.add_flag("--data-parallel", data_parallel,
               "run the step through the trainer's distributed path with one rank (DataParallel: bucket notices, "
               "gradient finish, global norm and counts, weight gather); needs --optim");
  app.add_option(
         "--precision", precision,
         "f32, bf16_gemm (cuda: GEMMs with bf16 inputs, f32 accumulation) or fp8 (cuda: bf16_gemm plus FP8 Linears)")
      ->check(CLI::IsMember({"f32", "bf16", "bf16_gemm", "fp8"}));
  app.add_option("--recompute", recompute, "activation recompute: none, attention, moe or full (train.recompute)")
      ->check(CLI::IsMember({"none", "attention", "moe", "full"}));
  app.add_option("--moment-dtype", moment_dtype, "the AdamW moments in f32 or bf16 with --optim (optim.moment_dtype)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--zero-stage", zero_stage,
                 "with --data-parallel: 1 (optimizer state sharded) or 2 (gradients too, in bucket slots)")
      ->check(CLI::IsMember({1, 2}));
  CLI11_PARSE(app, argc, argv);
  // Line-buffered, so a run stopped by a time limit still shows how far it got.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  try {
    const auto setup_start = std::chrono::steady_clock::now();
    const ModelConfig cfg = load_model_config(config);
    if (seq <= 0) seq = cfg.max_seq_len;
    DIFFMOE_CHECK(!data_parallel || with_optim, "--data-parallel needs --optim");
    DIFFMOE_CHECK(zero_stage == 1 || data_parallel, "--zero-stage {} needs --data-parallel", zero_stage);
    // The launch's ranks (one without a launcher); one GPU per rank.
    auto dist_ctx = dist::DistContext::init(data_parallel ? dist::detect_launch() : dist::Launch{});
    const int rank = dist_ctx->rank(), world_size = dist_ctx->world_size();
    if (device == "cuda" && dist_ctx->launch().local_world > 1)
      device = fmt::format("cuda:{}", dist_ctx->launch().local_rank);
    auto be = make_backend(device);
    DIFFMOE_CHECK(precision == "f32" || be->device() == Device::kCUDA,
                  "--precision {} needs --device cuda (the CPU backend is the reference, not a benchmark)", precision);
    const int64_t default_bucket = ParallelConfig{}.bucket_size;  // the trainer's default (parallel.bucket_size)
    Model m(cfg, *be, DType::kF32,
            ModelOptions{.precision = parse_precision(precision, "--precision"),
                         .parallel = {.dense_dp = world_size,
                                      .expert_dp = world_size,
                                      .bucket_elems = data_parallel ? default_bucket : 0,
                                      .zero_stage = zero_stage},
                         .recompute = parse_recompute(recompute, "--recompute")});
    m.init_weights(1234);
    m.set_batch_shape(batch, seq);
    std::unique_ptr<AdamW> opt;
    if (with_optim) {
      OptimConfig oc;
      oc.moment_dtype = moment_dtype;
      opt = std::make_unique<AdamW>(m, oc, OptimShard{.dense_rank = rank, .expert_rank = rank});
      opt->init_masters(1234);
    }
    // The distributed path: the world communicator the trainer uses (NCCL on several GPUs; for one
    // rank copies on the backend's stream), the grid, and DataParallel around the optimizer.
    std::unique_ptr<dist::DeviceWorld> world;
    std::unique_ptr<dist::ProcessGrid> grid;
    std::unique_ptr<DataParallel> dp;
    if (data_parallel) {
      world = std::make_unique<dist::DeviceWorld>(*dist_ctx, *be, dist_ctx->launch().local_rank);
      grid = std::make_unique<dist::ProcessGrid>(world->comm(), 1);
      dp = std::make_unique<DataParallel>(m, *opt, grid->world(), grid->dp());
    }
    fmt::print("set-up (weights{} initialised on the host, uploaded): {:.1f} s\n", with_optim ? ", masters" : "",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - setup_start).count());
    std::vector<int32_t> host_tok(static_cast<size_t>(batch * seq)), host_tgt(host_tok.size());
    for (size_t i = 0; i < host_tok.size(); ++i) {
      host_tok[i] = static_cast<int32_t>(uniform_at(7, 1, i) * static_cast<double>(cfg.vocab_size - 1));
      host_tgt[i] = static_cast<int32_t>(uniform_at(7, 2, i) * static_cast<double>(cfg.vocab_size - 1));
    }
    Arena io;
    io.add("tokens", Shape{batch, seq}, DType::kI32);
    io.add("targets", Shape{batch, seq}, DType::kI32);
    io.allocate(be->allocator());
    const Tensor tok = io.get("tokens"), tgt = io.get("targets");
    be->upload(tok, host_tok.data());
    be->upload(tgt, host_tgt.data());
    // DIFFMOE_CUDA_PROFILE=1 on --device cuda: the per-op table of the timed steps, printed last.
    auto* profiler = dynamic_cast<OpProfiler*>(be.get());
    if (profiler != nullptr && !profiler->profiling()) profiler = nullptr;
    std::vector<double> times, enqueue;  // enqueue: host time until the step's last op was issued
    // Warm-up: --warmup steps, then more while the backend still times its GEMM algorithms
    // (Backend::tuning: a shape run once per step needs as many steps as it has trials), at most
    // kMaxTuningSteps more: the timed steps measure the settled choice.
    constexpr int kMaxTuningSteps = 40;
    int warm = 0;
    const auto run_step = [&] {
      const auto t0 = std::chrono::steady_clock::now();
      m.zero_grads({});
      m.zero_expert_counts({});
      m.forward({}, tok, tgt);
      if (dp) dp->set_last_micro_batch(true);
      m.backward({}, 1.0);
      if (dp) {
        dp->finish_gradients({});
        dp->global_grad_sq({});
        dp->reduce_expert_counts({});
        opt->apply({}, 1e-4);
        dp->gather_weights({});
      } else if (opt) {
        opt->step({}, 1e-4);
      }
      const double de = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      be->synchronize({});
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return std::pair{dt, de};
    };
    be->synchronize({});
    for (; warm < warmup || (be->tuning() && warm < warmup + kMaxTuningSteps); ++warm) run_step();
    if (warm > warmup)
      fmt::print("warm-up: {} steps ({} more while the GEMM algorithms were timed{})\n", warm, warm - warmup,
                 be->tuning() ? "; still not settled" : "");
    if (profiler != nullptr) profiler->reset_profile();
    for (int s = 0; s < steps; ++s) {
      const auto [dt, de] = run_step();
      times.push_back(dt), enqueue.push_back(de);
    }
    std::sort(times.begin(), times.end());
    std::sort(enqueue.begin(), enqueue.end());
    const double med = times[times.size() / 2];
    const LossValues l = m.losses();
    const double tps = static_cast<double>(batch * seq) / med;
    const double flops = count_parameters(cfg, seq).flops_per_token;
    size_t copies_b = 0;  // the bf16 compute weights (the bf16 mode's weight copies)
    for (size_t g = 0; g < m.layout().groups().size(); ++g)
      if (m.layout().groups()[g].compute == DType::kBF16) copies_b += m.params().group_arena(g).bytes();
    const double copies = static_cast<double>(copies_b);
    const size_t grad_b = m.grads().bytes();  // full buffers, or ZeRO-2 slots
    const double bytes =
        static_cast<double>(m.params().bytes() + grad_b + m.acts().bytes() + (opt ? opt->state_bytes() : 0));
    constexpr double kGiB = 1024.0 * 1024 * 1024;
    if (rank != 0) return 0;
    fmt::print(
        "config {}  device {}  precision {}  recompute {}  batch {}  seq {}  tokens/step {}{}{}\n", config, device,
        precision, recompute, batch, seq, batch * seq,
        dp ? fmt::format("  (through DataParallel, world {}, ZeRO-{}; tokens/s per rank)", world_size, zero_stage)
           : std::string(),
        opt ? "  moments " + moment_dtype : std::string());
    fmt::print(
        "{} step: median {:.4f} s (min {:.4f}, max {:.4f}, {} steps)  ->  {:.0f} tokens/s, MFU {:.2f}% ({:.4f} "
        "GFLOP/token), "
        "arenas {:.2f} GiB (bf16 weight copies {:.2f} GiB of it; backend scratch not counted)  (loss {:.4f})\n",
        opt ? "fwd+bwd+adamw" : "fwd+bwd", med, times.front(), times.back(), times.size(), tps,
        100.0 * tps * flops / 989e12, flops / 1e9, bytes / kGiB, copies / kGiB, l.lm_loss);
    fmt::print("activation arena (recompute {}): {:.2f} GiB of the arenas\n", recompute,
               static_cast<double>(m.acts().bytes()) / kGiB);
    // The same arenas as `diffmoe plan` plans them (train/memory_plan.h), without allocating.
    const RankMemory planned = plan_rank(cfg,
                                         RunShape{.world = world_size,
                                                  .precision = parse_precision(precision, "--precision"),
                                                  .micro_batch = batch,
                                                  .seq = seq,
                                                  .bucket_elems = data_parallel ? default_bucket : 0,
                                                  .zero_stage = zero_stage,
                                                  .recompute = recompute,
                                                  .moment_dtype = moment_dtype},
                                         rank);
    uint64_t planned_b = 0;
    for (const MemoryItem& it : planned.items)
      if (!it.estimate && it.key != "token_buffers" &&
          (opt || (it.key != "optimizer_masters" && it.key != "optimizer_moments")))
        planned_b += it.bytes;
    fmt::print("arenas: measured {} bytes, planned by diffmoe plan {} bytes ({:.2f} GiB)\n",
               static_cast<uint64_t>(bytes), planned_b, static_cast<double>(planned_b) / kGiB);
    // Near the step time: the host (op validation, launches) bounds the step, not the device.
    fmt::print("host enqueue time: median {:.4f} s of the step's {:.4f} s\n", enqueue[enqueue.size() / 2], med);
    if (profiler != nullptr) {
      fmt::print("op profile of the {} timed steps (events add a little time to each op):\n", steps);
      profiler->print_profile();
    }
    return 0;
  } catch (const Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
