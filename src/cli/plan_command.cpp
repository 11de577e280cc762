// `diffmoe plan --config X`: per-rank training memory of a run layout and whether it fits a GPU
// (train/memory_plan.h: exact arenas from the model's and optimizer's own planning code, estimates
// named as such).
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>

#include "cli/commands.h"
#include "core/error.h"
#include "model/config.h"
#include "model/param_layout.h"
#include "model/parameters.h"
#include "train/memory_plan.h"

namespace diffmoe::cli {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
double gib(uint64_t b) { return static_cast<double>(b) / kGiB; }
double gib_signed(double b) { return b / kGiB; }

struct PlanArgs {
  std::string config;
  int64_t world = 1, ep = 1, micro_batch = 1, seq = 0, bucket_elems = 0, grad_slots = 0;
  int zero_stage = 1;
  std::string recompute = "none", precision = "f32", gpu_memory = "h100", moment_dtype = "f32";
  bool json = false;
};

// GPU memory sizes: "h100" / "h200" (the total nvidia-smi reports for the H100 SXM 80GB, 81559 MiB,
// and the H200 141GB, 143771 MiB), or a number with a unit: B, KB, MB, GB, TB (powers of 1000) or
// KiB, MiB, GiB, TiB (powers of 1024).
uint64_t parse_gpu_memory(const std::string& text) {
  std::string s;
  for (char c : text)
    if (!std::isspace(static_cast<unsigned char>(c)))
      s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "h100") return uint64_t{81559} << 20;
  if (s == "h200") return uint64_t{143771} << 20;
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    DIFFMOE_FAIL("--gpu-memory: expected h100, h200 or a size such as 80GB or 79.6GiB, got '{}'", text);
  }
  const std::string unit = s.substr(used);
  const std::pair<const char*, double> units[] = {{"b", 1.0},         {"kb", 1e3},   {"mb", 1e6},
                                                  {"gb", 1e9},        {"tb", 1e12},  {"kib", 1024.0},
                                                  {"mib", 1048576.0}, {"gib", kGiB}, {"tib", kGiB * 1024.0}};
  for (const auto& [name, scale] : units)
    if (unit == name) {
      DIFFMOE_CHECK(v > 0 && std::isfinite(v), "--gpu-memory: the size must be positive, got '{}'", text);
      return static_cast<uint64_t>(v * scale);
    }
  DIFFMOE_FAIL("--gpu-memory: '{}' has no unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)", text);
}

uint64_t item_bytes(const RankMemory& m, const std::string& key) {
  for (const MemoryItem& i : m.items)
    if (i.key == key) return i.bytes;
  return 0;
}

// The largest line items of a rank, "activations 61.2 GiB, gradients 30.4 GiB, ...".
std::string largest_items(const RankMemory& m, size_t n) {
  std::vector<const MemoryItem*> v;
  for (const MemoryItem& i : m.items) v.push_back(&i);
  std::sort(v.begin(), v.end(), [](const MemoryItem* a, const MemoryItem* b) { return a->bytes > b->bytes; });
  std::string s;
  for (size_t i = 0; i < std::min(n, v.size()); ++i)
    s += fmt::format("{}{} {:.2f} GiB", i ? ", " : "", v[i]->label, gib(v[i]->bytes));
  return s;
}

