// The decode engine on CUDA against the same engine on the CPU (skipped without a usable device;
// tools/gpu-check.sh-style runs set DIFFMOE_REQUIRE_GPU=1): the same weights on both backends, the
// same mixed batches step by step (prompt chunks with every row's logits beside decode rows,
// sequences joining late and released), every logit row compared; in f32, in the bf16 GEMM mode,
// and with FP8 weights (Hopper only; the rows padded to cuBLASLt's multiples of 8). Prompts take the
// expanded prefill (docs/serving.md "Expanded prefill") on both: on the serving tests' head dims
// through the simple f32 attention kernels, on wider ones through the flash (f32) and tensor-core
// (bf16 GEMM mode) kernels. And
// `diffmoe bench --engine serve` on CUDA (serve/bench_decode.h): timed, bounded and compared.
// CUDA graphs (docs/serving.md "CUDA graphs"): graph_test_util.h's scenario on the GPU — replayed pure decode steps
// give bitwise the logits of the same padded steps run eagerly, and an engine without graphs' logits up to summation
// order, in the bf16 GEMM mode with and without FP8 weights; the f32 mode runs without graphs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "backend/backend_registry.h"
#include "cuda_test_util.h"
#include "graph_test_util.h"
#include "model/micro_config.h"
#include "serve/bench_decode.h"
#include "serve/engine.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

struct Case {
  const char* name;
  Precision precision;
  bool fp8;
  double tol;  // norm-wise relative error per logit row: of the worst row, or of the median row with min_agreement
  const char* why;
  bool wide_heads = false;   // d_qk 32, value groups 32 wide: the flash and tensor-core attention kernels' shapes
  double min_agreement = 0;  // > 0: the median row within tol, and this share of rows with the same argmax
};

// The serving tests' model with heads the fused attention kernels cover (attention_ops.cu: d_qk 32, comps·d_v 32).
ModelConfig wide_head_config() {
  nlohmann::ordered_json j = test::serve_config().to_json();
  j["kv_lora_rank"] = 32;
  j["qk_nope_head_dim"] = 16;
  j["qk_rope_head_dim"] = 16;
  j["v_head_dim"] = 16;
  return ModelConfig::from_json(j, "serve_wide_heads");
}

