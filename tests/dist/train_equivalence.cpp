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
// train.recompute (model/recompute.h): with a mode other than none the distributed model recomputes
// in its backward, and a twin on the same ranks with recompute none runs the same steps: the two
// must agree bitwise (the losses, gradient norms and every weight): a recomputed tensor is
// recomputed by the forward's ops on the same inputs (with EP under `full`, the same dispatch
// again), so the same values enter the same sums in the same order. `skew` adds 1 to the balancing
// bias of EP rank 0's experts in every model: every token then picks them, rank 0 receives the
// group's EP·N·min(K, E/EP) rows and its expert buffers must grow past their balanced start
// (checked: "rank 0: expert buffers grew").
//
// Usage: train_equivalence diff|plain EP [steps [f32|bf16 [none|attention|moe|full [skew]]]]
//        (prints "rank R of W (KIND): N checks passed")
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <memory>
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

// The balancing bias of the first `experts` routed experts of every MoE layer += 1 (f64 models).
void skew_routing(Model& m, int64_t experts) {
  const ModelConfig& cfg = m.config();
  for (int64_t l = cfg.n_dense_layers; l < cfg.n_layers; ++l) {
    const Tensor b = m.params().get(fmt::format("layers.{}.ffn.gate.bias", l));
    DIFFMOE_CHECK(b.dtype == DType::kF64, "skew: f64 biases expected");
    for (int64_t e = 0; e < experts; ++e) b.ptr<double>()[e] += 1.0;
  }
}

int run(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "diff";
  const int ep = argc > 2 ? std::stoi(argv[2]) : 1;
  const int steps = argc > 3 ? std::stoi(argv[3]) : 4;
  OptimConfig oc;
  oc.moment_dtype = argc > 4 ? argv[4] : "f32";
  const Recompute recompute = parse_recompute(argc > 5 ? argv[5] : "none", "recompute");
  const bool skew = argc > 6 && std::string(argv[6]) == "skew";
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
  if (skew) skew_routing(ref, cfg.n_routed_experts / ep);
  AdamW ref_opt(ref, oc);

  // This rank's part of the distributed run. Small buckets: several per group, several chunks.
  const ParallelLayoutOptions lay{
      .ep_size = ep, .ep_rank = grid.ep_rank(), .dense_dp = world, .expert_dp = grid.dp_size(), .bucket_elems = 97};
  Model m(cfg, be, DType::kF64, ModelOptions{.parallel = lay, .expert_exchange = &exchange, .recompute = recompute});
  m.set_batch_shape(B, T);
  m.init_weights(7);
  if (skew) skew_routing(m, cfg.n_routed_experts / ep);
  AdamW opt(m, oc, OptimShard{.dense_rank = rank, .expert_rank = grid.dp_rank()});
  DataParallel dp(m, opt, grid.world(), grid.dp());
  const size_t buffers_at_start = m.expert_buffer_bytes();
  // With recompute: the twin without it on the same ranks (it runs each step after m's, so the
  // collectives of the two keep one order on every rank).
  std::unique_ptr<Model> twin;
  std::unique_ptr<AdamW> twin_opt;
  std::unique_ptr<DataParallel> twin_dp;
  if (recompute != Recompute::kNone) {
    twin = std::make_unique<Model>(cfg, be, DType::kF64, ModelOptions{.parallel = lay, .expert_exchange = &exchange});
    twin->set_batch_shape(B, T);
    twin->init_weights(7);
    if (skew) skew_routing(*twin, cfg.n_routed_experts / ep);
    twin_opt = std::make_unique<AdamW>(*twin, oc, OptimShard{.dense_rank = rank, .expert_rank = grid.dp_rank()});
    twin_dp = std::make_unique<DataParallel>(*twin, *twin_opt, grid.world(), grid.dp());
  }
  // One distributed step of `model` on this rank's micro-batch: the global loss and gradient norm.
  const auto dist_step = [&](Model& model, AdamW& o, DataParallel& d, const test::Batch& mine) {
    model.zero_grads({});
    model.zero_expert_counts({});
    model.forward({}, mine.tokens, mine.targets);
    d.set_last_micro_batch(true);
    model.backward({}, 1.0 / static_cast<double>(world));
    const LossValues l = model.losses();
    const double loss = d.sum({}, {(l.lm_loss + l.aux_loss) / static_cast<double>(world)})[0];
    d.finish_gradients({});
    d.global_grad_sq({});
    const double norm = o.grad_norm();
    d.reduce_expert_counts({});
    o.apply({}, kLr);
    d.gather_weights({});
    return std::pair<double, double>{loss, norm};
  };

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
    const test::Batch& mine = batches[static_cast<size_t>(rank)];
    const auto [loss, norm] = dist_step(m, opt, dp, mine);
    c.expect(rel(loss, ref_loss) <= kTol, fmt::format("step {}: loss {:.17g} vs one rank {:.17g}", s, loss, ref_loss));
    c.expect(rel(norm, ref_norm) <= kTol,
             fmt::format("step {}: gradient norm {:.17g} vs one rank {:.17g}", s, norm, ref_norm));
    if (twin) {
      const auto [loss0, norm0] = dist_step(*twin, *twin_opt, *twin_dp, mine);
      c.expect(loss == loss0, fmt::format("step {}: loss {:.17g} with recompute {} vs {:.17g} without", s, loss,
                                          recompute_name(recompute), loss0));
      c.expect(norm == norm0, fmt::format("step {}: gradient norm {:.17g} with recompute {} vs {:.17g} without", s,
                                          norm, recompute_name(recompute), norm0));
    }
  }
  if (twin)
    for (const ParamLayout::Entry& e : m.layout().entries())
      c.expect(host(m.params().get(e.spec.name)) == host(twin->params().get(e.spec.name)),
               fmt::format("{}: differs from recompute none after {} steps", e.spec.name, steps));
  if (m.expert_buffer_bytes() > buffers_at_start)
    std::printf("rank %d: expert buffers grew from %zu to %zu bytes\n", rank, buffers_at_start,
                m.expert_buffer_bytes());
  if (skew && rank == 0) c.expect(m.expert_buffer_bytes() > buffers_at_start, "skew: rank 0's expert buffers grew");
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
