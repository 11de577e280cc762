// A torchrun-style launcher and checker for the multi-process tests (tests/dist/CMakeLists.txt).
//
//   dist_launch --nproc N [options] -- PROGRAM ARGS...
//     starts N processes of PROGRAM with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//     MASTER_ADDR=127.0.0.1 and MASTER_PORT=<a free port>, as torchrun does on one machine.
//   dist_launch --raw [options] -- COMMAND ARGS...
//     runs COMMAND once as "rank 0" (e.g. mpirun -np 4 ...), to check its exit status and output.
// Options:
//   --expect ok|fail       ok: every process exits 0; fail: every process exits non-zero or is
//                          killed by a signal (default ok)
//   --output R=REGEX       process R's output (stdout and stderr) must match REGEX (ECMAScript,
//                          searched); R may be '*': every process without its own --output
//   --timeout S            every process must have exited within S seconds (default 60), else
//                          they are killed and the check fails (a hang)
//   --env NAME=VALUE       set in every process's environment
// Prints every process's output (prefixed "[rank R]"), its exit status, the elapsed time, then
// "dist_launch: ok" (exit 0) or the failed expectations (exit 1).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Options {
  int nproc = 1;
  bool raw = false;
  bool expect_ok = true;
  double timeout_s = 60;
  std::map<std::string, std::string> output;  // "0", "1", ..., "*" -> regex
  std::vector<std::pair<std::string, std::string>> env;
  std::vector<std::string> command;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "dist_launch: %s\nusage: dist_launch (--nproc N | --raw) [--expect ok|fail] [--output R=REGEX]... "
               "[--timeout S] [--env NAME=VALUE]... -- COMMAND ARGS...\n",
               why.c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  int i = 1;
  auto next = [&](const char* flag) -> std::string {
    if (i + 1 >= argc) usage(std::string(flag) + " needs a value");
    return argv[++i];
  };
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      for (++i; i < argc; ++i) o.command.emplace_back(argv[i]);
      break;
    }
    if (a == "--nproc") {
      o.nproc = std::atoi(next("--nproc").c_str());
    } else if (a == "--raw") {
      o.raw = true;
    } else if (a == "--expect") {
      const std::string v = next("--expect");
      if (v != "ok" && v != "fail") usage("--expect takes ok or fail");
      o.expect_ok = v == "ok";
    } else if (a == "--output") {
      const std::string v = next("--output");
      const size_t eq = v.find('=');
      if (eq == std::string::npos) usage("--output takes R=REGEX");
      o.output[v.substr(0, eq)] = v.substr(eq + 1);
    } else if (a == "--timeout") {
      o.timeout_s = std::atof(next("--timeout").c_str());
    } else if (a == "--env") {
      const std::string v = next("--env");
      const size_t eq = v.find('=');
      if (eq == std::string::npos) usage("--env takes NAME=VALUE");
      o.env.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    } else {
      usage("unknown argument " + a);
    }
  }
  if (o.command.empty()) usage("no command after --");
  if (o.raw) o.nproc = 1;
  if (o.nproc < 1) usage("--nproc must be at least 1");
  return o;
}