void check_cuda_engine(const Case& c) {
  const ModelConfig cfg = c.wide_heads ? wide_head_config() : test::serve_config();
  auto cpu = make_backend("cpu");
  auto gpu = make_backend("cuda");
  Model ref(cfg, *cpu, DType::kF32, {.precision = c.precision});
  Model dev(cfg, *gpu, DType::kF32, {.precision = c.precision});
  diffmoe::test::randomize_for_test_on_host(ref, 13);
  diffmoe::test::randomize_for_test_on_host(dev, 13);
  const EngineOptions opt{.max_batch = 3, .max_step_tokens = 24, .block_size = 8, .fp8_weights = c.fp8};
  Engine a(ref, opt), b(dev, opt);
  std::vector<std::vector<int32_t>> prompts;
  for (uint64_t i = 0; i < 3; ++i) {
    std::vector<int32_t> t(static_cast<size_t>(9 + 5 * i));
    for (size_t j = 0; j < t.size(); ++j)
      t[j] = static_cast<int32_t>((j * 37 + i * 101 + 7) % static_cast<size_t>(cfg.vocab_size));
    prompts.push_back(t);
  }
  const int64_t V = cfg.vocab_size;
  std::vector<double> row_errors;
  int64_t same_argmax = 0;
  std::vector<int64_t> sa(3, -1), sb(3, -1);
  std::vector<int32_t> next(3, 0);
  for (int step = 0; step < 12; ++step) {
    std::vector<StepSequence> ba, bb;
    for (size_t i = 0; i < 3; ++i) {
      if (static_cast<int>(i) > step || sa[i] == -2) continue;  // sequence i joins at step i; -2: released
      if (sa[i] < 0) {
        sa[i] = a.add_sequence();
        sb[i] = b.add_sequence();
        ba.push_back({.seq = sa[i], .tokens = prompts[i], .logits = LogitRows::kAll});
        bb.push_back({.seq = sb[i], .tokens = prompts[i], .logits = LogitRows::kAll});
      } else {
        ba.push_back({.seq = sa[i], .tokens = std::span<const int32_t>(&next[i], 1)});
        bb.push_back({.seq = sb[i], .tokens = std::span<const int32_t>(&next[i], 1)});
      }
    }
    const StepOutput oa = a.step({}, ba), ob = b.step({}, bb);
    const std::vector<double> la = diffmoe::test::to_vector(oa.logits);
    std::vector<float> lb_host(static_cast<size_t>(ob.logits.numel()));
    gpu->download(lb_host.data(), ob.logits);
    const std::vector<double> lb(lb_host.begin(), lb_host.end());
    ASSERT_EQ(la.size(), lb.size());
    for (size_t r = 0; r * V < la.size(); ++r) {
      const auto x = la.begin() + static_cast<int64_t>(r) * V, y = lb.begin() + static_cast<int64_t>(r) * V;
      row_errors.push_back(diffmoe::test::rel_error(std::vector<double>(y, y + V), std::vector<double>(x, x + V)));
      same_argmax += std::max_element(x, x + V) - x == std::max_element(y, y + V) - y;
    }
    // The next tokens: the CPU's greedy choice, fed to both (teacher-forced, so a near-tie cannot
    // send the two engines down different paths).
    size_t k = 0;
    for (size_t i = 0; i < 3; ++i) {
      if (static_cast<int>(i) > step || sa[i] == -2) continue;
      const int64_t row =
          oa.first_row[k] + (ba[k].logits == LogitRows::kAll ? static_cast<int64_t>(ba[k].tokens.size()) - 1 : 0);
      const auto z = la.begin() + row * V;
      next[i] = static_cast<int32_t>(std::max_element(z, z + V) - z);
      ++k;
    }
    if (step == 8) {  // sequence 0 leaves; its blocks are reused by nobody here, but freed on both
      a.release(sa[0]);
      b.release(sb[0]);
      sa[0] = sb[0] = -2;
    }
  }
  std::sort(row_errors.begin(), row_errors.end());
  const double worst = row_errors.back(), median = row_errors[row_errors.size() / 2],
               p90 = row_errors[row_errors.size() * 9 / 10];
  const double agreement = static_cast<double>(same_argmax) / static_cast<double>(row_errors.size());
  std::printf(
      "[cuda-engine] %s: rel error of a logit row, CUDA vs CPU: median %.3e, 90th percentile %.3e, max %.3e over %zu "
      "rows; same argmax %.1f%% (tolerance %.0e on the %s: %s)\n",
      c.name, median, p90, worst, row_errors.size(), 100 * agreement, c.tol, c.min_agreement > 0 ? "median" : "max",
      c.why);
  if (c.min_agreement > 0) {
    EXPECT_LE(median, c.tol) << c.name;
    EXPECT_GE(agreement, c.min_agreement) << c.name;
  } else {
    EXPECT_LE(worst, c.tol) << c.name;
  }
  EXPECT_EQ(b.cache().free_blocks(), a.cache().free_blocks());
  EXPECT_TRUE(b.expanded_prefill_enabled()) << b.expanded_prefill_error();
  EXPECT_EQ(b.expanded_rows(), a.expanded_rows());
  EXPECT_EQ(b.expanded_rows(), 9 + 14 + 19) << "every prompt's first chunk took the expanded prefill";
}

TEST(CudaEngine, MatchesCpuEngine) {
  DIFFMOE_REQUIRE_CUDA();
  // f32: cuBLAS SGEMM and the paged kernel sum in other orders than OpenBLAS and the CPU loops;
  // two layers of O(1) activations, ~1e-6 relative per op: 1e-4 per row (as tests/model's f32 checks).
  check_cuda_engine({"f32", Precision::kF32, false, 1e-4, "f32 sums in other orders"});
  // bf16 GEMM mode: both sides round the same operands to bf16; the products are then summed in
  // f32 in other orders (tensor cores vs cblas on rounded copies): 1e-3.
  check_cuda_engine({"bf16", Precision::kBF16, false, 1e-3, "f32 sums of the same bf16 products"});
}

