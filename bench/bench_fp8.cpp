// FP8 op benchmark on the CUDA backend (op_args.h's FP8 section): act_quant's bandwidth and
// fp8_gemm's TFLOP/s at a preset's dense Linear shapes, beside the bf16 GEMM mode's cuBLASLt GEMM
// (Backend::gemm with bf16 operands) at the same shapes; then fp8_grouped_gemm at the routed experts'
// shapes beside the bf16 grouped kernel (bench_grouped).
// Usage: bench_fp8 [--config configs/bench.yaml] [--tokens 16384] [--iters 20] [--skip-quant]
//                  [--only quant,dense,grouped]  (the tables to run; default all)
//   bench preset: tokens = 8 sequences × 2048; seed-20b (configs/seed-20b.yaml): e.g. --tokens 8192.
// Shapes: every dense Linear of a layer (docs/model.md §2, §4: wq_a, wq_b, wkv_a, wkv_b, wo; the dense MLP's
// w1/w3 and w2; the shared experts' w1/w3 and w2, n_shared·moe_inter wide), each as its three GEMMs
// (docs/derivations.md §6.1): Fprop y = x Wᵀ [T, out, in], Dgrad dx = dy W [T, in, out], Wgrad dW += dyᵀx
// [out, in, T] (f32 output, beta = 1; the others write bf16). FLOPs 2·M·N·K. The bf16 column runs the
// same GEMM as the bf16 GEMM mode does (bf16 operand tensors, f32 accumulation, same outputs). The
// FP8 column times fp8_gemm alone; the act_quant rows give the quantisation's cost (both copies of x
// in one pass: what the recipe's backward needs). Warm-up runs until cuBLASLt's algorithm timing has
// settled (Backend::tuning); times are host wall-clock around `iters` calls between two
// synchronisations. Needs a 9.x device for fp8_gemm (cuBLASLt's block-scaled FP8 modes).
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "backend/backend_registry.h"
#include "core/arena.h"
#include "core/rng.h"
#include "model/config.h"

using namespace diffmoe;

namespace {

struct Linear {
  std::string name;
  int64_t in, out;
};

// The dense Linears of one layer of the preset (MLA projections, dense MLP, shared experts).
std::vector<Linear> linears_of(const ModelConfig& c) {
  std::vector<Linear> l;
  if (c.q_lora_rank > 0) {
    l.push_back({"wq_a", c.dim, c.q_lora_rank});
    l.push_back({"wq_b", c.q_lora_rank, c.n_heads * c.d_qk()});
  } else {
    l.push_back({"wq", c.dim, c.n_heads * c.d_qk()});
  }
  l.push_back({"wkv_a", c.dim, c.kv_lora_rank + c.qk_rope_head_dim});
  l.push_back({"wkv_b", c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim)});
  l.push_back({"wo", c.n_heads * c.v_head_dim, c.dim});
  l.push_back({"mlp.w1/w3", c.dim, c.inter_dim});
  l.push_back({"mlp.w2", c.inter_dim, c.dim});
  if (c.n_shared_experts > 0) {
    l.push_back({"shared.w1/w3", c.dim, c.n_shared_experts * c.moe_inter_dim});
    l.push_back({"shared.w2", c.n_shared_experts * c.moe_inter_dim, c.dim});
  }
  return l;
}

// Mean milliseconds per call of fn over `iters` calls, after warming up until the backend's cuBLASLt
// timing has settled (at most 64 calls; at least 3).
template <class Fn>
double time_ms(Backend& be, int iters, Fn&& fn) {
  for (int i = 0; i < 64 && (i < 3 || be.tuning()); ++i) fn();
  be.synchronize({});
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  be.synchronize({});
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
}

