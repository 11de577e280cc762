#include "dist/launch.h"

#include <charconv>
#include <cmath>
#include <cstdlib>

#include "core/error.h"

namespace diffmoe::dist {
namespace {

constexpr int kDefaultMasterPort = 29500;  // torchrun's default

// A variable's value as an integer in [lo, hi]; throws naming the variable when it is not one.
int parse_int(const std::string& name, const std::string& value, int lo, int hi) {
  long long v = 0;
  const char* b = value.data();
  const char* e = b + value.size();
  const auto [end, ec] = std::from_chars(b, e, v);
  DIFFMOE_CHECK(!value.empty() && ec == std::errc() && end == e, "[launch] {}='{}' is not an integer", name, value);
  DIFFMOE_CHECK(v >= lo && v <= hi, "[launch] {}={} is out of range [{}, {}]", name, value, lo, hi);
  return static_cast<int>(v);
}

// Reads the variables of one launcher: required ones throw naming the variable when missing.
class Vars {
 public:
  Vars(const EnvReader& env, std::string_view launcher) : env_(env), launcher_(launcher) {}

  bool has(const std::string& name) const { return env_(name).has_value(); }
  std::optional<std::string> get(const std::string& name) const { return env_(name); }
  std::string required(const std::string& name, std::string_view why) const {
    const auto v = env_(name);
    DIFFMOE_CHECK(v.has_value(), "[launch] {} launch: {} is not set ({})", launcher_, name, why);
    return *v;
  }
  int required_int(const std::string& name, std::string_view why, int lo, int hi) const {
    return parse_int(name, required(name, why), lo, hi);
  }
  std::optional<int> optional_int(const std::string& name, int lo, int hi) const {
    const auto v = env_(name);
    if (!v) return std::nullopt;
    return parse_int(name, *v, lo, hi);
  }