nlohmann::ordered_json to_json(const PlanArgs& a, const ModelConfig& cfg, const MemoryPlan& p, uint64_t gpu) {
  const ParamCounts n = count_parameters(cfg, p.run.seq);
  nlohmann::ordered_json j;
  j["config"] = a.config;
  j["world"] = p.run.world;
  j["ep"] = p.run.ep;
  j["expert_dp"] = p.expert_dp;
  j["precision"] = std::string(precision_name(p.run.precision));
  j["micro_batch"] = p.run.micro_batch;
  j["seq"] = p.run.seq;
  j["tokens_per_rank"] = p.tokens;
  j["bucket_elems"] = p.run.bucket_elems;
  j["zero_stage"] = p.run.zero_stage;
  j["grad_slots"] = p.run.grad_slots;
  j["recompute_requested"] = p.run.recompute;
  j["recompute_planned"] = p.recompute_planned;
  j["moment_dtype"] = p.run.moment_dtype;
  j["parameters"] = {{"total", n.total},
                     {"active", n.active},
                     {"dense_per_rank", p.dense_params},
                     {"expert_per_rank", p.expert_params_per_rank}};
  j["flops_per_token"] = n.flops_per_token;
  j["gpu_memory_bytes"] = gpu;
  nlohmann::ordered_json ranks = nlohmann::ordered_json::array();
  for (const RankMemory& m : p.ranks) {
    nlohmann::ordered_json items = nlohmann::ordered_json::array();
    for (const MemoryItem& i : m.items)
      items.push_back(
          {{"key", i.key}, {"label", i.label}, {"bytes", i.bytes}, {"estimate", i.estimate}, {"basis", i.basis}});
    ranks.push_back({{"rank", m.rank},
                     {"ep_rank", m.ep_rank},
                     {"expert_dp_rank", m.expert_dp_rank},
                     {"items", items},
                     {"exact_bytes", m.exact_bytes()},
                     {"total_bytes", m.total_bytes()},
                     {"headroom_bytes", static_cast<double>(gpu) - static_cast<double>(m.total_bytes())},
                     {"fits", m.total_bytes() <= gpu}});
  }
  j["ranks"] = ranks;
  j["all_ranks_equal"] = p.all_ranks_equal;
  const RankMemory& h = p.ranks.back();
  j["heaviest_rank"] = h.rank;
  j["total_bytes"] = h.total_bytes();
  j["fits"] = h.total_bytes() <= gpu;
  const uint64_t worst_total = h.total_bytes() - item_bytes(h, "ep_buffers") + p.ep_worst_bytes;
  j["ep_dispatch"] = {{"rows_per_layer_balanced", p.ep_rows_avg},
                      {"rows_per_layer_worst", p.ep_rows_worst},
                      {"worst_bytes", p.ep_worst_bytes},
                      {"worst_total_bytes", worst_total},
                      {"fits_worst", worst_total <= gpu}};
  j["activations"] = {{"residual", p.acts.residual},
                      {"attention", p.acts.attention},
                      {"ffn", p.acts.ffn},
                      {"head", p.acts.head},
                      {"scratch", p.acts.scratch},
                      {"other", p.acts.other},
                      {"largest_layer", p.acts.largest_layer}};
  // Each missing feature or unchosen option alone (total_bytes, fits) on the heaviest rank, and all
  // of them together.
  nlohmann::ordered_json missing = nlohmann::ordered_json::array();
  uint64_t all = 0;
  for (const MissingFeature& f : p.missing) {
    missing.push_back({{"key", f.key},
                       {"label", f.label},
                       {"saves_bytes", f.saves_bytes},
                       {"total_bytes", h.total_bytes() - f.saves_bytes},
                       {"fits", h.total_bytes() - f.saves_bytes <= gpu}});
    all += f.saves_bytes;
  }
  j["missing"] = missing;
  j["with_all_missing"] = {{"total_bytes", h.total_bytes() - all}, {"fits", h.total_bytes() - all <= gpu}};
  return j;
}

