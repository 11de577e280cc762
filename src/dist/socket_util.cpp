#include "dist/socket_util.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace diffmoe::dist {
namespace {

int ms_until(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, 1 << 30));
}

// Errors that mean "nobody listens there yet" (or the name does not resolve yet, as in a cluster
// whose DNS entries appear with the job): retried until the deadline.
bool retryable(int err) {
  return err == ECONNREFUSED || err == ETIMEDOUT || err == ENETUNREACH || err == EHOSTUNREACH || err == ECONNRESET ||
         err == EINTR || err == EAGAIN;
}

}  // namespace

Socket::~Socket() {
  if (fd_ >= 0) ::close(fd_);
}

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}

Socket connect_tcp(const std::string& host, int port, Clock::time_point deadline, const std::string& what) {
  std::string last_error = "no attempt";
  auto pause = std::chrono::milliseconds(10);
  while (true) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const std::string port_s = std::to_string(port);
    const int gai = ::getaddrinfo(host.c_str(), port_s.c_str(), &hints, &res);
    if (gai != 0) {
      last_error = fmt::format("cannot resolve host: {}", gai_strerror(gai));
      if (gai != EAI_AGAIN && gai != EAI_NONAME) DIFFMOE_FAIL("{}: {}", what, last_error);
    } else {
      for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
        Socket s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
        if (!s) {
          last_error = std::strerror(errno);
          continue;
        }
        if (::connect(s.fd(), ai->ai_addr, ai->ai_addrlen) == 0) {
          ::freeaddrinfo(res);
          const int one = 1;
          ::setsockopt(s.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          return s;
        }
        const int err = errno;
        last_error = std::strerror(err);
        if (!retryable(err)) {
          ::freeaddrinfo(res);
          DIFFMOE_FAIL("{}: connect failed: {}", what, last_error);
        }
      }
      ::freeaddrinfo(res);
    }
    if (Clock::now() + pause >= deadline) break;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(500));
  }
  DIFFMOE_FAIL(
      "{}: could not connect before the timeout ({}); is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?", what,
      last_error);
}

Socket listen_tcp(int port, int* bound_port, const std::string& what) {
  Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  DIFFMOE_CHECK(s, "{}: socket: {}", what, std::strerror(errno));
  const int one = 1;
  ::setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  DIFFMOE_CHECK(::bind(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0,
                "{}: cannot listen on port {}: {}", what, port, std::strerror(errno));
  DIFFMOE_CHECK(::listen(s.fd(), 1024) == 0, "{}: listen on port {}: {}", what, port, std::strerror(errno));
  socklen_t len = sizeof(addr);
  DIFFMOE_CHECK(::getsockname(s.fd(), reinterpret_cast<sockaddr*>(&addr), &len) == 0, "{}: getsockname: {}", what,
                std::strerror(errno));
  *bound_port = ntohs(addr.sin_port);
  return s;
}

void send_all(int fd, const void* data, size_t n, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      DIFFMOE_FAIL("{}: send failed: {}", what, std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

RecvResult recv_all(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const int r = ::poll(&pfd, 1, ms_until(deadline));
    if (r < 0) {
      if (errno == EINTR) continue;
      DIFFMOE_FAIL("{}: poll failed: {}", what, std::strerror(errno));
    }
    if (r == 0) return RecvResult::kTimeout;
    const ssize_t got = ::recv(fd, p, n, 0);
    if (got == 0) return RecvResult::kClosed;
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == ECONNRESET) return RecvResult::kClosed;
      DIFFMOE_FAIL("{}: recv failed: {}", what, std::strerror(errno));
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
  return RecvResult::kOk;
}

}  // namespace diffmoe::dist