// The expanded prefill through the fused kernels: f32 the flash kernels (their own summation order, 1e-4 as above).
// The bf16 GEMM mode the tensor-core kernels, which round q, k, v and the probabilities P to bf16 (u = 2^-9 each,
// op_args.h AttentionFwdArgs) where the CPU attends in f32: ~u relative per score and output, through two layers
// to the logits: 1e-2 for the median row (the numerics policy's bf16 bound). Not for every row: a MoE router near a
// tie can pick another expert for one of them (H100: median 4.6e-3, 90th percentile 9.6e-3, one row at 0.36, every
// row's argmax the same), so also 95% of the rows with the CPU's argmax; a wrong λ or row moves every row by O(1).
TEST(CudaEngine, ExpandedPrefillFusedKernelsMatchCpuEngine) {
  DIFFMOE_REQUIRE_CUDA();
  check_cuda_engine({"f32 wide heads", Precision::kF32, false, 1e-4, "f32 sums in other orders", true});
  check_cuda_engine(
      {"bf16 wide heads", Precision::kBF16, false, 1e-2, "bf16 q, k, v, P in the attention; routing ties", true, 0.95});
}

TEST(CudaEngine, Fp8WeightsMatchCpuEngine) {
  DIFFMOE_REQUIRE_CUDA();
  // Quantisation is bitwise the same on both backends (tests/ops/cuda_fp8_quant.cpp), but cuBLASLt's FP8 GEMM is
  // not exact in f32: against the CPU's exact dequantised products it is ~4e-4 off (cuda_fp8_gemm.cpp's cases,
  // H100), as Hopper's FP8 tensor cores keep fewer accumulator bits. The next Linear's act_quant then rounds
  // some activations to the neighbouring e4m3 code (2^-4 apart), and a router near a tie picks another expert:
  // a few rows move by as much as FP8 itself moves them from f32 (~1e-1, tests/serve/test_engine.cpp). So the
  // median row within 2e-2 and 85% of rows with the same argmax; a wrong scale or block layout moves every
  // row by O(1) and leaves the argmax near chance (1/300).
  try {
    check_cuda_engine({"fp8 weights", Precision::kF32, true, 2e-2,
                       "cuBLASLt's FP8 accumulation, e4m3 codes and routing ties", false, 0.85});
  } catch (const Error& e) {
    if (std::string(e.what()).find("runs on compute capability 9.x") == std::string::npos) throw;
    GTEST_SKIP() << e.what();
  }
}

