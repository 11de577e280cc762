// The rendezvous store (src/dist/tcp_store.h) in one process: a server and clients on the loopback
// interface, from several threads; waiting gets and waits released by a later set; counters;
// timeouts and a vanished server give errors naming the store, the rank and the key; a malformed
// request does not take the server down.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "core/error.h"
#include "dist/socket_util.h"
#include "dist/tcp_store.h"

namespace diffmoe::dist {
namespace {

using std::chrono::milliseconds;

std::vector<char> bytes(const std::string& s) { return std::vector<char>(s.begin(), s.end()); }
std::string str(const std::vector<char>& v) { return std::string(v.begin(), v.end()); }

std::unique_ptr<TcpStore> server(milliseconds timeout = milliseconds(5000)) {
  return std::make_unique<TcpStore>(
      TcpStoreOptions{.host = "127.0.0.1", .port = 0, .serve = true, .timeout = timeout, .rank = 0});
}
std::unique_ptr<TcpStore> client(const TcpStore& s, int rank, milliseconds timeout = milliseconds(5000)) {
  return std::make_unique<TcpStore>(
      TcpStoreOptions{.host = "127.0.0.1", .port = s.port(), .serve = false, .timeout = timeout, .rank = rank});
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TcpStore, SetGetAcrossClients) {
  auto s = server();
  auto c = client(*s, 1);
  s->set("a", bytes("alpha"));
  EXPECT_EQ(str(c->get("a")), "alpha");
  c->set("a", bytes("again"));  // overwrite
  EXPECT_EQ(str(s->get("a")), "again");
  std::vector<char> big(3 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 + 1);
  c->set("big", big);
  EXPECT_EQ(s->get("big"), big);
  c->set("empty", {});
  EXPECT_TRUE(s->get("empty").empty());
  EXPECT_TRUE(c->check({"a", "big", "empty"}));
  EXPECT_FALSE(c->check({"a", "missing"}));
}

TEST(TcpStore, GetAndWaitBlockUntilAnotherRankSets) {
  auto s = server();
  auto c1 = client(*s, 1);
  auto c2 = client(*s, 2);
  std::atomic<bool> got{false}, waited{false};
  std::string value;
  std::thread t1([&] {
    value = str(c1->get("late"));
    got = true;
  });
  std::thread t2([&] {
    c2->wait({"late", "later"});
    waited = true;
  });
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_FALSE(got.load());
  s->set("late", bytes("v1"));
  t1.join();
  EXPECT_EQ(value, "v1");
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_FALSE(waited.load()) << "wait returned before every key was set";
  s->set("later", bytes("v2"));
  t2.join();
  EXPECT_TRUE(waited.load());
}

TEST(TcpStore, AddIsAtomicAcrossClients) {
  auto s = server();
  constexpr int kClients = 4, kAdds = 50;
  std::vector<std::thread> ts;
  for (int r = 0; r < kClients; ++r) {
    ts.emplace_back([&, r] {
      auto c = client(*s, r + 1);
      for (int i = 0; i < kAdds; ++i) c->add("count", 2);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(s->add("count", 0), 2 * kClients * kAdds);
  EXPECT_EQ(s->add("count", -5), 2 * kClients * kAdds - 5);
}

TEST(TcpStore, TimeoutNamesTheKeyAndRank) {
  auto s = server();
  auto c = client(*s, 3, milliseconds(200));
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_of([&] { c->get("never"); });
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(e.find("rank 3: rendezvous store 127.0.0.1:"), std::string::npos) << e;
  EXPECT_NE(e.find("waiting for key 'never': timed out after 0.2 s"), std::string::npos) << e;
  EXPECT_GE(took, 0.19);
  EXPECT_LT(took, 2.0);
  // The connection is not reused after a timeout (the late reply would be taken for the next one).
  EXPECT_NE(error_of([&] { c->set("x", bytes("y")); }).find("the connection failed earlier"), std::string::npos);
  const std::string w = error_of([&] { s->wait({"k1", "k2"}, milliseconds(100)); });
  EXPECT_NE(w.find("waiting for 'k1', 'k2': timed out after 0.1 s"), std::string::npos) << w;
}

TEST(TcpStore, ServerGoneIsAClearError) {
  auto s = server();
  auto c = client(*s, 1);
  std::thread t([&] {
    std::this_thread::sleep_for(milliseconds(100));
    s.reset();  // rank 0 exits while rank 1 waits
  });
  const std::string e = error_of([&] { c->get("never"); });
  t.join();
  EXPECT_NE(e.find("the server closed the connection (rank 0, which serves the store, exited?)"), std::string::npos)
      << e;
}

TEST(TcpStore, NoServerIsAClearErrorAfterTheTimeout) {
  int port = 0;
  { Socket probe = listen_tcp(0, &port, "probe"); }  // a port nobody listens on any more
  const std::string e = error_of([&] {
    TcpStore c(
        TcpStoreOptions{.host = "127.0.0.1", .port = port, .serve = false, .timeout = milliseconds(300), .rank = 2});
  });
  EXPECT_NE(
      e.find("rank 2: rendezvous store 127.0.0.1:" + std::to_string(port) + ": could not connect before the timeout"),
      std::string::npos)
      << e;
  EXPECT_NE(e.find("MASTER_ADDR/MASTER_PORT"), std::string::npos) << e;
}

TEST(TcpStore, PortInUseNamesMasterPort) {
  auto s = server();
  const std::string e = error_of([&] {
    TcpStore again(TcpStoreOptions{
        .host = "127.0.0.1", .port = s->port(), .serve = true, .timeout = milliseconds(300), .rank = 0});
  });
  EXPECT_NE(e.find("cannot listen on port " + std::to_string(s->port())), std::string::npos) << e;
  EXPECT_NE(e.find("MASTER_PORT"), std::string::npos) << e;
}

TEST(TcpStore, MalformedRequestDropsOnlyThatClient) {
  auto s = server();
  Socket raw = connect_tcp("127.0.0.1", s->port(), std::chrono::steady_clock::now() + milliseconds(2000), "raw");
  const char junk[] = {3, 0, 0, 0, 99, 1, 2};  // a frame of 3 bytes with an unknown command
  send_all(raw.fd(), junk, sizeof(junk), "raw");
  char b = 0;
  EXPECT_EQ(recv_all(raw.fd(), &b, 1, std::chrono::steady_clock::now() + milliseconds(2000), "raw"),
            RecvResult::kClosed);
  auto c = client(*s, 1);
  c->set("still", bytes("up"));
  EXPECT_EQ(str(s->get("still")), "up");
}

}  // namespace
}  // namespace diffmoe::dist