// Device tensors of one benchmark shape, made once: sources in f32 (normal values), their bf16
// copies, their FP8 copies.
class Buffers {
 public:
  Buffers(Backend& be, std::vector<std::tuple<std::string, Shape, DType>> views) : be_(be) {
    for (auto& [name, shape, dtype] : views) arena_.add(name, shape, dtype);
    arena_.allocate(be.allocator());
  }
  Tensor operator[](std::string_view name) const { return arena_.get(name); }
  void fill_normal(const Tensor& t, uint64_t seed, double std) {
    std::vector<float> host(static_cast<size_t>(t.numel()));
    for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(std * normal_at(seed, 5, i));
    be_.upload(t, host.data());
  }

 private:
  Backend& be_;
  Arena arena_;
};

void bench_act_quant(Backend& be, int64_t tokens, const std::vector<int64_t>& widths, int iters) {
  fmt::print("\nact_quant x [T, K] -> e4m3 + f32 scales (GB/s = bytes read + written / time)\n");
  fmt::print("{:>7} {:>6} {:>5} {:>22} {:>10} {:>9}\n", "T", "K", "x", "copies", "us", "GB/s");
  for (int64_t k : widths) {
    const int64_t m = tokens;
    Buffers b(be, {{"x", Shape{m, k}, DType::kF32},
                   {"x16", Shape{m, k}, DType::kBF16},
                   {"q", Shape{m, k}, DType::kF8E4M3},
                   {"s", Shape{fp8_tiles(k), m}, DType::kF32},
                   {"q_t", Shape{k, m}, DType::kF8E4M3},
                   {"s_t", Shape{fp8_tiles(m), k}, DType::kF32}});
    b.fill_normal(b["x"], 1, 1.0);
    be.copy({}, {.dst = b["x16"], .src = b["x"]});
    for (DType dt : {DType::kF32, DType::kBF16})
      for (int mode = 0; mode < 3; ++mode) {
        const bool rows = mode != 1, cols = mode != 0;
        const Tensor x = dt == DType::kF32 ? b["x"] : b["x16"];
        const ActQuantArgs args{.q = rows ? b["q"] : Tensor{},
                                .scale = rows ? b["s"] : Tensor{},
                                .q_t = cols ? b["q_t"] : Tensor{},
                                .scale_t = cols ? b["s_t"] : Tensor{},
                                .x = x};
        const double ms = time_ms(be, iters, [&] { be.act_quant({}, args); });
        const double bytes = static_cast<double>(x.nbytes()) +
                             (rows ? static_cast<double>(m * k + 4 * fp8_tiles(k) * m) : 0.0) +
                             (cols ? static_cast<double>(m * k + 4 * fp8_tiles(m) * k) : 0.0);
        fmt::print("{:>7} {:>6} {:>5} {:>22} {:>10.1f} {:>9.0f}\n", m, k, dtype_name(dt),
                   mode == 0   ? "row-wise (1x128)"
                   : mode == 1 ? "transposed (128x1)"
                               : "both, one pass",
                   ms * 1e3, bytes / (ms * 1e-3) / 1e9);
      }
  }
}

