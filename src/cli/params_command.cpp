// `diffmoe params --config X`: parameter counts, FLOPs per token and training memory (docs/model.md §9, §10).
#include <fmt/core.h>

#include "cli/commands.h"
#include "model/config.h"
#include "model/parameters.h"

namespace diffmoe::cli {

namespace {

struct Precision {
  const char* name;
  double bytes_per_param;  // weights + gradients + AdamW moments
  const char* layout;
};

// Training state per parameter (docs/model.md §7), one row per train.precision: FP32 master weights, FP32
// gradients and two FP32 Adam moments in all; bf16_gemm adds a bf16 copy of the GEMM weights, fp8
// also the e4m3 copies of the FP8 Linears' weights (W and Wᵀ, one byte each; their f32 scales add
// 8 bytes per 128×128 block). Counted here for every parameter: an upper bound, the norms and λ
// vectors have none. The last row: bf16_gemm with optim.moment_dtype = bf16 (two bf16 moments).
constexpr Precision kPrecisions[] = {
    {"f32", 4 + 4 + 8, "fp32 weights 4 + fp32 grads 4 + Adam m,v 8"},
    {"bf16_gemm", 2 + 4 + 4 + 8, "bf16 copy 2 + fp32 master 4 + fp32 grads 4 + Adam m,v 8"},
    {"fp8", 2 + 2 + 4 + 4 + 8, "bf16 copy 2 + e4m3 W, Wᵀ 2 + fp32 master 4 + fp32 grads 4 + Adam m,v 8"},
    {"+bf16 m,v", 2 + 4 + 4 + 4, "bf16_gemm with optim.moment_dtype: bf16, Adam m,v 4"},
};

int run_params(const std::string& path, int64_t seq) {
  const ModelConfig c = load_model_config(path);
  if (seq <= 0) seq = c.max_seq_len;
  const ParamCounts n = count_parameters(c, seq);
  auto m = [](int64_t v) { return static_cast<double>(v) / 1e6; };
  fmt::print("config              {}\n", path);
  fmt::print("total parameters    {:>12.2f} M   (balancing-bias buffers: {} values, not counted)\n", m(n.total),
             n.buffers);
  fmt::print("active per token    {:>12.2f} M   (routed experts counted {}/{})\n", m(n.active), c.n_activated_experts,
             c.n_routed_experts);
  fmt::print("embedding           {:>12.2f} M\n", m(n.embedding));
  fmt::print("active matmul       {:>12.2f} M   (non-embedding matmul weights + head)\n", m(n.active_matmul));
  fmt::print("FLOPs per token     {:>12.4f} G   at seq {}\n", n.flops_per_token / 1e9, seq);
  fmt::print("  formula: 6·(active non-embedding matmul weights + head) + 3·n_layers·seq·n_heads·(d_qk + d_v,eff)\n");
  fmt::print("           d_v,eff = {} ({}); the attention term = {:.4f} G\n",
             c.differential ? 2 * c.v_head_dim : c.v_head_dim,
             c.differential ? "2·v_head_dim, differential" : "v_head_dim, plain",
             3.0 * static_cast<double>(c.n_layers * seq * c.n_heads) *
                 static_cast<double>(c.d_qk() + (c.differential ? 2 : 1) * c.v_head_dim) / 1e9);
  fmt::print("training memory (weights + gradients + optimizer state, activations not included):\n");
  for (const Precision& p : kPrecisions)
    fmt::print("  {:<9} {:>9.2f} GiB   ({} B/param: {})\n", p.name,
               static_cast<double>(n.total) * p.bytes_per_param / (1024.0 * 1024 * 1024), p.bytes_per_param, p.layout);
  return 0;
}

}  // namespace

void add_params_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("params", "Print parameter counts, FLOPs per token and training memory of a config");
  auto path = std::make_shared<std::string>();
  auto seq = std::make_shared<int64_t>(0);
  cmd->add_option("--config", *path, "YAML config file (its model: section)")->required();
  cmd->add_option("--seq", *seq, "sequence length for the attention FLOPs (default: max_seq_len)");
  cmd->callback([&run, path, seq] { run = [path, seq] { return run_params(*path, *seq); }; });
}

}  // namespace diffmoe::cli
