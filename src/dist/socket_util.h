// POSIX TCP helpers of the rendezvous store (tcp_store.h): whole reads and writes with a deadline,
// connecting with retries while the server is not up yet, listening. Failures throw Error with the
// caller's `what` (which names the store and the operation) and the errno text.
#pragma once
#include <chrono>
#include <cstddef>
#include <string>

namespace diffmoe::dist {

using Clock = std::chrono::steady_clock;

// An owned file descriptor, closed on destruction.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket();
  Socket(Socket&& o) noexcept : fd_(o.release()) {}
  Socket& operator=(Socket&& o) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd() const { return fd_; }
  int release() {
    const int f = fd_;
    fd_ = -1;
    return f;
  }
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// Connects to host:port, retrying refused/unreachable connections until `deadline` (the server may
// not listen yet). TCP_NODELAY is set: requests are small and latency-bound.
Socket connect_tcp(const std::string& host, int port, Clock::time_point deadline, const std::string& what);

// Listens on all interfaces (IPv4) at `port` (0: any free port); returns the socket and the port.
Socket listen_tcp(int port, int* bound_port, const std::string& what);

// Writes all bytes (MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE). Throws on failure.
void send_all(int fd, const void* data, size_t n, const std::string& what);

enum class RecvResult { kOk, kClosed, kTimeout };
// Reads exactly n bytes before `deadline`; kClosed when the peer closed the connection first.
RecvResult recv_all(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what);

}  // namespace diffmoe::dist