void bench_gemms(Backend& be, int64_t tokens, const std::vector<Linear>& linears, int iters) {
  fmt::print("\nGEMMs of each Linear y = x Wᵀ (T = {} tokens): TFLOP/s = 2·M·N·K / time\n", tokens);
  fmt::print("{:<14} {:<6} {:>7} {:>7} {:>7} {:>12} {:>12} {:>8}\n", "linear", "gemm", "M", "N", "K", "fp8 TFLOP/s",
             "bf16 TFLOP/s", "fp8/bf16");
  for (const Linear& l : linears) {
    const int64_t t = tokens, in = l.in, out = l.out;
    Buffers b(be, {{"x", Shape{t, in}, DType::kF32},
                   {"dy", Shape{t, out}, DType::kF32},
                   {"w", Shape{out, in}, DType::kF32},
                   {"x16", Shape{t, in}, DType::kBF16},
                   {"dy16", Shape{t, out}, DType::kBF16},
                   {"w16", Shape{out, in}, DType::kBF16},
                   {"y16", Shape{t, out}, DType::kBF16},
                   {"dx16", Shape{t, in}, DType::kBF16},
                   {"dw", Shape{out, in}, DType::kF32},
                   {"xq", Shape{t, in}, DType::kF8E4M3},
                   {"xs", Shape{fp8_tiles(in), t}, DType::kF32},
                   {"xq_t", Shape{in, t}, DType::kF8E4M3},
                   {"xs_t", Shape{fp8_tiles(t), in}, DType::kF32},
                   {"dyq", Shape{t, out}, DType::kF8E4M3},
                   {"dys", Shape{fp8_tiles(out), t}, DType::kF32},
                   {"dyq_t", Shape{out, t}, DType::kF8E4M3},
                   {"dys_t", Shape{fp8_tiles(t), out}, DType::kF32},
                   {"wq", Shape{out, in}, DType::kF8E4M3},
                   {"ws", Shape{fp8_tiles(out), fp8_block_scale_cols(in)}, DType::kF32},
                   {"wq_t", Shape{in, out}, DType::kF8E4M3},
                   {"ws_t", Shape{fp8_tiles(in), fp8_block_scale_cols(out)}, DType::kF32}});
    b.fill_normal(b["x"], 11, 1.0);
    b.fill_normal(b["dy"], 12, 1e-3);
    b.fill_normal(b["w"], 13, 0.02);
    be.fill({}, {.out = b["dw"], .value = 0.0});
    for (const char* n : {"x", "dy", "w"}) be.copy({}, {.dst = b[std::string(n) + "16"], .src = b[n]});
    be.act_quant({}, {.q = b["xq"], .scale = b["xs"], .q_t = b["xq_t"], .scale_t = b["xs_t"], .x = b["x"]});
    be.act_quant({}, {.q = b["dyq"], .scale = b["dys"], .q_t = b["dyq_t"], .scale_t = b["dys_t"], .x = b["dy"]});
    be.weight_quant({}, {.q = b["wq"], .scale = b["ws"], .q_t = b["wq_t"], .scale_t = b["ws_t"], .w = b["w"]});
    struct Form {
      const char* name;
      int64_t m, n, k;
      Fp8GemmArgs fp8;
      GemmArgs bf16;
    };
    const std::vector<Form> forms = {
        {"Fprop",
         t,
         out,
         in,
         {.c = b["y16"], .a = b["xq"], .a_scale = b["xs"], .b = b["wq"], .b_scale = b["ws"]},
         {.c = b["y16"], .a = b["x16"], .b = b["w16"], .trans_b = true}},
        {"Dgrad",
         t,
         in,
         out,
         {.c = b["dx16"], .a = b["dyq"], .a_scale = b["dys"], .b = b["wq_t"], .b_scale = b["ws_t"]},
         {.c = b["dx16"], .a = b["dy16"], .b = b["w16"]}},
        {"Wgrad",
         out,
         in,
         t,
         {.c = b["dw"],
          .a = b["dyq_t"],
          .a_scale = b["dys_t"],
          .b = b["xq_t"],
          .b_scale = b["xs_t"],
          .b_scaling = Fp8Scaling::kTile1x128,
          .beta = 1.0},
         {.c = b["dw"], .a = b["dy16"], .b = b["x16"], .trans_a = true, .beta = 1.0}},
    };
    for (const Form& f : forms) {
      const double flops = 2.0 * static_cast<double>(f.m) * static_cast<double>(f.n) * static_cast<double>(f.k);
      std::string fp8_text = "n/a";
      double fp8_ms = 0.0;
      try {
        fp8_ms = time_ms(be, iters, [&] { be.fp8_gemm({}, f.fp8); });
        fp8_text = fmt::format("{:.0f}", flops / (fp8_ms * 1e-3) / 1e12);
      } catch (const Error& e) {
        fmt::print(stderr, "{} {}: {}\n", l.name, f.name, e.what());
      }
      const double bf16_ms = time_ms(be, iters, [&] { be.gemm({}, f.bf16); });
      fmt::print("{:<14} {:<6} {:>7} {:>7} {:>7} {:>12} {:>12.0f} {:>8}\n", l.name, f.name, f.m, f.n, f.k, fp8_text,
                 flops / (bf16_ms * 1e-3) / 1e12, fp8_ms > 0 ? fmt::format("{:.2f}", bf16_ms / fp8_ms) : "-");
    }
  }
}

