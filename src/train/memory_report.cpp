#include "train/memory_report.h"

#include <fmt/format.h>

#include "model/parameters.h"

namespace diffmoe {

namespace {
// 3.01 GiB, 12.5 MiB, 40.0 KiB: three significant figures in the largest unit that is at least 1.
std::string gib(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (u < 4 && bytes >= 1024.0) {
    bytes /= 1024.0;
    ++u;
  }
  return fmt::format("{:.3g} {}", bytes, units[u]);
}
}  // namespace

std::string out_of_memory_message(const RunConfig& rc, const std::string& config_path,
                                  std::optional<size_t> failed_bytes) {
  const ModelConfig& m = rc.model;
  const ParamCounts n = count_parameters(m, rc.train.seq_len);
  // f32 masters, gradients and two moments per parameter in optim.moment_dtype (docs/model.md §7);
  // the biases are buffers.
  const double weights = 4.0 * static_cast<double>(n.total + n.buffers), grads = 4.0 * static_cast<double>(n.total);
  const double moments = (rc.optim.moment_dtype == "bf16" ? 2.0 : 4.0) * 2.0 * static_cast<double>(n.total);
  const std::string what = failed_bytes ? fmt::format(" (allocating {})", gib(static_cast<double>(*failed_bytes))) : "";
  return fmt::format(
      "out of host memory{}: this run needs about {} of weights and {} of gradients for {:.2f} M parameters "
      "(model.vocab_size = {}, model.dim = {}, model.n_layers = {}, model.inter_dim = {}, model.moe_inter_dim = {}, "
      "model.n_routed_experts = {}), {} of AdamW moments (optim.moment_dtype = {}), and activations for "
      "train.micro_batch × train.seq_len = {} × {} "
      "tokens; shrink these keys, and run `diffmoe plan --config {}` to see what a config needs before training",
      what, gib(weights), gib(grads), static_cast<double>(n.total) / 1e6, m.vocab_size, m.dim, m.n_layers, m.inter_dim,
      m.moe_inter_dim, m.n_routed_experts, gib(moments), rc.optim.moment_dtype, rc.train.micro_batch, rc.train.seq_len,
      config_path);
}

}  // namespace diffmoe
