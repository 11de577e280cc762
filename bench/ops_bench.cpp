// Op benchmarks on the CUDA backend at the bench preset's shapes (bench/README.md):
//   bench_ops [--case attention|elementwise|all]
// attention: the attention kernels' forward and backward times, and their results against each
// other (exit 1 when those differ beyond the bounds written in attention_bench.cpp); elementwise:
// the memory-bound ops' times and bandwidths. Needs a GPU (exit 2, naming why, without one).
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <memory>
#include <string>

#include "backend/backend_registry.h"
#include "backend/cuda/cuda_backend.h"
#include "ops_bench.h"

int main(int argc, char** argv) {
  CLI::App app{"CUDA op benchmarks at the bench preset's shapes"};
  std::string which = "all";
  app.add_option("--case", which, "attention, elementwise or all")
      ->check(CLI::IsMember({"attention", "elementwise", "all"}));
  CLI11_PARSE(app, argc, argv);
  try {
    const std::unique_ptr<diffmoe::Backend> be = diffmoe::make_backend("cuda");
    auto& cuda = dynamic_cast<diffmoe::CudaBackend&>(*be);
    int failures = 0;
    if (which == "elementwise" || which == "all") diffmoe::bench::bench_elementwise(cuda);
    if (which == "attention" || which == "all") failures += diffmoe::bench::bench_attention(cuda);
    if (failures > 0) fmt::print("bench_ops: {} result check(s) failed\n", failures);
    return failures == 0 ? 0 : 1;
  } catch (const diffmoe::Error& e) {
    fmt::print(stderr, "bench_ops: {}\n", e.what());
    return 2;
  }
}
