// The op case table (tests/ops/op_cases/op_case.h) timed on one backend: every case's forward and
// backward, median time per call, and GB/s (bytes each step must move: every tensor it reads read
// once, every tensor it writes written once) or TFLOP/s (GEMMs, attention).
//   bench_op_cases [--backend cuda|cpu] [--set bench|test|all] [--filter REGEX] [--reps N] [--batch-ms MS]
// --set bench (default): the cases at the bench preset's shapes; test: the cases the op tests run
// (odd, small sizes: launch-overhead bound); all: both. --filter keeps the cases whose label
// "op/branch/shape" matches (ECMAScript regex, searched).
// Timing works on every backend: after warm-up calls (more while the backend still times its
// cuBLASLt candidates, Backend::tuning), each sample is a batch of calls between two synchronize()
// calls on the steady clock, the batch sized to take about --batch-ms, so the host's launch and
// synchronisation costs are spread over the batch; the median over --reps samples is printed.
// Inputs are the table's seeded non-zero values; outputs that accumulate keep accumulating over the
// repetitions (the time does not depend on the values). Exit 2 (naming why) when the backend cannot start.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "backend/backend_registry.h"
#include "op_case.h"

namespace {

using diffmoe::opcases::OpCase;
using diffmoe::opcases::OpInstance;
using diffmoe::opcases::Step;

// Median seconds per call of fn over `reps` batches of calls between synchronize()s.
double median_seconds(diffmoe::Backend& be, int reps, double batch_s, const std::function<void()>& fn) {
  using Clock = std::chrono::steady_clock;
  const auto timed = [&](int calls) {
    be.synchronize({});
    const auto t0 = Clock::now();
    for (int i = 0; i < calls; ++i) fn();
    be.synchronize({});
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  const double one = std::max(timed(1), 1e-7);
  const int calls = static_cast<int>(std::clamp(std::ceil(batch_s / one), 1.0, 10000.0));
  std::vector<double> per_call;
  for (int r = 0; r < reps; ++r) per_call.push_back(timed(calls) / calls);
  std::sort(per_call.begin(), per_call.end());
  return per_call[per_call.size() / 2];
}

void print_row(const OpCase& c, const char* step, double s, double bytes, double flops) {
  std::string rate = fmt::format("{:8.1f} GB/s", bytes / s * 1e-9);
  if (flops > 0.0) rate += fmt::format("  {:7.2f} TFLOP/s", flops / s * 1e-12);
  fmt::print("{:<86} {:<3} {:>11.2f} us  {}\n", c.label(), step, s * 1e6, rate);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"The op case table timed on one backend"};
  std::string backend = "cuda", set = "bench", filter;
  int reps = 15;
  double batch_ms = 5.0;
  app.add_option("--backend", backend, "cuda or cpu")->check(CLI::IsMember({"cuda", "cpu"}));
  app.add_option("--set", set, "bench (the bench preset's shapes), test (the op tests' cases) or all")
      ->check(CLI::IsMember({"bench", "test", "all"}));
  app.add_option("--filter", filter, "keep the cases whose label op/branch/shape matches this regex");
  app.add_option("--reps", reps, "timed batches per case and step (median)")->check(CLI::PositiveNumber);
  app.add_option("--batch-ms", batch_ms, "about how long one timed batch of calls runs")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    const std::unique_ptr<diffmoe::Backend> be = diffmoe::make_backend(backend);
    const std::regex keep(filter.empty() ? std::string(".") : filter);
    fmt::print("[op cases] backend {}, set {}, median of {} batches of ~{} ms\n", backend, set, reps, batch_ms);
    fmt::print("{:<86} {:<3} {:>14}  {}\n", "op/branch/shape", "", "time/call", "rate");
    int timed = 0;
    for (const OpCase& c : diffmoe::opcases::op_cases()) {
      if ((set == "bench" && !c.bench_only) || (set == "test" && c.bench_only)) continue;
      if (!std::regex_search(c.label(), keep)) continue;
      be->set_gemm_precision(c.precision);
      OpInstance inst(c, *be);
      inst.init();
      const auto fwd = [&] { inst.fwd(); };
      const auto bwd = [&] { inst.bwd(); };
      for (int warm = 0; warm < 2 || (be->tuning() && warm < 40); ++warm) {
        fwd();
        if (c.has_bwd()) bwd();
      }
      print_row(c, "fwd", median_seconds(*be, reps, batch_ms * 1e-3, fwd), c.bytes(Step::kFwd), c.fwd_flops);
      if (c.has_bwd())
        print_row(c, "bwd", median_seconds(*be, reps, batch_ms * 1e-3, bwd), c.bytes(Step::kBwd), c.bwd_flops);
      be->set_gemm_precision(diffmoe::GemmPrecision::kF32);
      ++timed;
    }
    if (timed == 0) {
      fmt::print(stderr, "bench_op_cases: no case of set '{}' matches '{}'\n", set, filter);
      return 1;
    }
    return 0;
  } catch (const diffmoe::Error& e) {
    fmt::print(stderr, "bench_op_cases: {}\n", e.what());
    return 2;
  }
}