void print_text(const PlanArgs& a, const ModelConfig& cfg, const MemoryPlan& p, uint64_t gpu) {
  const ParamCounts n = count_parameters(cfg, p.run.seq);
  const RankMemory& h = p.ranks.back();
  fmt::print("diffmoe plan  {}\n", a.config);
  fmt::print("layout       world {} = {} expert-data-parallel × {} expert-parallel; dense parameters on every rank{}\n",
             p.run.world, p.expert_dp, p.run.ep,
             p.run.world == 1    ? ""
             : p.all_ranks_equal ? fmt::format("; all {} ranks need the same", p.run.world)
                                 : "; ranks differ (rank 0 and the heaviest shown)");
  fmt::print("precision    {}   micro-batch {} × seq {} = {} tokens per rank   gradient buckets: {}   ZeRO stage {}\n",
             precision_name(p.run.precision), p.run.micro_batch, p.run.seq, p.tokens,
             p.run.bucket_elems > 0 ? fmt::format("{} elements", p.run.bucket_elems)
             : p.run.zero_stage == 2
                 ? fmt::format("{} elements (the ZeRO-2 default)", ParallelLayoutOptions::kZero2BucketElems)
                 : std::string("one per group"),
             p.run.zero_stage);
  fmt::print("recompute    {}", p.recompute_planned);
  fmt::print("   Adam moments: {}\n", p.run.moment_dtype);
  fmt::print("parameters   {:.2f} M total, {:.2f} M active; per rank {:.2f} M dense + {:.2f} M expert\n", n.total / 1e6,
             n.active / 1e6, p.dense_params / 1e6, p.expert_params_per_rank / 1e6);
  fmt::print("FLOPs/token  {:.4f} G at seq {} (docs/model.md §9)\n\n", n.flops_per_token / 1e9, p.run.seq);

  // One column per rank shown: rank 0, and the heaviest where it differs.
  std::string head = fmt::format("{:<36}", "per-rank memory (GiB, ~ = estimate)");
  for (const RankMemory& m : p.ranks) head += fmt::format("{:>10}", fmt::format("rank {}", m.rank));
  fmt::print("{}   basis\n", head);
  auto row = [&](const std::string& label, auto value, const std::string& basis) {
    std::string s = fmt::format("  {:<34}", label);
    for (const RankMemory& m : p.ranks) s += fmt::format("{:>10.2f}", value(m));
    fmt::print("{}   {}\n", s, basis);
  };
  for (size_t i = 0; i < p.ranks.front().items.size(); ++i) {
    const MemoryItem& it = p.ranks.front().items[i];
    if (it.estimate && (i == 0 || !p.ranks.front().items[i - 1].estimate))
      row(
          "exact subtotal (the arenas)", [](const RankMemory& m) { return gib(m.exact_bytes()); },
          "what a run allocates on this rank");
    if (it.key == "ep_buffers" && it.bytes == 0 && p.run.ep == 1) continue;
    row((it.estimate ? "~ " : "") + it.label, [i](const RankMemory& m) { return gib(m.items[i].bytes); }, it.basis);
  }
  row(
      "total", [](const RankMemory& m) { return gib(m.total_bytes()); }, "");
  row(
      "GPU memory", [&](const RankMemory&) { return gib(gpu); }, a.gpu_memory);
  row(
      "headroom",
      [&](const RankMemory& m) { return gib_signed(static_cast<double>(gpu) - static_cast<double>(m.total_bytes())); },
      "");
  const ActivationBreakdown& ac = p.acts;
  fmt::print(
      "\nactivations: residual stream {:.2f}, attention {:.2f}, FFN/MoE {:.2f}, head {:.2f}, backward scratch {:.2f}, "
      "other {:.2f} GiB; the largest layer {:.2f} GiB\n",
      gib(ac.residual), gib(ac.attention), gib(ac.ffn), gib(ac.head), gib(ac.scratch), gib(ac.other),
      gib(ac.largest_layer));
  if (p.run.ep > 1) {
    const uint64_t worst_total = h.total_bytes() - item_bytes(h, "ep_buffers") + p.ep_worst_bytes;
    fmt::print(
        "EP dispatch: {} received rows per MoE layer with balanced routing; dropless worst case {} rows "
        "(EP·N·min(K, E/EP)) -> {:.2f} GiB with recompute {}, total {:.2f} GiB ({})\n",
        p.ep_rows_avg, p.ep_rows_worst, gib(p.ep_worst_bytes), p.run.recompute, gib(worst_total),
        worst_total <= gpu ? "fits" : "does not fit");
  }
  const bool fits = h.total_bytes() <= gpu;
  const double margin = static_cast<double>(gpu) - static_cast<double>(h.total_bytes());
  fmt::print("\n{}: rank {} needs {:.2f} GiB of {:.2f} GiB ({} {:.2f} GiB); largest: {}\n",
             fits ? "FITS" : "DOES NOT FIT", h.rank, gib(h.total_bytes()), gib(gpu), fits ? "headroom" : "short by",
             gib_signed(std::abs(margin)), largest_items(h, 3));
  if (!fits && !p.missing.empty()) {
    // Cumulative, largest saving first: how far each missing feature (and those above it) would go.
    std::vector<MissingFeature> m = p.missing;
    std::stable_sort(m.begin(), m.end(),
                     [](const MissingFeature& x, const MissingFeature& y) { return x.saves_bytes > y.saves_bytes; });
    fmt::print(
        "not in this plan: features the code lacks and options not chosen (estimated savings on rank {}, "
        "cumulative):\n",
        h.rank);
    uint64_t t = h.total_bytes();
    for (size_t i = 0; i < m.size(); ++i) {
      t -= m[i].saves_bytes;
      fmt::print("  {:<80} -{:>7.2f} GiB -> {:>7.2f} GiB ({})\n", (i ? "+ " : "") + m[i].label, gib(m[i].saves_bytes),
                 gib(t), t <= gpu ? "fits" : "does not fit");
    }
  }
}

