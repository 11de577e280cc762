// Multi-process end-to-end helpers: `diffmoe train` on several CPU ranks, launched by mpirun (Open
// MPI) or torchrun-style (one process per rank with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT: the TCP store and Gloo, docs/parallelism.md §1), and comparisons of
// what the runs leave behind (metrics.jsonl rows, the state shards of checkpoints).
#pragma once
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <map>

#include "e2e_util.h"
#include "io/checkpoint.h"
#include "model/parameters.h"
#include "train/sharded_state.h"

#ifndef DIFFMOE_MPIRUN
#error "DIFFMOE_MPIRUN (the path of Open MPI's mpirun) must be defined by the build"
#endif

namespace diffmoe::e2e {

// We run as root in CI: Open MPI refuses without the first two. One thread per rank (the ranks
// oversubscribe the cores). DIFFMOE_DIST_TIMEOUT_S bounds a collective a dead peer never joins.
inline std::vector<std::pair<std::string, std::string>> dist_env(int timeout_s = 20) {
  return {{"OMPI_ALLOW_RUN_AS_ROOT", "1"},
          {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
          {"OMP_NUM_THREADS", "1"},
          {"DIFFMOE_DIST_TIMEOUT_S", std::to_string(timeout_s)}};
}

// `mpirun -np N diffmoe ...`
inline RunOptions mpirun_options(int np, const fs::path& cwd, int dist_timeout_s = 20) {
  RunOptions o;
  o.cwd = cwd;
  o.launcher = {DIFFMOE_MPIRUN, "--oversubscribe", "--bind-to", "none", "-np", std::to_string(np)};
  o.env = dist_env(dist_timeout_s);
  return o;
}

// A port that was free a moment ago (the kernel's pick for port 0 on the loopback interface).
inline int free_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  const bool ok = s >= 0 && ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
                  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  if (s >= 0) ::close(s);
  EXPECT_TRUE(ok) << "test harness: no free port: " << std::strerror(errno);
  return ntohs(a.sin_port);
}

// `diffmoe args...` as `np` processes with torchrun's variables, not waited for; rank r is [r].
inline std::vector<Child> spawn_torchrun(int np, const std::vector<std::string>& args, const fs::path& cwd,
                                         int dist_timeout_s = 20) {
  const int port = free_port();
  std::vector<Child> ranks;
  for (int r = 0; r < np; ++r) {
    RunOptions o;
    o.cwd = cwd;
    o.env = dist_env(dist_timeout_s);
    for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{{"RANK", std::to_string(r)},
                                                                               {"WORLD_SIZE", std::to_string(np)},
                                                                               {"LOCAL_RANK", std::to_string(r)},
                                                                               {"LOCAL_WORLD_SIZE", std::to_string(np)},
                                                                               {"MASTER_ADDR", "127.0.0.1"},
                                                                               {"MASTER_PORT", std::to_string(port)}})
      o.env.emplace_back(k, v);
    ranks.push_back(spawn_diffmoe(args, o));
  }
  return ranks;
}

inline std::vector<RunResult> wait_all(std::vector<Child>& ranks) {
  std::vector<RunResult> out;
  for (Child& c : ranks) out.push_back(wait_diffmoe(c));
  return out;
}

// Every rank's output, labelled, for failure messages.
inline std::string describe_all(const std::vector<RunResult>& rs) {
  std::string s;
  for (size_t r = 0; r < rs.size(); ++r) s += fmt::format("===== rank {} =====\n{}\n", r, rs[r].describe());
  return s;
}

// The process id of MPI rank `rank` among the children of `mpirun` (Open MPI starts the ranks of a
// one-node job itself); -1 when not (yet) found.
inline pid_t mpirun_rank_pid(pid_t mpirun, int rank) {
  DIR* d = ::opendir("/proc");
  if (d == nullptr) return -1;
  pid_t found = -1;
  const std::string want = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  for (dirent* e; found < 0 && (e = ::readdir(d)) != nullptr;) {
    const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
    if (pid <= 0) continue;
    const std::string stat = read_file(fmt::format("/proc/{}/stat", pid));
    const size_t close = stat.rfind(')');  // "pid (comm) state ppid ..."
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 1));
    std::string state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != mpirun) continue;
    const std::string env = read_file(fmt::format("/proc/{}/environ", pid));
    for (size_t at = 0; at < env.size();) {
      const size_t end = env.find('\0', at);
      if (env.compare(at, (end == std::string::npos ? env.size() : end) - at, want) == 0) found = pid;
      if (end == std::string::npos) break;
      at = end + 1;
    }
  }
  ::closedir(d);
  return found;
}

// kind == "train" / "val" rows of a metrics.jsonl, by step (a step logged twice keeps the later row).
inline std::map<int64_t, nlohmann::json> metric_rows(const fs::path& metrics, const std::string& kind) {
  std::map<int64_t, nlohmann::json> m;
  for (const auto& r : read_jsonl(metrics))
    if (r.at("kind") == kind) m[r.at("step").get<int64_t>()] = r;
  return m;
}

// The largest "train" step of a metrics.jsonl another process may be writing (a torn last line is
// skipped); 0 when none.
inline int64_t last_logged_step(const fs::path& metrics) {
  int64_t last = 0;
  for (const auto& line : split_lines(read_file(metrics))) {
    const auto row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (row.is_object() && row.value("kind", "") == "train" && row.contains("step") && row["step"].is_number_integer())
      last = std::max(last, row["step"].get<int64_t>());
  }
  return last;
}

inline double rel_diff(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-300); }

// The largest, over every parameter of two checkpoints (whatever layouts wrote them), of
// ‖a − b‖ / ‖b‖ of its masters, its first and its second Adam moments, and of the balancing biases;
// `where` names the worst.
struct StateDiff {
  double worst = 0;
  std::string where;
};
inline StateDiff compare_states(const fs::path& a_dir, const fs::path& b_dir) {
  const StateReader a(a_dir.string()), b(b_dir.string());
  EXPECT_TRUE(a.has_moments() && b.has_moments());
  StateDiff d;
  std::vector<double> va, vb;
  for (const ParamSpec& p : parameter_specs(b.config())) {
    using K = StateReader::Kind;
    const std::vector<K> kinds =
        p.trainable() ? std::vector<K>{K::kMaster, K::kMoment1, K::kMoment2} : std::vector<K>{K::kBuffer};
    const int64_t n = b.numel(p.name);
    va.resize(static_cast<size_t>(n));
    vb.resize(static_cast<size_t>(n));
    for (const K k : kinds) {
      a.read(k, p.name, 0, n, va.data());
      b.read(k, p.name, 0, n, vb.data());
      double err2 = 0, ref2 = 0;
      for (size_t i = 0; i < va.size(); ++i) {
        err2 += (va[i] - vb[i]) * (va[i] - vb[i]);
        ref2 += vb[i] * vb[i];
      }
      const double e = err2 == 0 ? 0 : std::sqrt(err2 / std::max(ref2, 1e-300));
      if (d.where.empty() || e > d.worst) {
        d.worst = e;
        d.where = fmt::format("{} ({})", p.name,
                              k == K::kMaster    ? "master"
                              : k == K::kMoment1 ? "m"
                              : k == K::kMoment2 ? "v"
                                                 : "buffer");
      }
    }
  }
  return d;
}

}  // namespace diffmoe::e2e
