// The HTTP server in-process over a scheduler whose engine thread is NOT started, so requests stay
// in flight for as long as the test wants (no timing races): the concurrency limit (429 in
// OpenAI's error shape, /health still answering), and a streaming client that hangs up while its
// request is still queued is noticed through the SSE heartbeat: its slot is released and its
// request cancelled.
#include <gtest/gtest.h>

#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "http_test_util.h"
#include "serve/http_server.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace fs = std::filesystem;
using test::json;

TEST(HttpLimits, ConcurrencyLimitAndHangUpWhileQueued) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("diffmoe-serve-limits-{}", ::getpid());
  fs::create_directories(dir);
  const auto tok = test::test_tokenizer(dir / "tokenizer.json");
  CpuBackend be;
  Model model(test::serve_config(), be, DType::kF32);
  diffmoe::test::randomize_for_test(model, 3);
  Scheduler sched(model, *tok, {.engine = {.max_batch = 2, .max_step_tokens = 8}});
  HttpServer server(sched, {.port = 0, .max_concurrency = 2, .heartbeat_ms = 50});
  const int port = server.bind();
  std::thread serving([&] { server.serve(); });
  const std::string url = fmt::format("http://127.0.0.1:{}", port);
  const std::string body = R"({"prompt": "the sea", "max_tokens": 4, "stream": true})";

  // Two streams fill the limit; they only ever receive heartbeats (nothing runs the engine).
  test::RawStream a(port, "/v1/completions", body), b(port, "/v1/completions", body);
  EXPECT_NE(a.read_until(": keep-alive").find(": keep-alive"), std::string::npos) << a.read_until("");
  EXPECT_NE(b.read_until(": keep-alive").find(": keep-alive"), std::string::npos);
  EXPECT_EQ(server.in_flight(), 2);
  const test::HttpResult busy = test::curl(dir, "POST", url + "/v1/completions", R"({"prompt": "x"})");
  EXPECT_EQ(busy.status, 429) << busy.body;
  EXPECT_EQ(json::parse(busy.body)["error"]["type"], "rate_limit_error");
  const test::HttpResult health = test::curl(dir, "GET", url + "/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(json::parse(health.body)["in_flight"], 2);
  EXPECT_EQ(json::parse(health.body)["waiting"], 2);

  // A hangs up: the next heartbeat write fails, its slot is released and its request cancelled.
  a.close();
  for (int i = 0; i < 200 && server.in_flight() > 1; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(server.in_flight(), 1);
  sched.run_once();  // drops the cancelled request from the queue
  EXPECT_EQ(sched.stats().cancelled, 1);
  EXPECT_EQ(sched.stats().running + sched.stats().waiting, 1);  // B's, admitted by that step

  b.close();
  for (int i = 0; i < 200 && server.in_flight() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(server.in_flight(), 0);
  server.stop();
  serving.join();
  std::error_code ec;
  fs::remove_all(dir, ec);
}

}  // namespace
}  // namespace diffmoe::serve