int run_plan(const PlanArgs& a) {
  const ModelConfig cfg = load_model_config(a.config);
  const uint64_t gpu = parse_gpu_memory(a.gpu_memory);
  RunShape run{.world = a.world,
               .ep = a.ep,
               .precision = parse_precision(a.precision, "--precision"),
               .micro_batch = a.micro_batch,
               .seq = a.seq,
               .bucket_elems = a.bucket_elems,
               .zero_stage = a.zero_stage,
               .grad_slots = a.grad_slots,
               .recompute = a.recompute,
               .moment_dtype = a.moment_dtype};
  const MemoryPlan p = plan_memory(cfg, run);
  if (a.json) fmt::print("{}\n", to_json(a, cfg, p, gpu).dump(2));
  else print_text(a, cfg, p, gpu);
  return 0;
}

}  // namespace

void add_plan_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd =
      app.add_subcommand("plan", "Print the per-rank training memory of a run layout and whether it fits a GPU");
  auto a = std::make_shared<PlanArgs>();
  cmd->add_option("--config", a->config, "YAML config file (its model: section)")->required();
  cmd->add_option("--world", a->world, "ranks (GPUs), default 1");
  cmd->add_option("--ep", a->ep, "expert-parallel degree (divides --world and model.n_routed_experts), default 1");
  cmd->add_option("--recompute", a->recompute, "activation recompute: none, attention, moe or full")
      ->check(CLI::IsMember({"none", "attention", "moe", "full"}));
  cmd->add_option("--micro-batch", a->micro_batch, "sequences per rank and micro-batch, default 1");
  cmd->add_option("--seq", a->seq, "tokens per sequence, default model.max_seq_len");
  cmd->add_option("--precision", a->precision, "train.precision: f32, bf16 (bf16_gemm) or fp8, default f32");
  cmd->add_option("--moment-dtype", a->moment_dtype, "optim.moment_dtype: the Adam moments in f32 or bf16, default f32")
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--gpu-memory", a->gpu_memory, "h100, h200, or a size such as 80GB, 79.6GiB; default h100");
  cmd->add_option("--bucket-elems", a->bucket_elems,
                  "gradient bucket size in elements, default 0 (one bucket per group; 40M with --zero-stage 2)");
  cmd->add_option("--zero-stage", a->zero_stage,
                  "parallel.zero_stage: 1 (optimizer state sharded) or 2 (gradients too, in bucket slots), default 1")
      ->check(CLI::IsMember({1, 2}));
  cmd->add_option("--grad-slots", a->grad_slots,
                  "parallel.grad_slots: gradient slots per data-parallel group with --zero-stage 2, default 0 "
                  "(automatic)");
  cmd->add_flag("--json", a->json, "print the plan as JSON");
  cmd->callback([&run, a] { run = [a] { return run_plan(*a); }; });
}

}  // namespace diffmoe::cli