// A port that was free a moment ago (the kernel's pick for port 0 on the loopback interface).
int free_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (s < 0 || ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    std::perror("dist_launch: free port");
    std::exit(2);
  }
  const int port = ntohs(a.sin_port);
  ::close(s);
  return port;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return std::string("killed by signal ") + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) +
           ")";
  return "status " + std::to_string(status);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const int port = o.raw ? 0 : free_port();
  char dir_template[] = "/tmp/dist_launch.XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) {
    std::perror("dist_launch: mkdtemp");
    return 2;
  }
  const std::string dir = dir_template;
  const auto start = std::chrono::steady_clock::now();
  std::vector<pid_t> pids(static_cast<size_t>(o.nproc), -1);
  std::vector<std::string> logs(static_cast<size_t>(o.nproc));
  for (int r = 0; r < o.nproc; ++r) {
    logs[static_cast<size_t>(r)] = dir + "/rank" + std::to_string(r) + ".log";
    const pid_t pid = ::fork();
    if (pid < 0) {
      std::perror("dist_launch: fork");
      return 2;
    }
    if (pid == 0) {
      ::setpgid(0, 0);  // its own process group: a hang is killed with everything it started
      const int fd = ::open(logs[static_cast<size_t>(r)].c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0) std::_Exit(127);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
      for (const auto& [k, v] : o.env) ::setenv(k.c_str(), v.c_str(), 1);
      if (!o.raw) {
        ::setenv("RANK", std::to_string(r).c_str(), 1);
        ::setenv("WORLD_SIZE", std::to_string(o.nproc).c_str(), 1);
        ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
        ::setenv("LOCAL_WORLD_SIZE", std::to_string(o.nproc).c_str(), 1);
        ::setenv("MASTER_ADDR", "127.0.0.1", 1);
        ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      }
      std::vector<char*> args;
      for (const auto& a : o.command) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "dist_launch: cannot run %s: %s\n", args[0], std::strerror(errno));
      std::_Exit(127);
    }
    ::setpgid(pid, pid);
    pids[static_cast<size_t>(r)] = pid;
  }

  std::vector<int> status(static_cast<size_t>(o.nproc), -1);
  std::vector<double> exit_time(static_cast<size_t>(o.nproc), -1);
  int running = o.nproc;
  bool hung = false;
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  while (running > 0) {
    int st = 0;
    const pid_t pid = ::waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < o.nproc; ++r) {
        if (pids[static_cast<size_t>(r)] == pid) {
          status[static_cast<size_t>(r)] = st;
          exit_time[static_cast<size_t>(r)] = elapsed();
          --running;
        }
      }
      continue;
    }
    if (elapsed() > o.timeout_s) {
      hung = true;
      for (int r = 0; r < o.nproc; ++r)
        if (status[static_cast<size_t>(r)] == -1) ::kill(-pids[static_cast<size_t>(r)], SIGKILL);
      while (running > 0) {
        const pid_t p = ::waitpid(-1, &st, 0);
        if (p < 0) break;
        for (int r = 0; r < o.nproc; ++r)
          if (pids[static_cast<size_t>(r)] == p) --running;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  std::vector<std::string> failures;
  if (hung)
    failures.push_back("not every process exited within " + std::to_string(o.timeout_s) + " s (a hang): killed");
  for (int r = 0; r < o.nproc; ++r) {
    const auto i = static_cast<size_t>(r);
    const std::string out = read_file(logs[i]);
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) std::printf("[rank %d] %s\n", r, line.c_str());
    const std::string how = status[i] == -1 ? "still running (killed)" : describe_status(status[i]);
    std::printf("[rank %d] %s after %.2f s\n", r, how.c_str(), exit_time[i]);
    if (status[i] != -1) {
      const bool ok = WIFEXITED(status[i]) && WEXITSTATUS(status[i]) == 0;
      if (o.expect_ok && !ok) failures.push_back("rank " + std::to_string(r) + ": " + how + ", expected exit 0");
      if (!o.expect_ok && ok) failures.push_back("rank " + std::to_string(r) + ": exit 0, expected a failure");
    }
    auto it = o.output.find(std::to_string(r));
    if (it == o.output.end()) it = o.output.find("*");
    if (it != o.output.end() && !std::regex_search(out, std::regex(it->second)))
      failures.push_back("rank " + std::to_string(r) + ": output does not match /" + it->second + "/");
    std::remove(logs[i].c_str());
  }
  ::rmdir(dir.c_str());
  std::printf("dist_launch: %d process(es) in %.2f s\n", o.nproc, elapsed());
  if (failures.empty()) {
    std::printf("dist_launch: ok\n");
    return 0;
  }
  for (const auto& f : failures) std::printf("dist_launch: FAILED: %s\n", f.c_str());
  return 1;
}
