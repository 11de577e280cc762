#include "dist/tcp_store_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"
#include "dist/tcp_store.h"
#include "dist/tcp_store_wire.h"

namespace diffmoe::dist {

StoreServer::StoreServer(int port, const std::string& what) {
  listen_ = listen_tcp(port, &port_, what);
  int p[2];
  DIFFMOE_CHECK(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0, "{}: pipe: {}", what, std::strerror(errno));
  wake_read_ = p[0];
  wake_write_ = p[1];
  thread_ = std::thread([this] { run(); });
}

StoreServer::~StoreServer() {
  const char c = 1;
  [[maybe_unused]] const ssize_t w = ::write(wake_write_, &c, 1);
  thread_.join();
  ::close(wake_read_);
  ::close(wake_write_);
}

void StoreServer::run() {
  std::vector<pollfd> fds;
  while (true) {
    fds.clear();
    fds.push_back({wake_read_, POLLIN, 0});
    fds.push_back({listen_.fd(), POLLIN, 0});
    for (const auto& [fd, c] : clients_) fds.push_back({fd, POLLIN, 0});
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;  // cannot happen with valid descriptors; clients then see the store closed
    }
    if (fds[0].revents != 0) return;
    if (fds[1].revents & POLLIN) accept_client();
    for (size_t i = 2; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      auto it = clients_.find(fds[i].fd);
      if (it == clients_.end()) continue;
      if (!read_client(it->second)) dead_.push_back(fds[i].fd);
    }
    while (!dead_.empty()) {
      const int fd = dead_.back();
      dead_.pop_back();
      drop(fd);
    }
  }
}

void StoreServer::accept_client() {
  const int fd = ::accept4(listen_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) return;  // the client gave up already, or out of descriptors: it retries or times out
  clients_[fd].sock = Socket(fd);
}

bool StoreServer::read_client(Client& c) {
  char buf[65536];
  const ssize_t got = ::recv(c.sock.fd(), buf, sizeof(buf), MSG_DONTWAIT);
  if (got == 0) return false;
  if (got < 0) return errno == EINTR || errno == EAGAIN;
  c.in.insert(c.in.end(), buf, buf + got);
  size_t pos = 0;
  while (c.in.size() - pos >= 4) {
    wire::Reader head(c.in.data() + pos, 4);
    const uint32_t len = *head.u32();
    if (len > wire::kMaxFrame) return false;
    if (c.in.size() - pos - 4 < len) break;
    if (!handle(c.sock.fd(), c.in.data() + pos + 4, len)) return false;
    pos += 4 + len;
  }
  c.in.erase(c.in.begin(), c.in.begin() + static_cast<std::ptrdiff_t>(pos));
  return true;
}

bool StoreServer::has_all(const std::vector<std::string>& keys) const {
  return std::all_of(keys.begin(), keys.end(), [&](const std::string& k) { return data_.count(k) > 0; });
}

void StoreServer::reply(int fd, const std::vector<char>& payload) {
  wire::Writer w;
  w.u32(static_cast<uint32_t>(payload.size()));
  std::vector<char> frame = w.payload();
  frame.insert(frame.end(), payload.begin(), payload.end());
  const char* p = frame.data();
  size_t n = frame.size();
  while (n > 0) {
    const ssize_t s = ::send(fd, p, n, MSG_NOSIGNAL);
    if (s < 0) {
      if (errno == EINTR) continue;
      dead_.push_back(fd);  // the client is gone; its waiters go with it
      return;
    }
    p += s;
    n -= static_cast<size_t>(s);
  }
}

void StoreServer::answer_waiter(const Waiter& w) {
  if (w.command == wire::kGet) {
    reply(w.fd, data_.at(w.keys[0]));
  } else {
    reply(w.fd, {});
  }
}

void StoreServer::wake_waiters() {
  std::vector<Waiter> still;
  for (auto& w : waiters_) {
    if (has_all(w.keys)) {
      answer_waiter(w);
    } else {
      still.push_back(std::move(w));
    }
  }
  waiters_ = std::move(still);
}

bool StoreServer::handle(int fd, const char* payload, size_t n) {
  wire::Reader r(payload, n);
  const auto cmd = r.u8();
  if (!cmd) return false;
  switch (*cmd) {
    case wire::kSet: {
      const auto key = r.bytes(TcpStore::kMaxKey);
      const auto value = r.bytes(TcpStore::kMaxValue);
      if (!key || !value || !r.done()) return false;
      data_[*key] = std::vector<char>(value->begin(), value->end());
      reply(fd, {});
      wake_waiters();
      return true;
    }
    case wire::kGet:
    case wire::kWait:
    case wire::kCheck: {
      std::vector<std::string> keys;
      if (*cmd == wire::kGet) {
        const auto key = r.bytes(TcpStore::kMaxKey);
        if (!key) return false;
        keys.push_back(*key);
      } else {
        const auto count = r.u32();
        if (!count || *count > n) return false;
        for (uint32_t i = 0; i < *count; ++i) {
          const auto key = r.bytes(TcpStore::kMaxKey);
          if (!key) return false;
          keys.push_back(*key);
        }
      }
      if (!r.done()) return false;
      if (*cmd == wire::kCheck) {
        reply(fd, wire::Writer().u8(has_all(keys) ? 1 : 0).payload());
        return true;
      }
      Waiter w{fd, *cmd, std::move(keys)};
      if (has_all(w.keys)) {
        answer_waiter(w);
      } else {
        waiters_.push_back(std::move(w));
      }
      return true;
    }
    case wire::kAdd: {
      const auto key = r.bytes(TcpStore::kMaxKey);
      const auto delta = r.i64();
      if (!key || !delta || !r.done()) return false;
      int64_t value = 0;
      auto it = data_.find(*key);
      if (it != data_.end()) {
        if (it->second.size() != 8) return false;  // not a counter
        value = *wire::Reader(it->second.data(), 8).i64();
      }
      value += *delta;
      data_[*key] = wire::Writer().i64(value).payload();
      reply(fd, wire::Writer().i64(value).payload());
      wake_waiters();
      return true;
    }
    default: return false;
  }
}

void StoreServer::drop(int fd) {
  waiters_.erase(std::remove_if(waiters_.begin(), waiters_.end(), [&](const Waiter& w) { return w.fd == fd; }),
                 waiters_.end());
  clients_.erase(fd);
}

}  // namespace diffmoe::dist
