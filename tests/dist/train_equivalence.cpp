// N ranks equal one rank with N-way gradient accumulation (docs/model.md §12), with real processes and the
// real communicators: run under mpirun or the torchrun-style launcher (dist_launch), every rank
// trains a micro model in f64 on the CPU for a few AdamW steps with ZeRO-1 data parallelism
// (DataParallel: bucketed reduce-scatter, global norm, global expert counts, all-gather) and,
// with an EP degree > 1, expert parallelism (the MoE layers' all-to-all dispatch and combine), on
// micro-batch step·W + rank of a fixed stream. Every rank also trains the reference itself: one
// model, no communication, accumulating all W micro-batches of each step. Checked per step: the
// global loss and gradient norm; at the end: every element this rank holds (its expert range
// included) against the reference's, and the balancing biases bitwise.
//
// Bound: f64 arithmetic where only the order of the sums differs (the reduce-scatter adds the ranks'
// gradients in another order than accumulation does, the all-to-all moves expert rows across
// ranks): relative differences stay near 1e-15 per operation; 1e-9 relative (against the tensor's
// norm for weights) leaves room for a few steps of AdamW and is far below the 1e-6 asked of it.
// With bf16 moments (optim.moment_dtype, both runs) the bound is the same: each moment is rounded
// to f32 and then bf16 from f64 values that differ by about 1e-15 relative, so the two runs store
// different bf16 values only where such a value lies that close to a rounding boundary (about
// 2^-45 per element and step); everywhere else the stored moments are equal.
//
// Usage: train_equivalence diff|plain EP [steps [f32|bf16]]   (prints "rank R of W (KIND): N checks passed")
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "dist/dist_context.h"
#include "dist/launch.h"
#include "dist/process_grid.h"
#include "model/micro_config.h"
#include "train/data_parallel.h"
#include "train/expert_exchange_comm.h"
#include "train/optimizer.h"

namespace diffmoe {
namespace {

constexpr double kTol = 1e-9;
constexpr double kLr = 1e-2;

struct Checks {
  int passed = 0, failed = 0;
  int rank = 0;
  void expect(bool ok, const std::string& what) {
    if (ok) {
      ++passed;
    } else {
      ++failed;
      std::fprintf(stderr, "rank %d: FAILED %s\n", rank, what.c_str());
    }
  }
};

double rel(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-300); }

std::vector<double> host(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.ptr<double>()[i];
  return v;
}

int run(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "diff";
  const int ep = argc > 2 ? std::stoi(argv[2]) : 1;
  const int steps = argc > 3 ? std::stoi(argv[3]) : 4;
  OptimConfig oc;
  oc.moment_dtype = argc > 4 ? argv[4] : "f32";
  const ModelConfig cfg = which == "plain" ? test::micro_plain_config() : test::micro_diff_config();
  const int64_t B = 2, T = cfg.max_seq_len;

  auto dist = dist::DistContext::init(dist::detect_launch());
  const int rank = dist->rank(), world = dist->world_size();
  Checks c;
  c.rank = rank;
  dist::ProcessGrid grid(dist->cpu_world(), ep);
  CommExpertExchange exchange(grid.ep());
  CpuBackend be;

  // The reference: one model, all W micro-batches of each step accumulated.
  Model ref(cfg, be, DType::kF64);
  ref.set_batch_shape(B, T);
  ref.init_weights(7);
  AdamW ref_opt(ref, oc);

  // This rank's part of the distributed run. Small buckets: several per group, several chunks.
  const ParallelLayoutOptions lay{
      .ep_size = ep, .ep_rank = grid.ep_rank(), .dense_dp = world, .expert_dp = grid.dp_size(), .bucket_elems = 97};
  Model m(cfg, be, DType::kF64, ModelOptions{.parallel = lay, .expert_exchange = &exchange});
  m.set_batch_shape(B, T);
  m.init_weights(7);
  AdamW opt(m, oc, OptimShard{.dense_rank = rank, .expert_rank = grid.dp_rank()});
  DataParallel dp(m, opt, grid.world(), grid.dp());

  const double scale = 1.0 / static_cast<double>(world);
  for (int s = 0; s < steps; ++s) {
    std::vector<test::Batch> batches;
    for (int w = 0; w < world; ++w) batches.push_back(test::make_batch(cfg, B, T, 1000 + 17 * (s * world + w), {3}));
    // Reference step.
    ref.zero_grads({});
    ref.zero_expert_counts({});
    double ref_loss = 0;
    for (int w = 0; w < world; ++w) {
      ref.forward({}, batches[static_cast<size_t>(w)].tokens, batches[static_cast<size_t>(w)].targets);
      ref.backward({}, scale);
      const LossValues l = ref.losses();
      ref_loss += (l.lm_loss + l.aux_loss) * scale;
    }
    ref_opt.compute_grad_sq({});
    const double ref_norm = ref_opt.grad_norm();
    ref_opt.apply({}, kLr);
    // Distributed step.
    m.zero_grads({});
    m.zero_expert_counts({});
    const test::Batch& mine = batches[static_cast<size_t>(rank)];
    m.forward({}, mine.tokens, mine.targets);
    dp.set_last_micro_batch(true);
    m.backward({}, scale);
    const LossValues l = m.losses();
    const double loss = dp.sum({}, {(l.lm_loss + l.aux_loss) * scale})[0];
    dp.finish_gradients({});
    dp.global_grad_sq({});
    const double norm = opt.grad_norm();
    dp.reduce_expert_counts({});
    opt.apply({}, kLr);
    dp.gather_weights({});
    c.expect(rel(loss, ref_loss) <= kTol, fmt::format("step {}: loss {:.17g} vs one rank {:.17g}", s, loss, ref_loss));
    c.expect(rel(norm, ref_norm) <= kTol,
             fmt::format("step {}: gradient norm {:.17g} vs one rank {:.17g}", s, norm, ref_norm));
  }
  // Every element this rank holds, against the reference's same global elements.
  for (const ParamLayout::Entry& e : m.layout().entries()) {
    const std::vector<double> got = host(m.params().get(e.spec.name)), all = host(ref.params().get(e.spec.name));
    double err2 = 0, ref2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double want = all[static_cast<size_t>(e.global_offset) + i];
      err2 += (got[i] - want) * (got[i] - want);
      ref2 += want * want;
    }
    const double err = std::sqrt(err2 / std::max(ref2, 1e-300));
    c.expect(err <= kTol, fmt::format("{}: weights differ by {:.3g} relative after {} steps", e.spec.name, err, steps));
  }
  for (const ParamLayout::Entry& e : m.layout().buffers())
    c.expect(host(m.params().get(e.spec.name)) == host(ref.params().get(e.spec.name)),
             e.spec.name + ": balancing bias differs");
  std::printf("rank %d of %d (%s): %d checks passed\n", rank, world, std::string(dist->cpu_world().kind()).c_str(),
              c.passed);
  if (oc.moment_dtype != "f32") std::printf("rank %d: moments in %s\n", rank, dtype_name(opt.moment_dtype()).data());
  std::fflush(stdout);
  dist->cpu_world().barrier({})->wait({});
  return c.failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace diffmoe

int main(int argc, char** argv) {
  try {
    return diffmoe::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
