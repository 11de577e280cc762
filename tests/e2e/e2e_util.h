// End-to-end test helpers: run the real `diffmoe` binary as a subprocess (exit status, signal,
// stdout and stderr captured), a temporary directory per test, a generated pseudo-English corpus,
// a micro model config (trains in well under a second a step on two cores), and readers for what
// a run leaves behind (metrics.jsonl, TensorBoard files, checkpoints).
#pragma once
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "io/safetensors.h"

#ifndef DIFFMOE_BIN
#error "DIFFMOE_BIN (the path of the diffmoe binary) must be defined by the build"
#endif

namespace diffmoe::e2e {

namespace fs = std::filesystem;

inline std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << "cannot write " << p;
}

inline std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> lines;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

// ---- Running the binary -------------------------------------------------------------------------

struct RunResult {
  std::vector<std::string> launcher;  // the command in front of diffmoe (e.g. mpirun -np 2), if any
  std::vector<std::string> args;
  bool exited = false;  // WIFEXITED: false means a signal (a crash) or our timeout kill
  int code = -1;        // WEXITSTATUS
  int signal = 0;       // WTERMSIG when !exited
  bool timed_out = false;
  std::string out, err;

  std::string describe() const {
    std::string cmd;
    for (const auto& a : launcher) cmd += a + " ";
    cmd += "diffmoe";
    for (const auto& a : args) cmd += " " + a;
    std::string how = exited ? "exit " + std::to_string(code)
                             : "killed by signal " + std::to_string(signal) + " (" + strsignal(signal) + ")" +
                                   (timed_out ? " after the test's timeout" : "");
    return "$ " + cmd + "\n-> " + how + "\n--- stdout ---\n" + out + "\n--- stderr ---\n" + err;
  }
};

struct RunOptions {
  fs::path cwd;                    // working directory of the child (default: the test's)
  std::string stdin_text;          // fed on standard input (otherwise /dev/null)
  rlim_t fsize_limit = 0;          // RLIMIT_FSIZE in bytes for the child (0: unchanged); SIGXFSZ ignored
  rlim_t address_space_limit = 0;  // RLIMIT_AS in bytes for the child (0: unchanged): host allocations fail
  int timeout_s = 120;
  std::vector<std::string> launcher;                     // run `launcher... DIFFMOE_BIN args...` (e.g. mpirun -np 2)
  std::vector<std::pair<std::string, std::string>> env;  // set in the child's environment
};
inline RunOptions with_stdin(std::string text) {
  RunOptions o;
  o.stdin_text = std::move(text);
  return o;
}
inline RunOptions in_dir(const fs::path& cwd) {
  RunOptions o;
  o.cwd = cwd;
  return o;
}
inline RunOptions with_fsize_limit(rlim_t bytes) {
  RunOptions o;
  o.fsize_limit = bytes;
  return o;
}

// A running `diffmoe` (spawn_diffmoe): its pid, and the files its stdout and stderr go to.
struct Child {
  pid_t pid = -1;
  std::vector<std::string> launcher, args;
  std::string out_path, err_path, in_path;
  int timeout_s = 120;
  std::chrono::steady_clock::time_point started;
  std::string out() const { return read_file(out_path); }  // what it printed so far
  std::string err() const { return read_file(err_path); }
};