// The serving engine as the bench's decode engine on CUDA, in the bf16 GEMM mode: FP8 weights where
// the GPU has FP8 GEMMs (compute capability 9.x), else the model weights; the reference engine on
// the model weights. Every measurement is there and finite; the model weights against themselves
// agree exactly (the same kernels on the same inputs).
TEST(CudaEngine, BenchDecodeEngineRuns) {
  DIFFMOE_REQUIRE_CUDA();
  auto gpu = make_backend("cuda");
  Model m(test::serve_config(), *gpu, DType::kF32, {.precision = Precision::kBF16});
  diffmoe::test::randomize_for_test_on_host(m, 13);
  const auto run = [&](bool fp8) {
    const BenchEngineOptions eo{.fp8_weights = fp8};
    BenchOptions o;
    o.train = false;
    o.decode_batches = {1, 8};
    o.prompt_len = 12;
    o.new_tokens = 6;
    o.repeats = 2;
    o.copy_bytes = 64 << 20;
    o.decode_engine = [eo](Model& mm, const DecodeCase& c) { return time_engine_decode(mm, c, eo); };
    o.engine_stored_bytes = engine_stored_bytes(m, eo);
    o.reference_engine = [](Model& mm, const DecodeCase& c) { return time_engine_decode(mm, c, {}); };
    return run_benchmark(m, o);
  };
  BenchReport r;
  bool fp8 = true;
  try {
    r = run(true);
  } catch (const Error& e) {
    if (std::string(e.what()).find("runs on compute capability 9.x") == std::string::npos) throw;
    fp8 = false;
    r = run(false);
  }
  ASSERT_TRUE(r.copy.has_value());
  EXPECT_GT(r.copy->bytes_per_s, 1e9) << "a device copy";
  ASSERT_EQ(r.decode.size(), 2u);
  for (const DecodeBench& d : r.decode) {
    EXPECT_GT(d.decode_tokens_per_s, 0);
    EXPECT_TRUE(d.experts_counted);
    EXPECT_GT(d.bound_ms_per_step, 0);
    EXPECT_TRUE(std::isfinite(d.fraction_of_bound) && d.fraction_of_bound > 0);
    std::printf("[cuda-engine] bench decode batch %lld (%s weights): %.3f ms/step, bound %.4f ms, %.1f%%\n",
                static_cast<long long>(d.c.batch), fp8 ? "fp8" : "bf16", d.ms_per_step, d.bound_ms_per_step,
                100 * d.fraction_of_bound);
  }
  ASSERT_TRUE(r.agreement.has_value());
  EXPECT_EQ(r.agreement->prompts, 8);
  EXPECT_GE(r.agreement->token_agreement, 0.0);
  EXPECT_LE(r.agreement->token_agreement, 1.0);
  if (!fp8) {
    EXPECT_EQ(r.agreement->token_agreement, 1.0);
  }
}

// Sets an environment variable for a scope (the backend reads DIFFMOE_GEMM_AUTOTUNE at construction).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

struct GraphCase {
  const char* name;
  Precision precision;
  bool fp8;
  bool graphs;  // whether the backend records in this mode
};

// Three engines on one model and backend (graph_test_util.h): g with graphs, e with the same padded steps eager
// (max_graphs = 0), o without graphs. The GEMM algorithms are fixed (DIFFMOE_GEMM_AUTOTUNE=0), so g and e run the same
// kernels on the same shapes: bitwise equal. e and o differ in the GEMMs' row counts, which may change cuBLASLt's
// algorithm (another f32 summation order): 1e-4 per row, as the f32 engine check above.
void check_graph_engine(const GraphCase& c) {
  const ScopedEnv fixed("DIFFMOE_GEMM_AUTOTUNE", "0");
  auto gpu = make_backend("cuda");
  Model dev(test::serve_config(), *gpu, DType::kF32, {.precision = c.precision});
  diffmoe::test::randomize_for_test_on_host(dev, 31);
  const EngineOptions opt{
      .max_batch = 8, .max_step_tokens = 24, .block_size = 4, .fp8_weights = c.fp8, .graph_warmup_steps = 1};
  EngineOptions eager = opt, off = opt;
  eager.max_graphs = 0;
  off.cuda_graphs = false;
  Engine g(dev, opt), e(dev, eager), o(dev, off);
  ASSERT_EQ(g.graphs_enabled(), c.graphs) << c.name;
  ASSERT_FALSE(o.graphs_enabled());
  const test::GraphScenario r = test::run_graph_scenario(g, e, o);
  const GraphStats& s = g.graph_stats();
  std::printf(
      "[cuda-engine graphs] %s: %lld steps, %lld pure decode in %zu buckets; g vs e %lld of %lld rows differ; g vs o "
      "%.3e; captures %lld, replays %lld, eager padded %lld, dropped %lld%s%s\n",
      c.name, static_cast<long long>(r.steps), static_cast<long long>(r.pure_steps), r.buckets.size(),
      static_cast<long long>(r.mismatched_rows), static_cast<long long>(r.rows), r.worst_vs_unpadded,
      static_cast<long long>(s.captures), static_cast<long long>(s.replays), static_cast<long long>(s.eager_padded),
      static_cast<long long>(s.dropped), g.graph_error().empty() ? "" : "; error: ", g.graph_error().c_str());
  EXPECT_EQ(r.buckets, (std::set<int64_t>{1, 2, 4, 8})) << "the scenario covers every bucket";
  EXPECT_EQ(r.mismatched_rows, 0) << c.name << ": first at " << r.first_mismatch;
  EXPECT_LE(r.worst_vs_unpadded, c.fp8 ? 1e-2 : 1e-4) << c.name;
  EXPECT_TRUE(g.graph_error().empty()) << g.graph_error();
  if (c.graphs) {
    // Every bucket recorded (again after a workspace move), and most pure decode steps replayed.
    EXPECT_GE(s.captures, static_cast<int64_t>(r.buckets.size()));
    EXPECT_EQ(s.captures, static_cast<int64_t>(r.buckets.size()) + s.dropped);
    EXPECT_EQ(s.replays + s.eager_padded, r.pure_steps);
    EXPECT_GE(s.replays, r.pure_steps / 2);
  } else {
    EXPECT_EQ(s.captures + s.replays + s.eager_padded, 0);
  }
  EXPECT_EQ(e.graph_stats().captures, 0);
  EXPECT_EQ(g.cache().free_blocks(), g.cache().total_blocks());
}

