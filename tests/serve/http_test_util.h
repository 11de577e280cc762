// Helpers of the HTTP tests: the `diffmoe serve` process (started on a free port, stopped with a
// signal), clients over loopback (curl as a subprocess, a raw socket that can hang up mid-stream),
// and the parsing of SSE bodies.
#pragma once
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <atomic>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace diffmoe::serve::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

inline std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Proc {
  int exit_code = -1;  // -1: killed by a signal or not run
  std::string out;     // standard output (standard error goes to err_file)
};

// Runs argv to completion with stdout captured (and stderr into err_file, when given).
inline Proc run_process(const std::vector<std::string>& argv, const fs::path& dir, const fs::path& err_file = {},
                        const std::vector<std::string>& env = {}) {
  static int counter = 0;
  const fs::path out_file = dir / ("proc-out-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int out = ::open(out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = err_file.empty() ? ::open("/dev/null", O_WRONLY)
                                     : ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(out, STDOUT_FILENO);
    ::dup2(err, STDERR_FILENO);
    for (const std::string& e : env) ::putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  Proc p{.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1, .out = read_text(out_file)};
  std::error_code ec;
  fs::remove(out_file, ec);
  return p;
}

#ifdef DIFFMOE_BIN
// The server process: `diffmoe serve ... --port 0 --port-file`, waiting until it listens.
class ServerProcess {
 public:
  ServerProcess(const std::vector<std::string>& args, const fs::path& dir) : log_(dir / "server.log") {
    const fs::path port_file = dir / "port";
    std::error_code ec;
    fs::remove(port_file, ec);
    pid_ = ::fork();
    if (pid_ == 0) {
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
      // The CPU backend's OpenMP workers otherwise spin between the engine's many small parallel
      // regions and starve the HTTP threads on a small, shared machine: measured 2-3 s instead of
      // 0.02 s per 24-token request on the 2-core CI box (docs/serving.md, "CPU serving").
      ::setenv("OMP_WAIT_POLICY", "passive", 0);
      std::vector<std::string> a = {DIFFMOE_BIN, "serve", "--port", "0", "--port-file", port_file.string()};
      a.insert(a.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (std::string& s : a) argv.push_back(s.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    for (int i = 0; i < 600 && !fs::exists(port_file); ++i) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (fs::exists(port_file)) port_ = std::stoi(read_text(port_file));
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::string log() const { return read_text(log_); }
  // Sends `sig` and waits for the exit; the exit code, or −1 after a signal or a 60 s timeout.
  int stop(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    for (int i = 0; i < 1200; ++i) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }

 private:
  fs::path log_;
  pid_t pid_ = -1;
  int port_ = -1;
};
#endif  // DIFFMOE_BIN

struct HttpResult {
  int status = 0;  // HTTP status (0: no response)
  std::string body;
};

// curl METHOD url [body]: the status and body. `extra` adds curl options.
inline HttpResult curl(const fs::path& dir, const std::string& method, const std::string& url,
                       const std::string& body = "", std::vector<std::string> extra = {}) {
  static std::atomic<int> counter{0};  // clients run on several threads: each call its own files
  const fs::path body_file = dir / ("curl-body-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::vector<std::string> argv = {"curl",       "-s",
                                   "-S",         "-N",
                                   "-X",         method,
                                   "-o",         body_file.string(),
                                   "-w",         "%{http_code}",
                                   "-H",         "Content-Type: application/json",
                                   "--max-time", "60"};
  if (!body.empty()) {
    std::string in = body_file.string();  // (not "@" + s: GCC 12's -Wrestrict false positive)
    in += ".in";
    std::ofstream(in, std::ios::binary) << body;
    argv.push_back("--data-binary");
    argv.push_back('@' + in);
  }
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.push_back(url);
  const Proc p = run_process(argv, dir);
  HttpResult r{.status = p.out.empty() ? 0 : std::atoi(p.out.c_str()), .body = read_text(body_file)};
  std::error_code ec;
  fs::remove(body_file, ec);
  fs::remove(body_file.string() + ".in", ec);
  return r;
}

// The JSON objects of an SSE body ("data: {...}" frames), and whether it ended with "data: [DONE]".
struct SseBody {
  std::vector<json> events;
  bool done = false;
  bool clean = true;  // every frame was a data line or a comment, and nothing followed [DONE]
};
inline SseBody parse_sse(const std::string& body) {
  SseBody s;
  size_t at = 0;
  while (at < body.size()) {
    size_t end = body.find("\n\n", at);
    if (end == std::string::npos) {
      s.clean = false;
      break;
    }
    const std::string frame = body.substr(at, end - at);
    at = end + 2;
    if (frame.starts_with(":")) continue;
    if (!frame.starts_with("data: ") || s.done) {
      s.clean = false;
      continue;
    }
    const std::string data = frame.substr(6);
    if (data == "[DONE]") s.done = true;
    else s.events.push_back(json::parse(data));
  }
  return s;
}

// A raw HTTP/1.1 POST over a socket, kept open until close(): a client that can stay connected
// without reading, or hang up mid-stream.
class RawStream {
 public:
  RawStream(int port, const std::string& path, const std::string& body) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      close();
      return;
    }
    const std::string req = "POST " + path +
                            " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    if (::send(fd_, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) close();
  }
  ~RawStream() { close(); }
  RawStream(const RawStream&) = delete;
  RawStream& operator=(const RawStream&) = delete;
  // Reads until `until` appears (or the connection ends); returns everything read so far.
  const std::string& read_until(const std::string& until) {
    char buf[4096];
    while (fd_ >= 0 && got_.find(until) == std::string::npos) {
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) break;
      got_.append(buf, static_cast<size_t>(n));
    }
    return got_;
  }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  std::string got_;
};

// The body of a raw HTTP/1.1 response (status line and headers dropped), de-chunked when the
// response uses chunked transfer encoding.
inline std::string http_body(const std::string& response) {
  const size_t head_end = response.find("\r\n\r\n");
  if (head_end == std::string::npos) return "";
  const std::string head = response.substr(0, head_end);
  std::string rest = response.substr(head_end + 4);
  if (head.find("Transfer-Encoding: chunked") == std::string::npos) return rest;
  std::string body;
  size_t at = 0;
  while (at < rest.size()) {
    const size_t eol = rest.find("\r\n", at);
    if (eol == std::string::npos) break;
    const size_t n = std::stoul(rest.substr(at, eol - at), nullptr, 16);
    if (n == 0) break;
    body += rest.substr(eol + 2, n);
    at = eol + 2 + n + 2;
  }
  return body;
}

// Reads until `until` appears in the response, then hangs up (a client that goes away mid-stream).
inline std::string post_and_hang_up(int port, const std::string& path, const std::string& body,
                                    const std::string& until) {
  RawStream s(port, path, body);
  return s.read_until(until);
}

}  // namespace diffmoe::serve::test