// fork + execve of DIFFMOE_BIN (after opt.launcher's command, an absolute path), not waited for;
// stdout and stderr go to files (no pipe deadlocks).
inline Child spawn_diffmoe(std::vector<std::string> args, const RunOptions& opt = {}) {
  Child c;
  c.launcher = opt.launcher;
  c.args = args;
  c.timeout_s = opt.timeout_s;
  char out_tpl[] = "/tmp/diffmoe-e2e-out-XXXXXX", err_tpl[] = "/tmp/diffmoe-e2e-err-XXXXXX",
       in_tpl[] = "/tmp/diffmoe-e2e-in-XXXXXX";
  const int out_fd = ::mkstemp(out_tpl), err_fd = ::mkstemp(err_tpl), in_fd = ::mkstemp(in_tpl);
  c.out_path = out_tpl;
  c.err_path = err_tpl;
  c.in_path = in_tpl;
  if (out_fd < 0 || err_fd < 0 || in_fd < 0) {
    ADD_FAILURE() << "test harness: mkstemp failed: " << std::strerror(errno);
    return c;
  }
  if (!opt.stdin_text.empty() &&
      ::write(in_fd, opt.stdin_text.data(), opt.stdin_text.size()) != static_cast<ssize_t>(opt.stdin_text.size()))
    ADD_FAILURE() << "test harness: cannot write stdin file";
  ::lseek(in_fd, 0, SEEK_SET);

  std::vector<std::string> argv_store = opt.launcher;
  argv_store.push_back(DIFFMOE_BIN);
  argv_store.insert(argv_store.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_store) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The child's environment: ours with opt.env set (built here: the child may only exec).
  std::vector<std::string> env_store;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const std::string name = kv.substr(0, kv.find('='));
    if (std::none_of(opt.env.begin(), opt.env.end(), [&](const auto& p) { return p.first == name; }))
      env_store.push_back(kv);
  }
  for (const auto& [k, v] : opt.env) env_store.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);

  c.started = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {  // child: only async-signal-safe calls until exec
    if (!opt.cwd.empty() && ::chdir(opt.cwd.c_str()) != 0) ::_exit(126);
    ::dup2(in_fd, STDIN_FILENO);
    ::dup2(out_fd, STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);
    if (opt.fsize_limit > 0) {
      ::signal(SIGXFSZ, SIG_IGN);  // stays ignored across exec: writes fail with EFBIG instead
      const struct rlimit lim = {opt.fsize_limit, opt.fsize_limit};
      if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(126);
    }
    if (opt.address_space_limit > 0) {
      const struct rlimit lim = {opt.address_space_limit, opt.address_space_limit};
      if (::setrlimit(RLIMIT_AS, &lim) != 0) ::_exit(126);
    }
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  ::close(out_fd);
  ::close(err_fd);
  ::close(in_fd);
  c.pid = pid;
  return c;
}