 private:
  const EnvReader& env_;
  std::string_view launcher_;
};

constexpr int kMaxRanks = 1 << 24;

// The checks every launcher shares: rank < world, local_rank < local_world <= world.
void check_ranks(const Launch& l, std::string_view rank_var, std::string_view world_var, std::string_view local_var,
                 std::string_view local_world_var) {
  DIFFMOE_CHECK(l.rank < l.world, "[launch] {}={} must be less than {}={}", rank_var, l.rank, world_var, l.world);
  DIFFMOE_CHECK(l.local_world <= l.world, "[launch] {}={} exceeds {}={}", local_world_var, l.local_world, world_var,
                l.world);
  DIFFMOE_CHECK(l.local_rank < l.local_world, "[launch] {}={} must be less than {}={}", local_var, l.local_rank,
                local_world_var, l.local_world);
  DIFFMOE_CHECK(l.local_rank <= l.rank, "[launch] {}={} exceeds {}={} (a node's ranks are a subset of the world's)",
                local_var, l.local_rank, rank_var, l.rank);
}

// When another launcher's rank variable is set too, it must agree (e.g. RANK exported by hand into
// an mpirun job would otherwise give two processes the same rank).
void check_agrees(const EnvReader& env, const std::string& var, int value, std::string_view ours,
                  std::string_view launcher) {
  const auto v = env(var);
  if (!v) return;
  const int other = parse_int(var, *v, 0, kMaxRanks);
  DIFFMOE_CHECK(other == value, "[launch] {}={} disagrees with {}={} (set by {}): unset the stale one", ours, value,
                var, other, launcher);
}

void read_master(const Vars& vars, Launch& l, const std::optional<std::string>& default_addr,
                 std::optional<int> default_port) {
  const auto addr = vars.get("MASTER_ADDR");
  if (addr) {
    DIFFMOE_CHECK(!addr->empty(), "[launch] MASTER_ADDR is empty");
    l.master_addr = *addr;
  } else {
    DIFFMOE_CHECK(default_addr.has_value(),
                  "[launch] {} launch: MASTER_ADDR is not set (the host of rank 0, which serves the "
                  "rendezvous store)",
                  launch_kind_name(l.kind));
    l.master_addr = *default_addr;
  }
  const auto port = vars.optional_int("MASTER_PORT", 1, 65535);
  if (port) {
    l.master_port = *port;
  } else {
    DIFFMOE_CHECK(default_port.has_value(),
                  "[launch] {} launch: MASTER_PORT is not set (the port of the rendezvous store)",
                  launch_kind_name(l.kind));
    l.master_port = *default_port;
  }
}

Launch detect_torchrun(const EnvReader& env) {
  const Vars v(env, "torchrun");
  Launch l;
  l.kind = LaunchKind::kTorchrun;
  l.rank = v.required_int("RANK", "this process's rank", 0, kMaxRanks);
  l.world = v.required_int("WORLD_SIZE", "the number of processes", 1, kMaxRanks);
  l.local_rank = v.required_int("LOCAL_RANK", "this process's rank on its node, which picks the GPU", 0, kMaxRanks);
  l.local_world = v.optional_int("LOCAL_WORLD_SIZE", 1, kMaxRanks).value_or(l.world);
  check_ranks(l, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE");
  check_agrees(env, "OMPI_COMM_WORLD_RANK", l.rank, "RANK", "mpirun");
  check_agrees(env, "OMPI_COMM_WORLD_SIZE", l.world, "WORLD_SIZE", "mpirun");
  check_agrees(env, "SLURM_PROCID", l.rank, "RANK", "srun");
  if (l.world > 1) {
    read_master(v, l, std::nullopt, std::nullopt);
    l.transport = Transport::kStore;
  }
  return l;
}

Launch detect_openmpi(const EnvReader& env) {
  const Vars v(env, "mpirun");
  Launch l;
  l.kind = LaunchKind::kOpenMpi;
  l.rank = v.required_int("OMPI_COMM_WORLD_RANK", "set by Open MPI's mpirun", 0, kMaxRanks);
  l.world = v.required_int("OMPI_COMM_WORLD_SIZE", "set by Open MPI's mpirun", 1, kMaxRanks);
  l.local_rank = v.required_int("OMPI_COMM_WORLD_LOCAL_RANK", "set by Open MPI's mpirun", 0, kMaxRanks);
  l.local_world = v.optional_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, kMaxRanks).value_or(l.world);
  check_ranks(l, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "OMPI_COMM_WORLD_LOCAL_SIZE");
  l.transport = Transport::kMpi;
  return l;
}

Launch detect_slurm(const EnvReader& env) {
  const Vars v(env, "srun");
  Launch l;
  l.kind = LaunchKind::kSlurm;
  l.rank = v.required_int("SLURM_PROCID", "set by srun", 0, kMaxRanks);
  l.world = v.required_int("SLURM_NTASKS", "the number of tasks of the job step", 1, kMaxRanks);
  l.local_rank = v.required_int("SLURM_LOCALID", "the task's rank on its node, which picks the GPU", 0, kMaxRanks);
  const int node = v.required_int("SLURM_NODEID", "the task's node within the job", 0, kMaxRanks);
  const std::vector<int> per_node =
      expand_slurm_tasks_per_node(v.required("SLURM_TASKS_PER_NODE", "how many tasks run on each node"));
  DIFFMOE_CHECK(node < static_cast<int>(per_node.size()),
                "[launch] SLURM_NODEID={} but SLURM_TASKS_PER_NODE lists {} nodes", node, per_node.size());
  l.local_world = per_node[static_cast<size_t>(node)];
  check_ranks(l, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE");
  // PMIx/PMI from srun: MPI can initialise; their ranks must be Slurm's.
  check_agrees(env, "PMIX_RANK", l.rank, "SLURM_PROCID", "srun's PMIx");
  check_agrees(env, "PMI_RANK", l.rank, "SLURM_PROCID", "srun's PMI");
  if (v.has("PMIX_RANK") || v.has("PMI_RANK")) {
    l.transport = Transport::kMpi;
  } else if (l.world > 1) {
    std::string list_var = "SLURM_STEP_NODELIST";
    auto list = v.get(list_var);
    if (!list) list = v.get(list_var = "SLURM_JOB_NODELIST");
    if (!list) list = v.get(list_var = "SLURM_NODELIST");
    std::optional<std::string> first;
    if (list) first = slurm_first_host(*list, list_var);
    DIFFMOE_CHECK(first.has_value() || v.has("MASTER_ADDR"),
                  "[launch] srun launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set (the host of rank 0)");
    read_master(v, l, first, kDefaultMasterPort);
    l.transport = Transport::kStore;
  }
  return l;
}

Launch detect_pmi(const EnvReader& env) {
  const Vars v(env, "PMI");
  Launch l;
  l.kind = LaunchKind::kPmi;
  l.rank = v.required_int("PMI_RANK", "set by the PMI launcher", 0, kMaxRanks);
  l.world = v.required_int("PMI_SIZE", "set by the PMI launcher", 1, kMaxRanks);
  l.local_rank = v.required_int("MPI_LOCALRANKID", "the rank on this node, which picks the GPU", 0, kMaxRanks);
  l.local_world = v.required_int("MPI_LOCALNRANKS", "the number of ranks on this node", 1, kMaxRanks);
  check_ranks(l, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS");
  l.transport = Transport::kMpi;
  return l;
}

// One numeric range bound inside brackets: digits only (zero padding is significant).
int64_t parse_bound(std::string_view digits, std::string_view list, std::string_view variable) {
  DIFFMOE_CHECK(!digits.empty() && digits.size() <= 18, "[launch] {}='{}': bad range bound '{}'", variable, list,
                digits);
  int64_t v = 0;
  for (char c : digits) {
    DIFFMOE_CHECK(c >= '0' && c <= '9', "[launch] {}='{}': bad range bound '{}'", variable, list, digits);
    v = v * 10 + (c - '0');
  }
  return v;
}

// Expands one host expression (no top-level commas) into `out`, appending to `prefix`.
void expand_expression(std::string_view expr, std::string prefix, std::string_view list, std::string_view variable,
                       std::vector<std::string>& out) {
  const size_t open = expr.find('[');
  if (open == std::string_view::npos) {
    DIFFMOE_CHECK(expr.find(']') == std::string_view::npos, "[launch] {}='{}': unbalanced ']'", variable, list);
    DIFFMOE_CHECK(out.size() < kMaxHosts, "[launch] {}: more than {} hosts", variable, kMaxHosts);
    out.push_back(prefix + std::string(expr));
    return;
  }
  const size_t close = expr.find(']', open);
  DIFFMOE_CHECK(close != std::string_view::npos, "[launch] {}='{}': unbalanced '['", variable, list);
  const std::string_view head = expr.substr(0, open);
  DIFFMOE_CHECK(head.find(']') == std::string_view::npos, "[launch] {}='{}': unbalanced ']'", variable, list);
  const std::string_view ranges = expr.substr(open + 1, close - open - 1);
  const std::string_view rest = expr.substr(close + 1);
  DIFFMOE_CHECK(!ranges.empty(), "[launch] {}='{}': empty brackets", variable, list);
  size_t pos = 0;
  while (pos <= ranges.size()) {
    const size_t comma = std::min(ranges.find(',', pos), ranges.size());
    const std::string_view range = ranges.substr(pos, comma - pos);
    const size_t dash = range.find('-');
    const std::string_view lo_s = range.substr(0, dash);
    const std::string_view hi_s = dash == std::string_view::npos ? lo_s : range.substr(dash + 1);
    const int64_t lo = parse_bound(lo_s, list, variable);
    const int64_t hi = parse_bound(hi_s, list, variable);
    DIFFMOE_CHECK(lo <= hi, "[launch] {}='{}': range '{}' runs backwards", variable, list, range);
    const size_t width = lo_s.size();  // "003" keeps three digits
    for (int64_t i = lo; i <= hi; ++i) {
      std::string num = std::to_string(i);
      if (num.size() < width) num.insert(0, width - num.size(), '0');
      expand_expression(rest, prefix + std::string(head) + num, list, variable, out);
    }
    pos = comma + 1;
  }
}

}  // namespace

std::string_view launch_kind_name(LaunchKind k) {
  switch (k) {
    case LaunchKind::kSingle: return "single";
    case LaunchKind::kTorchrun: return "torchrun";
    case LaunchKind::kOpenMpi: return "mpirun";
    case LaunchKind::kSlurm: return "srun";
    case LaunchKind::kPmi: return "pmi";
  }
  return "?";
}

std::string_view transport_name(Transport t) {
  switch (t) {
    case Transport::kNone: return "none";
    case Transport::kMpi: return "mpi";
    case Transport::kStore: return "store";
  }
  return "?";
}

std::string Launch::describe() const {
  std::string s =
      fmt::format("{}: rank {} of {} (local {} of {})", launch_kind_name(kind), rank, world, local_rank, local_world);
  if (transport == Transport::kStore) s += fmt::format(", store {}:{}", master_addr, master_port);
  if (transport == Transport::kMpi) s += ", MPI";
  return s;
}

EnvReader process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

Launch detect_launch(const EnvReader& env) {
  if (env("RANK") || env("WORLD_SIZE")) return detect_torchrun(env);
  if (env("OMPI_COMM_WORLD_RANK") || env("OMPI_COMM_WORLD_SIZE")) return detect_openmpi(env);
  if (env("SLURM_PROCID")) return detect_slurm(env);
  if (env("PMI_RANK") || env("PMI_SIZE")) return detect_pmi(env);
  return Launch{};
}

std::chrono::milliseconds dist_timeout(const EnvReader& env) {
  const auto v = env("DIFFMOE_DIST_TIMEOUT_S");
  if (!v) return kDefaultTimeout;
  double s = 0;
  const char* b = v->data();
  const char* e = b + v->size();
  const auto [end, ec] = std::from_chars(b, e, s);
  DIFFMOE_CHECK(!v->empty() && ec == std::errc() && end == e && std::isfinite(s) && s > 0 && s <= 1e7,
                "[launch] DIFFMOE_DIST_TIMEOUT_S='{}' is not a number of seconds in (0, 1e7]", *v);
  return std::chrono::milliseconds(std::max<int64_t>(1, std::llround(s * 1000.0)));
}

std::vector<std::string> expand_slurm_hostlist(std::string_view list, std::string_view variable) {
  DIFFMOE_CHECK(!list.empty(), "[launch] {} is empty", variable);
  std::vector<std::string> out;
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i <= list.size(); ++i) {
    const char c = i < list.size() ? list[i] : ',';
    if (c == '[') {
      DIFFMOE_CHECK(depth == 0, "[launch] {}='{}': nested '['", variable, list);
      ++depth;
    } else if (c == ']') {
      DIFFMOE_CHECK(depth == 1, "[launch] {}='{}': unbalanced ']'", variable, list);
      --depth;
    } else if (c == ',' && depth == 0) {
      const std::string_view expr = list.substr(start, i - start);
      DIFFMOE_CHECK(!expr.empty(), "[launch] {}='{}': empty host name", variable, list);
      DIFFMOE_CHECK(expr.front() != '[', "[launch] {}='{}': a host name starts with '['", variable, list);
      expand_expression(expr, "", list, variable, out);
      start = i + 1;
    } else if (c == ' ' || c == '\t' || c == '\n') {
      DIFFMOE_FAIL("[launch] {}='{}': whitespace in a host list", variable, list);
    }
  }
  DIFFMOE_CHECK(depth == 0, "[launch] {}='{}': unbalanced '['", variable, list);
  return out;
}

std::string slurm_first_host(std::string_view list, std::string_view variable) {
  return expand_slurm_hostlist(list, variable).front();
}

std::vector<int> expand_slurm_tasks_per_node(std::string_view spec, std::string_view variable) {
  DIFFMOE_CHECK(!spec.empty(), "[launch] {} is empty", variable);
  std::vector<int> out;
  size_t pos = 0;
  while (pos <= spec.size()) {
    const size_t comma = std::min(spec.find(',', pos), spec.size());
    const std::string_view item = spec.substr(pos, comma - pos);
    const size_t paren = item.find('(');
    const std::string count_s(item.substr(0, paren));
    const int count = parse_int(std::string(variable), count_s, 1, kMaxRanks);
    int repeat = 1;
    if (paren != std::string_view::npos) {
      const std::string_view rep = item.substr(paren);
      DIFFMOE_CHECK(rep.size() > 3 && rep.substr(0, 2) == "(x" && rep.back() == ')',
                    "[launch] {}='{}': bad repeat '{}'", variable, spec, rep);
      repeat = parse_int(std::string(variable), std::string(rep.substr(2, rep.size() - 3)), 1, kMaxRanks);
    }
    DIFFMOE_CHECK(out.size() + static_cast<size_t>(repeat) <= kMaxHosts, "[launch] {}: more than {} nodes", variable,
                  kMaxHosts);
    out.insert(out.end(), static_cast<size_t>(repeat), count);
    pos = comma + 1;
  }
  return out;
}

}  // namespace diffmoe::dist
