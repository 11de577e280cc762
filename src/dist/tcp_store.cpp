#include "dist/tcp_store.h"

#include "core/error.h"
#include "dist/tcp_store_server.h"
#include "dist/tcp_store_wire.h"

namespace diffmoe::dist {
namespace {

std::string seconds(std::chrono::milliseconds t) {
  return fmt::format("{:g} s", static_cast<double>(t.count()) / 1000.0);
}

std::string join_keys(const std::vector<std::string>& keys) {
  std::string s;
  for (size_t i = 0; i < keys.size() && i < 4; ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  if (keys.size() > 4) s += fmt::format(" and {} more", keys.size() - 4);
  return s;
}

}  // namespace

TcpStore::TcpStore(const TcpStoreOptions& opt)
    : host_(opt.host), port_(opt.port), timeout_(opt.timeout), rank_(opt.rank) {
  DIFFMOE_CHECK(opt.timeout.count() > 0, "[store] the timeout must be positive");
  if (opt.serve) {
    server_ = std::make_unique<StoreServer>(opt.port, fmt::format("rank {}: {} (MASTER_PORT)", rank_, describe()));
    port_ = server_->port();
  }
  DIFFMOE_CHECK(port_ > 0 && port_ < 65536, "[store] port {} is out of range", port_);
  conn_ = connect_tcp(host_, port_, Clock::now() + timeout_, fmt::format("rank {}: {}", rank_, describe()));
}

TcpStore::~TcpStore() {
  conn_ = Socket();  // close the client before stopping the server
  server_.reset();
}

std::string TcpStore::describe() const { return fmt::format("rendezvous store {}:{}", host_, port_); }

std::vector<char> TcpStore::request(const std::vector<char>& payload, std::chrono::milliseconds timeout,
                                    const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string where = fmt::format("rank {}: {}: {}", rank_, describe(), what);
  DIFFMOE_CHECK(!broken_, "{}: the connection failed earlier", where);
  wire::Writer frame;
  frame.u32(static_cast<uint32_t>(payload.size()));
  std::vector<char> bytes = frame.payload();
  bytes.insert(bytes.end(), payload.begin(), payload.end());
  try {
    send_all(conn_.fd(), bytes.data(), bytes.size(), where);
  } catch (...) {
    broken_ = true;
    throw;
  }
  const Clock::time_point deadline = Clock::now() + timeout;
  auto fail = [&](RecvResult r) {
    broken_ = true;
    if (r == RecvResult::kTimeout)
      DIFFMOE_FAIL("{}: timed out after {} (a rank did not reach the rendezvous)", where, seconds(timeout));
    DIFFMOE_FAIL("{}: the server closed the connection (rank 0, which serves the store, exited?)", where);
  };
  char head[4];
  RecvResult r = recv_all(conn_.fd(), head, 4, deadline, where);
  if (r != RecvResult::kOk) fail(r);
  const uint32_t len = *wire::Reader(head, 4).u32();
  if (len > wire::kMaxFrame) {
    broken_ = true;
    DIFFMOE_FAIL("{}: malformed reply ({} bytes)", where, len);
  }
  std::vector<char> reply(len);
  r = recv_all(conn_.fd(), reply.data(), len, deadline, where);
  if (r != RecvResult::kOk) fail(r);
  return reply;
}

void TcpStore::set(const std::string& key, const std::vector<char>& value) {
  DIFFMOE_CHECK(key.size() <= kMaxKey, "[store] key of {} bytes exceeds {}", key.size(), kMaxKey);
  DIFFMOE_CHECK(value.size() <= kMaxValue, "[store] value of '{}' has {} bytes, more than {}", key, value.size(),
                kMaxValue);
  request(wire::Writer(wire::kSet).bytes(key).bytes(std::string_view(value.data(), value.size())).payload(), timeout_,
          fmt::format("set '{}'", key));
}

std::vector<char> TcpStore::get(const std::string& key) { return get(key, timeout_); }

std::vector<char> TcpStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  DIFFMOE_CHECK(key.size() <= kMaxKey, "[store] key of {} bytes exceeds {}", key.size(), kMaxKey);
  return request(wire::Writer(wire::kGet).bytes(key).payload(), timeout, fmt::format("waiting for key '{}'", key));
}

void TcpStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void TcpStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  for (const auto& k : keys)
    DIFFMOE_CHECK(k.size() <= kMaxKey, "[store] key of {} bytes exceeds {}", k.size(), kMaxKey);
  request(wire::Writer(wire::kWait).keys(keys).payload(), timeout, fmt::format("waiting for {}", join_keys(keys)));
}

int64_t TcpStore::add(const std::string& key, int64_t delta) {
  DIFFMOE_CHECK(key.size() <= kMaxKey, "[store] key of {} bytes exceeds {}", key.size(), kMaxKey);
  const std::vector<char> r =
      request(wire::Writer(wire::kAdd).bytes(key).i64(delta).payload(), timeout_, fmt::format("add to '{}'", key));
  DIFFMOE_CHECK(r.size() == 8, "rank {}: {}: add to '{}': malformed reply", rank_, describe(), key);
  return *wire::Reader(r.data(), 8).i64();
}

bool TcpStore::check(const std::vector<std::string>& keys) {
  const std::vector<char> r = request(wire::Writer(wire::kCheck).keys(keys).payload(), timeout_, "check");
  DIFFMOE_CHECK(r.size() == 1, "rank {}: {}: check: malformed reply", rank_, describe());
  return r[0] != 0;
}

}  // namespace diffmoe::dist