// The routed experts' grouped GEMMs at the preset's shapes: R = tokens · top-k rows over G experts of
// equal rows (R/G each, the balanced case), fp8_grouped_gemm beside grouped_gemm in the bf16 GEMM mode
// (the bf16 TMA kernel), both writing bf16 C. Fprop w1 (and w3) [R, I, D], w2 [R, D, I]; Dgrad dh = dy·W2
// [R, I, D] and the two-term dx = da·W1 + db·W3 [R, D, I + I]. "+quant" adds what the FP8 call needs
// first: act_quant of A (and A2) and weight_quant of the stack(s).
void bench_grouped(Backend& be, const ModelConfig& c, int64_t tokens, int iters) {
  if (c.n_routed_experts == 0) return;
  const int64_t G = c.n_routed_experts, R = tokens * c.n_activated_experts, D = c.dim, I = c.moe_inter_dim;
  fmt::print("\nRouted experts' grouped GEMMs (R = {} rows, G = {} experts of {} rows): TFLOP/s = 2·R·N·K / time\n", R,
             G, R / G);
  fmt::print("{:<22} {:>6} {:>6} {:>12} {:>14} {:>12} {:>9} {:>9}\n", "gemm", "N", "K", "fp8 TFLOP/s", "fp8+quant",
             "bf16 TFLOP/s", "fp8/bf16", "+q/bf16");
  std::vector<int32_t> off(static_cast<size_t>(G) + 1);
  for (int64_t g = 0; g <= G; ++g) off[static_cast<size_t>(g)] = static_cast<int32_t>(g * R / G);
  struct Shape3 {
    const char* name;
    int64_t n, k, k2;
  };
  for (const Shape3& f : {Shape3{"Fprop w1 (w3)", I, D, 0}, Shape3{"Fprop w2", D, I, 0},
                          Shape3{"Dgrad dh = dy·W2", I, D, 0}, Shape3{"Dgrad da·W1 + db·W3", D, I, I}}) {
    const int64_t k2 = std::max<int64_t>(f.k2, 16);
    Buffers b(be, {{"a", Shape{R, f.k}, DType::kF32},
                   {"a2", Shape{R, k2}, DType::kF32},
                   {"w", Shape{G, f.n, f.k}, DType::kF32},
                   {"w2", Shape{G, f.n, k2}, DType::kF32},
                   {"a16", Shape{R, f.k}, DType::kBF16},
                   {"a2_16", Shape{R, k2}, DType::kBF16},
                   {"w16", Shape{G, f.n, f.k}, DType::kBF16},
                   {"w2_16", Shape{G, f.n, k2}, DType::kBF16},
                   {"c16", Shape{R, f.n}, DType::kBF16},
                   {"aq", Shape{R, f.k}, DType::kF8E4M3},
                   {"as", Shape{fp8_tiles(f.k), R}, DType::kF32},
                   {"a2q", Shape{R, k2}, DType::kF8E4M3},
                   {"a2s", Shape{fp8_tiles(k2), R}, DType::kF32},
                   {"wq", Shape{G, f.n, f.k}, DType::kF8E4M3},
                   {"ws", Shape{G, fp8_tiles(f.n), fp8_block_scale_cols(f.k)}, DType::kF32},
                   {"w2q", Shape{G, f.n, k2}, DType::kF8E4M3},
                   {"w2s", Shape{G, fp8_tiles(f.n), fp8_block_scale_cols(k2)}, DType::kF32},
                   {"off", Shape{G + 1}, DType::kI32}});
    be.upload(b["off"], off.data());
    b.fill_normal(b["a"], 21, 1.0);
    b.fill_normal(b["a2"], 22, 1.0);
    b.fill_normal(b["w"], 23, 0.02);
    b.fill_normal(b["w2"], 24, 0.02);
    for (const auto& [src, dst] : {std::pair{"a", "a16"}, {"a2", "a2_16"}, {"w", "w16"}, {"w2", "w2_16"}})
      be.copy({}, {.dst = b[dst], .src = b[src]});
    const bool two = f.k2 > 0;
    const auto quant = [&] {
      be.act_quant({}, {.q = b["aq"], .scale = b["as"], .x = b["a16"]});
      be.weight_quant({}, {.q = b["wq"], .scale = b["ws"], .w = b["w16"]});
      if (two) {
        be.act_quant({}, {.q = b["a2q"], .scale = b["a2s"], .x = b["a2_16"]});
        be.weight_quant({}, {.q = b["w2q"], .scale = b["w2s"], .w = b["w2_16"]});
      }
    };
    quant();
    Fp8GroupedGemmArgs fa{
        .c = b["c16"], .a = b["aq"], .a_scale = b["as"], .b = b["wq"], .b_scale = b["ws"], .offsets = b["off"]};
    GroupedGemmArgs ba{.c = b["c16"], .a = b["a16"], .b = b["w16"], .offsets = b["off"], .trans_b = true};
    if (two) {
      fa.a2 = b["a2q"];
      fa.a2_scale = b["a2s"];
      fa.b2 = b["w2q"];
      fa.b2_scale = b["w2s"];
      ba.a2 = b["a2_16"];
      ba.b2 = b["w2_16"];
    }
    const double flops = 2.0 * static_cast<double>(R) * static_cast<double>(f.n) * static_cast<double>(f.k + f.k2);
    const double fp8_ms = time_ms(be, iters, [&] { be.fp8_grouped_gemm({}, fa); });
    const double fp8q_ms = time_ms(be, iters, [&] {
      quant();
      be.fp8_grouped_gemm({}, fa);
    });
    const double bf16_ms = time_ms(be, iters, [&] { be.grouped_gemm({}, ba); });
    const auto tf = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
    fmt::print("{:<22} {:>6} {:>6} {:>12.0f} {:>14.0f} {:>12.0f} {:>9.2f} {:>9.2f}\n", f.name, f.n,
               two ? fmt::format("{}+{}", f.k, f.k2) : fmt::format("{}", f.k), tf(fp8_ms), tf(fp8q_ms), tf(bf16_ms),
               bf16_ms / fp8_ms, bf16_ms / fp8q_ms);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"FP8 op benchmark (CUDA)"};
  std::string config = "configs/bench.yaml";
  int64_t tokens = 16384;
  int iters = 20;
  bool skip_quant = false;
  std::vector<std::string> only;
  app.add_option("--config", config, "preset whose dense Linear shapes are timed");
  app.add_option("--tokens", tokens, "rows T of the activations (tokens per micro-batch)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app.add_option("--iters", iters, "timed calls per row")->check(CLI::Range(1, 1000000));
  app.add_flag("--skip-quant", skip_quant, "only the GEMMs");
  app.add_option("--only", only, "run only these tables (default all)")
      ->check(CLI::IsMember({"quant", "dense", "grouped"}))
      ->delimiter(',');
  CLI11_PARSE(app, argc, argv);
  const auto wanted = [&](const char* table) {
    return only.empty() || std::find(only.begin(), only.end(), table) != only.end();
  };
  try {
    const ModelConfig cfg = load_model_config(config);
    auto be = make_backend("cuda");
    be->set_gemm_precision(GemmPrecision::kBF16);  // the bf16 column: the bf16 GEMM mode's cuBLASLt path
    fmt::print("bench_fp8: {} (dim {}), T = {}, {} iterations per row\n", config, cfg.dim, tokens, iters);
    if (!skip_quant && wanted("quant")) bench_act_quant(*be, tokens, {cfg.dim, cfg.inter_dim}, iters);
    if (wanted("dense")) bench_gemms(*be, tokens, linears_of(cfg), iters);
    if (wanted("grouped")) bench_grouped(*be, cfg, tokens, iters);
  } catch (const Error& e) {
    fmt::print(stderr, "bench_fp8: {}\n", e.what());
    return 1;
  }
  return 0;
}