TEST(CudaEngineGraphs, ReplayMatchesEagerBf16) {
  DIFFMOE_REQUIRE_CUDA();
  check_graph_engine({"bf16", Precision::kBF16, false, true});
}

TEST(CudaEngineGraphs, ReplayMatchesEagerFp8Weights) {
  DIFFMOE_REQUIRE_CUDA();
  try {
    check_graph_engine({"bf16 + fp8 weights", Precision::kBF16, true, true});
  } catch (const Error& e) {
    if (std::string(e.what()).find("runs on compute capability 9.x") == std::string::npos) throw;
    GTEST_SKIP() << e.what();
  }
}

// The f32 mode's grouped GEMMs read their offsets to the host (gemm_ops.cu): no graphs, every step eager, unpadded.
TEST(CudaEngineGraphs, F32ModeRunsEagerly) {
  DIFFMOE_REQUIRE_CUDA();
  check_graph_engine({"f32", Precision::kF32, false, false});
}

// With cuBLASLt timing its algorithms (the default), graphs wait for graph_warmup_steps eager steps of a bucket while
// the backend tunes; a replay then runs the algorithms chosen by then, so it is compared with a tolerance only.
TEST(CudaEngineGraphs, AutotuneWarmupThenReplays) {
  DIFFMOE_REQUIRE_CUDA();
  const ScopedEnv tuned("DIFFMOE_GEMM_AUTOTUNE", "1");
  auto gpu = make_backend("cuda");
  Model dev(test::serve_config(), *gpu, DType::kF32, {.precision = Precision::kBF16});
  diffmoe::test::randomize_for_test_on_host(dev, 32);
  const EngineOptions opt{.max_batch = 8, .max_step_tokens = 24, .block_size = 4, .graph_warmup_steps = 4};
  EngineOptions eager = opt, off = opt;
  eager.max_graphs = 0;
  off.cuda_graphs = false;
  Engine g(dev, opt), e(dev, eager), o(dev, off);
  ASSERT_TRUE(g.graphs_enabled());
  const test::GraphScenario r = test::run_graph_scenario(g, e, o);
  const GraphStats& s = g.graph_stats();
  std::printf("[cuda-engine graphs] autotune: g vs o %.3e; captures %lld, replays %lld, eager padded %lld\n",
              r.worst_vs_unpadded, static_cast<long long>(s.captures), static_cast<long long>(s.replays),
              static_cast<long long>(s.eager_padded));
  EXPECT_LE(r.worst_vs_unpadded, 1e-4);
  EXPECT_GE(s.captures, 1);
  EXPECT_GE(s.replays, 1);
  EXPECT_EQ(s.replays + s.eager_padded, r.pure_steps);
  EXPECT_TRUE(g.graph_error().empty()) << g.graph_error();
}

}  // namespace
}  // namespace diffmoe::serve
