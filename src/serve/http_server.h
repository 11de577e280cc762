// The OpenAI-compatible HTTP server of `diffmoe serve` (cpp-httplib; docs/serving.md): routes
//   GET  /health               liveness and the scheduler's counters (503 while shutting down)
//   GET  /v1/models, /v1/models/{id}
//   POST /v1/completions, /v1/chat/completions    JSON or SSE streaming (stream: true)
//   POST /tokenize, /detokenize; GET /tokenizer_info   vLLM's tokenizer endpoints (lm-evaluation-
//                              harness's tokenizer_backend=remote)
// Handler threads (a pool of max_concurrency + a few) only parse, enqueue into the scheduler and
// stream its events back; the scheduler's one engine thread does all model work. Limits: request
// body bytes (413), generation requests in flight (429), the scheduler's context and token limits
// (400); every error is a JSON body in OpenAI's error shape and the server keeps serving. A
// streaming client that goes away is noticed at the next write (a token or, while nothing is
// produced, an SSE comment every heartbeat) and its requests are cancelled, freeing their cache
// blocks. A non-streaming request runs to its end (bounded by max_tokens) even if its client left.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "serve/openai_api.h"
#include "serve/scheduler.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace diffmoe::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                     // 0: any free port (bind() returns it)
  std::string model_name = "diffmoe";  // the id /v1/models lists; requests naming another model get 404
  ApiLimits limits = {};
  size_t max_request_bytes = size_t{1} << 20;
  int64_t max_concurrency = 64;  // generation requests in flight (streaming or not)
  int heartbeat_ms = 1000;       // an SSE comment after this long without an event
  int read_timeout_s = 30;       // reading a request (slow clients)
};

class HttpServer {
 public:
  HttpServer(Scheduler& scheduler, ServerOptions opt);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the listening socket; returns the port. Throws naming the address when it cannot.
  int bind();
  // Serves until stop(); returns after the handler threads have finished their requests.
  void serve();
  // Graceful shutdown (any thread): new generation requests get 503 at once, requests in flight
  // finish (streams to their [DONE]) for up to drain_timeout, then the rest are cancelled, and the
  // listening socket closes, so serve() returns.
  void shutdown(std::chrono::milliseconds drain_timeout);
  // Closes the listening socket now (any thread); open streams are cut off.
  void stop();
  bool stopping() const { return stopping_.load(); }
  int64_t in_flight() const { return in_flight_.load(); }
  const ServerOptions& options() const { return opt_; }

 private:
  struct Stream;
  void routes();
  void generate(const httplib::Request& req, httplib::Response& res, bool chat);
  void health(httplib::Response& res) const;
  void tokenize(const httplib::Request& req, httplib::Response& res, bool encode) const;
  void tokenizer_info(httplib::Response& res) const;
  void models(const httplib::Request& req, httplib::Response& res) const;
  void stream_response(httplib::Response& res, std::shared_ptr<Stream> st);

  Scheduler& sched_;
  ServerOptions opt_;
  std::unique_ptr<httplib::Server> svr_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> next_id_{0};
  int port_ = -1;
};

}  // namespace diffmoe::serve