// Waits for `c` (killing it with SIGKILL past its timeout) and collects what it printed.
inline RunResult wait_diffmoe(Child& c) {
  RunResult r;
  r.launcher = c.launcher;
  r.args = c.args;
  int status = 0;
  if (c.pid > 0) {
    const auto deadline = c.started + std::chrono::seconds(c.timeout_s);
    for (;;) {
      const pid_t w = ::waitpid(c.pid, &status, WNOHANG);
      if (w == c.pid) break;
      if (w < 0 && errno != EINTR) break;
      if (std::chrono::steady_clock::now() > deadline && !r.timed_out) {
        r.timed_out = true;
        ::kill(c.pid, SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    r.exited = WIFEXITED(status);
    r.code = r.exited ? WEXITSTATUS(status) : -1;
    r.signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    c.pid = -1;
  }
  r.out = read_file(c.out_path);
  r.err = read_file(c.err_path);
  ::unlink(c.out_path.c_str());
  ::unlink(c.err_path.c_str());
  ::unlink(c.in_path.c_str());
  return r;
}

// Runs `diffmoe args...` to completion.
inline RunResult run_diffmoe(std::vector<std::string> args, const RunOptions& opt = {}) {
  Child c = spawn_diffmoe(std::move(args), opt);
  return wait_diffmoe(c);
}

// Polls `ready` every 10 ms until it holds (true) or `timeout_s` passes (false).
template <class Pred>
bool wait_until(Pred ready, double timeout_s = 60) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (!ready()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// Exit 0, no signal.
#define E2E_EXPECT_OK(r)                                    \
  do {                                                      \
    const ::diffmoe::e2e::RunResult& r_ = (r);              \
    ASSERT_TRUE(r_.exited) << "crashed\n" << r_.describe(); \
    ASSERT_EQ(r_.code, 0) << r_.describe();                 \
  } while (0)

// The failure contract of the binary: a normal exit (never a signal) with a non-zero status, and on
// stderr exactly one line starting with "error: " that contains every needle; any other stderr
// line must be a "warning: " line (so a multi-line error or a stack dump fails the test).
// Returns the error line.
inline std::string expect_clean_error(const RunResult& r, const std::vector<std::string>& needles) {
  EXPECT_TRUE(r.exited) << "the binary crashed instead of failing cleanly\n" << r.describe();
  if (!r.exited) return "";
  EXPECT_NE(r.code, 0) << "expected a non-zero exit\n" << r.describe();
  std::vector<std::string> errors;
  for (const auto& line : split_lines(r.err)) {
    if (line.rfind("error: ", 0) == 0) {
      errors.push_back(line);
    } else if (!line.empty()) {
      EXPECT_EQ(line.rfind("warning: ", 0), 0u) << "unexpected stderr line: " << line << "\n" << r.describe();
    }
  }
  EXPECT_EQ(errors.size(), 1u) << "expected exactly one 'error: ' line\n" << r.describe();
  if (errors.empty()) return "";
  if (std::getenv("DIFFMOE_E2E_VERBOSE")) std::fprintf(stderr, "[e2e] %s\n", errors[0].c_str());
  for (const auto& n : needles)
    EXPECT_NE(errors[0].find(n), std::string::npos) << "the error does not name '" << n << "'\n" << r.describe();
  return errors[0];
}

// ---- Inputs ----------------------------------------------------------------------------------

// Deterministic pseudo-English: sentences of common words, paragraphs separated by blank lines.
inline std::string pseudo_english(size_t bytes, uint64_t seed = 42) {
  static const char* kWords[] = {
      "the",      "of",       "and",    "to",     "a",         "in",         "that",    "was",     "he",
      "she",      "it",       "his",    "her",    "with",      "as",         "had",     "for",     "not",
      "be",       "but",      "at",     "on",     "you",       "is",         "have",    "which",   "by",
      "so",       "all",      "this",   "from",   "they",      "were",       "would",   "no",      "been",
      "one",      "more",     "said",   "there",  "could",     "very",       "what",    "them",    "when",
      "some",     "any",      "sea",    "ship",   "whale",     "captain",    "sister",  "house",   "letter",
      "morning",  "evening",  "garden", "window", "dinner",    "walked",     "looked",  "thought", "replied",
      "believed", "wondered", "little", "great",  "young",     "old",        "long",    "perhaps", "always",
      "never",    "again",    "before", "after",  "nothing",   "everything", "heart",   "mind",    "family",
      "friend",   "London",   "Bath",   "Emma",   "Elizabeth", "Ahab",       "Ishmael", "Fanny",   "Catherine",
      "Mr.",      "Mrs.",     "Miss"};
  constexpr size_t kN = sizeof(kWords) / sizeof(kWords[0]);
  uint64_t s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  auto next = [&](uint64_t n) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (s >> 33) % n;
  };
  std::string text;
  text.reserve(bytes + 256);
  while (text.size() < bytes) {
    const uint64_t sentences = 2 + next(5);
    for (uint64_t i = 0; i < sentences; ++i) {
      const uint64_t words = 4 + next(12);
      for (uint64_t w = 0; w < words; ++w) {
        std::string word = kWords[next(kN)];
        if (w == 0) word[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(word[0])));
        text += word;
        text += (w + 1 == words) ? (next(6) == 0 ? "?" : ".") : (next(9) == 0 ? ", " : " ");
      }
      text += ' ';
    }
    text.back() = '\n';
    text += '\n';
  }
  return text;
}

// A two-level YAML document (section -> key -> raw scalar text), written in insertion order.
class Yaml {
 public:
  void set(const std::string& dotted, const std::string& raw) {
    const auto dot = dotted.find('.');
    const std::string section = dotted.substr(0, dot), key = dotted.substr(dot + 1);
    auto sec = std::find_if(sections_.begin(), sections_.end(), [&](const auto& s) { return s.first == section; });
    if (sec == sections_.end()) sec = sections_.insert(sections_.end(), {section, {}});
    auto kv = std::find_if(sec->second.begin(), sec->second.end(), [&](const auto& p) { return p.first == key; });
    if (kv == sec->second.end()) sec->second.emplace_back(key, raw);
    else kv->second = raw;
  }
  void set_path(const std::string& dotted, const fs::path& p) {
    std::string quoted = "'";  // (not "'" + s: GCC 12's -Wrestrict false positive)
    quoted += p.string();
    quoted += '\'';
    set(dotted, quoted);
  }
  std::string str() const {
    std::string s = "# written by test_e2e\n";
    for (const auto& [section, kvs] : sections_) {
      s += section + ":\n";
      for (const auto& [k, v] : kvs) s += "  " + k + ": " + v + "\n";
    }
    return s;
  }

 private:
  std::vector<std::pair<std::string, std::vector<std::pair<std::string, std::string>>>> sections_;
};

// The micro model and a run over `dir`: corpus.txt, tokenizer.json and shards/ shared by the
// runs of one test (made by the first), the run itself in `out_dir`.
inline Yaml micro_config(const fs::path& dir, const fs::path& out_dir) {
  Yaml y;
  for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{{"vocab_size", "300"},
                                                                             {"dim", "32"},
                                                                             {"n_layers", "2"},
                                                                             {"n_dense_layers", "1"},
                                                                             {"n_heads", "2"},
                                                                             {"q_lora_rank", "16"},
                                                                             {"kv_lora_rank", "16"},
                                                                             {"qk_nope_head_dim", "8"},
                                                                             {"qk_rope_head_dim", "8"},
                                                                             {"v_head_dim", "8"},
                                                                             {"inter_dim", "64"},
                                                                             {"moe_inter_dim", "16"},
                                                                             {"n_routed_experts", "4"},
                                                                             {"n_shared_experts", "1"},
                                                                             {"n_activated_experts", "2"},
                                                                             {"n_expert_groups", "2"},
                                                                             {"n_limited_groups", "1"},
                                                                             {"max_seq_len", "32"}})
    y.set("model." + k, v);
  y.set_path("tokenizer.path", dir / "tokenizer.json");
  y.set_path("tokenizer.train_inputs", dir / "corpus.txt");
  y.set("tokenizer.vocab_size", "300");
  y.set_path("data.inputs", dir / "corpus.txt");
  y.set_path("data.shards", dir / "shards");
  y.set("data.val_fraction", "0.1");
  y.set("data.doc_bytes", "2048");
  y.set_path("train.out_dir", out_dir);
  y.set("train.seed", "1234");
  y.set("train.micro_batch", "4");
  y.set("train.seq_len", "32");
  y.set("train.max_steps", "8");
  y.set("train.log_every", "1");
  y.set("optim.lr", "3.0e-3");
  y.set("optim.min_lr", "3.0e-4");
  y.set("optim.warmup_steps", "2");
  y.set("optim.weight_decay", "0.1");
  y.set("optim.grad_clip", "1.0");
  y.set("eval.every", "4");
  y.set("eval.batches", "2");
  y.set("checkpoint.every", "4");
  y.set("checkpoint.keep_last", "3");
  y.set("log.progress", "lines");
  return y;
}

// A fixture with its own temporary directory (kept, and its path printed, when the test fails)
// holding corpus.txt.
class E2E : public ::testing::Test {
 protected:
  void SetUp() override {
    char tpl[] = "/tmp/diffmoe-e2e-XXXXXX";
    ASSERT_NE(::mkdtemp(tpl), nullptr) << std::strerror(errno);
    dir_ = tpl;
    write_file(dir_ / "corpus.txt", pseudo_english(160 * 1024));
  }
  void TearDown() override {
    if (HasFailure() || std::getenv("DIFFMOE_E2E_KEEP")) {
      std::fprintf(stderr, "[e2e] kept %s\n", dir_.c_str());
      return;
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  // Writes `y` to <dir>/<name> and returns its path.
  fs::path write_config(const Yaml& y, const std::string& name = "config.yaml") {
    write_file(dir_ / name, y.str());
    return dir_ / name;
  }
  RunResult train(const fs::path& config, std::vector<std::string> extra = {}, const RunOptions& opt = {}) {
    std::vector<std::string> args = {"train", "--config", config.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    RunOptions o = opt;
    if (o.cwd.empty()) o.cwd = dir_;
    return run_diffmoe(args, o);
  }
  fs::path dir_;
};

// ---- Outputs ---------------------------------------------------------------------------------

inline std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::vector<nlohmann::json> rows;
  int n = 0;
  for (const auto& line : split_lines(read_file(p))) {
    ++n;
    try {
      rows.push_back(nlohmann::json::parse(line));
    } catch (const std::exception& e) {
      ADD_FAILURE() << p << ":" << n << ": not JSON: " << e.what() << "\n" << line;
    }
  }
  return rows;
}

inline std::vector<fs::path> list_dir(const fs::path& dir, const std::string& prefix = "") {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string().rfind(prefix, 0) == 0) out.push_back(it->path());
  std::sort(out.begin(), out.end());
  return out;
}

// Number of non-finite F32/F64 values over every tensor of a safetensors file.
// The training state file a one-rank run writes into each checkpoint (docs/formats.md §4.2).
inline constexpr const char* kShard0 = "shard-00000-of-00001.safetensors";

inline int64_t count_non_finite(const fs::path& p) {
  const SafetensorsFile f = SafetensorsFile::open(p.string());
  int64_t bad = 0;
  for (const auto& name : f.names()) {
    const SafetensorsEntry& e = f.get(name);
    if (e.dtype == DType::kF32) {
      const auto* v = static_cast<const float*>(e.data);
      for (size_t i = 0; i < e.nbytes / sizeof(float); ++i) bad += !std::isfinite(v[i]);
    } else if (e.dtype == DType::kF64) {
      const auto* v = static_cast<const double*>(e.data);
      for (size_t i = 0; i < e.nbytes / sizeof(double); ++i) bad += !std::isfinite(v[i]);
    }
  }
  return bad;
}

}  // namespace diffmoe::e2e
