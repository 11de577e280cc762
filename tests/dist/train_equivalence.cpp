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
// ZeRO-2 (zero_stage 2): the gradients of every data-parallel group live in reused bucket slots and
// are reduce-scattered in every backward (accumulating into the reduced chunks); the same bound
// holds against one rank, and the ranks also run ZeRO-1 on the same micro-batches, which ZeRO-2
// must equal (gradient norms per step, every weight at the end) within it. With grad_accum > 1
// each rank takes micro-batches a·W + rank, a < grad_accum, as the trainer does. A clip below the
// gradient norms (checked) makes global-norm clipping active.
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
// Usage: train_equivalence diff|plain EP [steps [f32|bf16 [OPTION...]]]
//   OPTION: zero=1|2 (ZeRO stage), accum=N (micro-batches per rank and step), clip=X (global-norm
//   clip), recompute=none|attention|moe|full, skew
//   (prints "rank R of W (KIND): N checks passed")
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
#include "model/recompute.h"
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

// One rank's part of a distributed run: the model, the optimizer, data parallelism.
struct DistRun {
  std::unique_ptr<Model> m;
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<DataParallel> dp;
};

int run(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "diff";
  const int ep = argc > 2 ? std::stoi(argv[2]) : 1;
  const int steps = argc > 3 ? std::stoi(argv[3]) : 4;
  OptimConfig oc;
  oc.moment_dtype = argc > 4 ? argv[4] : "f32";
  int zero_stage = 1, accum = 1;  // accum: micro-batches per rank and step
  bool clip = false, skew = false;
  Recompute recompute = Recompute::kNone;
  for (int i = 5; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq), value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (key == "zero") {
      zero_stage = std::stoi(value);
    } else if (key == "accum") {
      accum = std::stoi(value);
    } else if (key == "clip") {  // a clip below every step's gradient norm (checked below): clipping is active
      oc.grad_clip = std::stod(value);
      clip = true;
    } else if (key == "recompute") {
      recompute = parse_recompute(value, "recompute");
    } else if (key == "skew") {
      skew = true;
    } else {
      DIFFMOE_FAIL("train_equivalence: unknown option '{}'", arg);
    }
  }
  const ModelConfig cfg = which == "plain" ? test::micro_plain_config() : test::micro_diff_config();
  const int64_t B = 2, T = cfg.max_seq_len;

  auto dist = dist::DistContext::init(dist::detect_launch());
  const int rank = dist->rank(), world = dist->world_size();
  Checks c;
  c.rank = rank;
  dist::ProcessGrid grid(dist->cpu_world(), ep);
  CommExpertExchange exchange(grid.ep());
  CpuBackend be;

  // The reference: one model, all W·accum micro-batches of each step accumulated.
  Model ref(cfg, be, DType::kF64);
  ref.set_batch_shape(B, T);
  ref.init_weights(7);
  if (skew) skew_routing(ref, cfg.n_routed_experts / ep);
  AdamW ref_opt(ref, oc);

  // This rank's part of the distributed run. Small buckets: several per group, several chunks (with
  // ZeRO-2: several slots, each reused by several buckets). With ZeRO-2 the same ranks also run
  // ZeRO-1, which the ZeRO-2 run must equal too; with recompute, the same run without it (bitwise).
  auto make = [&](int stage, Recompute rc) {
    const ParallelLayoutOptions lay{.ep_size = ep,
                                    .ep_rank = grid.ep_rank(),
                                    .dense_dp = world,
                                    .expert_dp = grid.dp_size(),
                                    .bucket_elems = 97,
                                    .zero_stage = stage};
    DistRun r;
    r.m = std::make_unique<Model>(cfg, be, DType::kF64,
                                  ModelOptions{.parallel = lay, .expert_exchange = &exchange, .recompute = rc});
    r.m->set_batch_shape(B, T);
    r.m->init_weights(7);
    if (skew) skew_routing(*r.m, cfg.n_routed_experts / ep);
    r.opt = std::make_unique<AdamW>(*r.m, oc, OptimShard{.dense_rank = rank, .expert_rank = grid.dp_rank()});
    r.dp = std::make_unique<DataParallel>(*r.m, *r.opt, grid.world(), grid.dp());
    return r;
  };
  DistRun main_run = make(zero_stage, recompute);
  const size_t buffers_at_start = main_run.m->expert_buffer_bytes();
  // The twins run each step after main_run's, so the collectives of all keep one order on every rank.
  DistRun stage1, no_recompute;
  if (zero_stage == 2) stage1 = make(1, recompute);
  if (recompute != Recompute::kNone) no_recompute = make(zero_stage, Recompute::kNone);
  if (zero_stage == 2) {
    int slotted = 0;
    for (const ParamLayout::Group& g : main_run.m->layout().groups()) slotted += g.slotted() ? 1 : 0;
    c.expect(slotted > 0, "zero stage 2: no group has gradient slots");
    if (world > 1) {  // a slotted group's gradient exists only while the backward writes it
      bool refused = false;
      for (const ParamLayout::Entry& e : main_run.m->layout().entries()) {
        if (!main_run.m->layout().groups()[e.group].slotted()) continue;
        try {
          main_run.m->grads().get(e.spec.name);
        } catch (const Error&) {
          refused = true;
        }
        break;
      }
      c.expect(refused, "zero stage 2: a slotted gradient read outside the backward did not throw");
    }
  }

  // One step of a distributed run on this rank's micro-batches a·W + rank (as the trainer takes them).
  const double scale = 1.0 / static_cast<double>(world * accum);
  auto dist_step = [&](DistRun& r, const std::vector<test::Batch>& batches, double* loss, double* norm) {
    r.m->zero_grads({});
    r.m->zero_expert_counts({});
    double local = 0;
    for (int a = 0; a < accum; ++a) {
      const test::Batch& mine = batches[static_cast<size_t>(a * world + rank)];
      r.m->forward({}, mine.tokens, mine.targets);
      r.dp->set_last_micro_batch(a + 1 == accum);
      r.m->backward({}, scale);
      const LossValues l = r.m->losses();
      local += (l.lm_loss + l.aux_loss) * scale;
    }
    *loss = r.dp->sum({}, {local})[0];
    r.dp->finish_gradients({});
    r.dp->global_grad_sq({});
    *norm = r.opt->grad_norm();
    r.dp->reduce_expert_counts({});
    r.opt->apply({}, kLr);
    r.dp->gather_weights({});
  };

  for (int s = 0; s < steps; ++s) {
    std::vector<test::Batch> batches;
    for (int w = 0; w < world * accum; ++w)
      batches.push_back(test::make_batch(cfg, B, T, 1000 + 17 * (s * world * accum + w), {3}));
    // Reference step.
    ref.zero_grads({});
    ref.zero_expert_counts({});
    double ref_loss = 0;
    for (const test::Batch& b : batches) {
      ref.forward({}, b.tokens, b.targets);
      ref.backward({}, scale);
      const LossValues l = ref.losses();
      ref_loss += (l.lm_loss + l.aux_loss) * scale;
    }
    ref_opt.compute_grad_sq({});
    const double ref_norm = ref_opt.grad_norm();
    ref_opt.apply({}, kLr);
    if (clip)
      c.expect(ref_norm > oc.grad_clip,
               fmt::format("step {}: gradient norm {:.6g} does not exceed the clip {}: clipping is not tested", s,
                           ref_norm, oc.grad_clip));
    // Distributed step(s).
    double loss = 0, norm = 0;
    dist_step(main_run, batches, &loss, &norm);
    c.expect(rel(loss, ref_loss) <= kTol, fmt::format("step {}: loss {:.17g} vs one rank {:.17g}", s, loss, ref_loss));
    c.expect(rel(norm, ref_norm) <= kTol,
             fmt::format("step {}: gradient norm {:.17g} vs one rank {:.17g}", s, norm, ref_norm));
    if (stage1.m) {
      double loss1 = 0, norm1 = 0;
      dist_step(stage1, batches, &loss1, &norm1);
      c.expect(rel(norm, norm1) <= kTol,
               fmt::format("step {}: gradient norm {:.17g} (ZeRO-2) vs ZeRO-1 {:.17g}", s, norm, norm1));
    }
    if (no_recompute.m) {
      double loss0 = 0, norm0 = 0;
      dist_step(no_recompute, batches, &loss0, &norm0);
      c.expect(loss == loss0, fmt::format("step {}: loss {:.17g} with recompute {} vs {:.17g} without", s, loss,
                                          recompute_name(recompute), loss0));
      c.expect(norm == norm0, fmt::format("step {}: gradient norm {:.17g} with recompute {} vs {:.17g} without", s,
                                          norm, recompute_name(recompute), norm0));
    }
  }
  if (no_recompute.m)
    for (const ParamLayout::Entry& e : main_run.m->layout().entries())
      c.expect(host(main_run.m->params().get(e.spec.name)) == host(no_recompute.m->params().get(e.spec.name)),
               fmt::format("{}: differs from recompute none after {} steps", e.spec.name, steps));
  if (main_run.m->expert_buffer_bytes() > buffers_at_start)
    std::printf("rank %d: expert buffers grew from %zu to %zu bytes\n", rank, buffers_at_start,
                main_run.m->expert_buffer_bytes());
  if (skew && rank == 0)
    c.expect(main_run.m->expert_buffer_bytes() > buffers_at_start, "skew: rank 0's expert buffers grew");
  // Every element this rank holds, against the reference's same global elements (and ZeRO-1's).
  auto compare = [&](const Model& a, const Model& want_model, bool local, const std::string& against) {
    for (const ParamLayout::Entry& e : a.layout().entries()) {
      const std::vector<double> got = host(a.params().get(e.spec.name)),
                                all = host(want_model.params().get(e.spec.name));
      double err2 = 0, ref2 = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double want = all[(local ? 0 : static_cast<size_t>(e.global_offset)) + i];
        err2 += (got[i] - want) * (got[i] - want);
        ref2 += want * want;
      }
      const double err = std::sqrt(err2 / std::max(ref2, 1e-300));
      c.expect(err <= kTol, fmt::format("{}: weights differ from {} by {:.3g} relative after {} steps", e.spec.name,
                                        against, err, steps));
    }
    for (const ParamLayout::Entry& e : a.layout().buffers())
      c.expect(host(a.params().get(e.spec.name)) == host(want_model.params().get(e.spec.name)),
               e.spec.name + ": balancing bias differs from " + against);
  };
  compare(*main_run.m, ref, false, "one rank");
  if (stage1.m) compare(*main_run.m, *stage1.m, true, "ZeRO-1 on the same ranks");
  std::printf("rank %d of %d (%s): %d checks passed\n", rank, world, std::string(dist->cpu_world().kind()).c_str(),
              c.passed);
  if (oc.moment_dtype != "f32")
    std::printf("rank %d: moments in %s\n", rank, dtype_name(main_run.opt->moment_dtype()).data());
  if (zero_stage == 2) std::printf("rank %d: zero stage 2, %d micro-batches per step\n", rank, accum);
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
