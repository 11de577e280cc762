#include "serve/http_server.h"

#include <fmt/format.h>
#include <httplib.h>

#include <chrono>
#include <ctime>
#include <deque>
#include <thread>

namespace diffmoe::serve {

namespace {

using namespace std::chrono_literals;

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(dump(body), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) { send_json(res, e.status, error_body(e)); }

// One generation request slot of max_concurrency; released when the last owner lets go.
struct Slot {
  explicit Slot(std::atomic<int64_t>& n) : n(n) {}
  ~Slot() { --n; }
  std::atomic<int64_t>& n;
};

std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

}  // namespace

// A streaming response: its requests (one per choice) and the SSE frames ready to be written.
struct HttpServer::Stream {
  std::vector<std::shared_ptr<Request>> reqs;
  ParsedRequest pr;
  ResponseIds ids;
  std::vector<char> done;
  std::deque<std::string> frames;
  int64_t prompt_tokens = 0, completion_tokens = 0;
  bool ended = false;
  std::shared_ptr<Slot> slot;

  void cancel() {
    for (auto& r : reqs)
      if (!r->finished()) r->cancel();
  }
  // The next event of any choice, waiting up to `timeout`.
  std::optional<std::pair<size_t, RequestEvent>> next_event(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      size_t first = reqs.size();
      for (size_t i = 0; i < reqs.size(); ++i) {
        if (done[i]) continue;
        if (first == reqs.size()) first = i;
        if (auto e = reqs[i]->next_event(0ms)) return std::make_pair(i, std::move(*e));
      }
      if (first == reqs.size()) return std::nullopt;
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= 0ms) return std::nullopt;
      // One choice: wait on it; several: poll them in short slices.
      if (auto e = reqs[first]->next_event(reqs.size() == 1 ? left : std::min(left, std::chrono::milliseconds(10))))
        return std::make_pair(first, std::move(*e));
    }
  }
  // The frames of one event.
  void add(size_t i, const RequestEvent& e) {
    const auto index = static_cast<int64_t>(i);
    const std::vector<TokenLogprob> none;
    const std::vector<TokenLogprob>& toks = pr.params.logprobs >= 0 ? e.tokens : none;
    if (!e.done) {
      if (e.prompt && (pr.chat || !pr.params.echo)) return;
      if (e.text.empty() && toks.empty()) return;
      frames.push_back(sse(pr.chat ? chat_chunk(ids, index, e.text, toks, pr, "", false)
                                   : completion_chunk(ids, index, e.text, toks, pr, "")));
      return;
    }
    done[i] = 1;
    prompt_tokens += e.prompt_tokens;
    completion_tokens += e.completion_tokens;
    if (e.finish_reason == "error") {
      frames.push_back(sse(error_body(ApiError(500, "server_error", e.error))));
    } else {
      frames.push_back(sse(pr.chat ? chat_chunk(ids, index, "", {}, pr, e.finish_reason, false)
                                   : completion_chunk(ids, index, "", {}, pr, e.finish_reason)));
    }
    if (std::all_of(done.begin(), done.end(), [](char d) { return d != 0; })) {
      if (pr.include_usage) frames.push_back(sse(usage_chunk(ids, pr.chat, prompt_tokens, completion_tokens)));
      frames.push_back("data: [DONE]\n\n");
      ended = true;
    }
  }
};

HttpServer::HttpServer(Scheduler& scheduler, ServerOptions opt)
    : sched_(scheduler), opt_(std::move(opt)), svr_(std::make_unique<httplib::Server>()) {
  DIFFMOE_CHECK(opt_.max_concurrency >= 1, "[serve] max_concurrency {} must be >= 1", opt_.max_concurrency);
  // One thread per request in flight (a stream holds its thread), plus a few for /health and for
  // answering 429/503 while full.
  const size_t threads = static_cast<size_t>(opt_.max_concurrency) + 8;
  svr_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  svr_->set_payload_max_length(opt_.max_request_bytes);
  svr_->set_read_timeout(opt_.read_timeout_s, 0);
  svr_->set_write_timeout(30, 0);
  routes();
}

HttpServer::~HttpServer() = default;

void HttpServer::routes() {
  svr_->Get("/health", [this](const httplib::Request&, httplib::Response& res) { health(res); });
  svr_->Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) { models(req, res); });
  svr_->Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) { models(req, res); });
  svr_->Post("/v1/completions",
             [this](const httplib::Request& req, httplib::Response& res) { generate(req, res, false); });
  svr_->Post("/v1/chat/completions",
             [this](const httplib::Request& req, httplib::Response& res) { generate(req, res, true); });
  svr_->Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) { tokenize(req, res, true); });
  svr_->Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) { tokenize(req, res, false); });
  svr_->Get("/tokenizer_info", [this](const httplib::Request&, httplib::Response& res) { tokenizer_info(res); });
  // Responses that left the handlers without a body (no route, 413 from the body limit, a request
  // the HTTP parser rejected) get one in OpenAI's error shape.
  svr_->set_error_handler(
      httplib::Server::HandlerWithResponse([this](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        ApiError e(res.status, "invalid_request_error", fmt::format("HTTP {}", res.status));
        if (res.status == 404) {
          e = ApiError(404, "invalid_request_error", fmt::format("Unknown request URL: {} {}.", req.method, req.path),
                       "", "unknown_url");
        } else if (res.status == 413) {
          e = ApiError(
              413, "invalid_request_error",
              fmt::format("The request body is larger than this server's limit of {} bytes.", opt_.max_request_bytes),
              "", "request_too_large");
        } else if (res.status >= 500) {
          e = ApiError(res.status, "server_error", fmt::format("HTTP {}", res.status));
        }
        res.set_content(dump(error_body(e)), "application/json");
        return httplib::Server::HandlerResponse::Handled;
      }));
  svr_->set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, "server_error", what));
  });
}

int HttpServer::bind() {
  if (opt_.port == 0) {
    port_ = svr_->bind_to_any_port(opt_.host);
    DIFFMOE_CHECK(port_ > 0, "[serve] cannot listen on {} (any port)", opt_.host);
  } else {
    DIFFMOE_CHECK(svr_->bind_to_port(opt_.host, opt_.port),
                  "[serve] cannot listen on {}:{} (in use, or not an address of this "
                  "machine)",
                  opt_.host, opt_.port);
    port_ = opt_.port;
  }
  return port_;
}

void HttpServer::serve() {
  DIFFMOE_CHECK(port_ > 0, "[serve] bind() first");
  svr_->listen_after_bind();
}

void HttpServer::stop() {
  stopping_ = true;
  svr_->stop();
}

void HttpServer::shutdown(std::chrono::milliseconds drain_timeout) {
  stopping_ = true;
  const auto wait_idle = [&](std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (in_flight_.load() > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  };
  wait_idle(drain_timeout);
  if (in_flight_.load() > 0) {
    sched_.cancel_all();  // the rest end as "cancelled"; their handlers then return
    wait_idle(std::chrono::milliseconds(10000));
  }
  svr_->stop();
}

void HttpServer::health(httplib::Response& res) const {
  const SchedulerStats s = sched_.stats();
  send_json(res, stopping_ ? 503 : 200,
            json{{"status", stopping_ ? "shutting down" : "ok"},
                 {"model", opt_.model_name},
                 {"running", s.running},
                 {"waiting", s.waiting},
                 {"in_flight", in_flight_.load()},
                 {"free_blocks", s.free_blocks},
                 {"total_blocks", s.total_blocks},
                 {"block_size", s.block_size},
                 {"steps", s.steps},
                 {"prompt_tokens", s.prompt_tokens},
                 {"generated_tokens", s.generated_tokens},
                 {"finished", s.finished},
                 {"cancelled", s.cancelled}});
}

void HttpServer::models(const httplib::Request& req, httplib::Response& res) const {
  const json model = {{"id", opt_.model_name},
                      {"object", "model"},
                      {"created", 0},
                      {"owned_by", "diffmoe"},
                      {"max_model_len", sched_.max_context()}};
  if (req.matches.size() > 1) {
    if (req.matches[1] != opt_.model_name) {
      send_error(res, ApiError(404, "invalid_request_error",
                               fmt::format("The model `{}` does not exist.", req.matches[1].str()), "model",
                               "model_not_found"));
      return;
    }
    send_json(res, 200, model);
    return;
  }
  send_json(res, 200, json{{"object", "list"}, {"data", json::array({model})}});
}

// vLLM's tokenizer endpoints, which lm-evaluation-harness's `tokenizer_backend=remote` reads:
//   POST /tokenize {"prompt": str} -> {"tokens": [...], "count": n, "max_model_len": ctx}
//   POST /detokenize {"tokens": [...]} -> {"prompt": str}
// Text is encoded as /v1/completions encodes a prompt string (special tokens are matched).
void HttpServer::tokenize(const httplib::Request& req, httplib::Response& res, bool encode) const {
  try {
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::parse_error& e) {
      throw ApiError(400, "invalid_request_error",
                     fmt::format("We could not parse the JSON body of your request: {}", e.what()));
    }
    if (!body.is_object()) throw invalid("", "the request body must be a JSON object");
    const data::Tokenizer& tok = sched_.tokenizer();
    if (encode) {
      if (!body.contains("prompt") || !body["prompt"].is_string()) throw invalid("prompt", "'prompt' must be a string");
      const std::vector<int32_t> ids = tok.encode_with_special(body["prompt"].get<std::string>());
      send_json(res, 200, json{{"tokens", ids}, {"count", ids.size()}, {"max_model_len", sched_.max_context()}});
      return;
    }
    if (!body.contains("tokens") || !body["tokens"].is_array())
      throw invalid("tokens", "'tokens' must be an array of token ids");
    std::vector<int32_t> ids;
    for (const json& t : body["tokens"]) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= tok.vocab_size() ||
          !tok.is_token(static_cast<int32_t>(t.get<int64_t>())))
        throw invalid("tokens", fmt::format("{} is not a token id of this model's tokenizer", t.dump()));
      ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    send_json(res, 200, json{{"prompt", tok.decode(ids)}});
  } catch (const ApiError& e) {
    send_error(res, e);
  }
}

void HttpServer::tokenizer_info(httplib::Response& res) const {
  const data::Tokenizer& tok = sched_.tokenizer();
  const std::optional<int32_t> eos = tok.eos_id();
  send_json(res, 200,
            json{{"eos_token", eos ? json(std::string(tok.token_bytes(*eos))) : json(nullptr)},
                 {"bos_token", nullptr},
                 {"pad_token", nullptr},
                 {"tokenizer_class", std::string(data::tokenizer_kind_name(tok.kind()))},
                 {"name", tok.name()},
                 {"vocab_size", tok.vocab_size()},
                 {"model_max_length", sched_.max_context()}});
}

void HttpServer::generate(const httplib::Request& req, httplib::Response& res, bool chat) {
  if (stopping_) {
    send_error(res, ApiError(503, "server_error", "the server is shutting down"));
    return;
  }
  if (++in_flight_ > opt_.max_concurrency) {
    --in_flight_;
    send_error(res, ApiError(429, "rate_limit_error",
                             fmt::format("{} requests are in flight, this server's limit; retry later",
                                         opt_.max_concurrency)));
    return;
  }
  auto slot = std::make_shared<Slot>(in_flight_);
  std::vector<std::shared_ptr<Request>> reqs;
  ParsedRequest pr;
  try {
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::parse_error& e) {
      throw ApiError(400, "invalid_request_error",
                     fmt::format("We could not parse the JSON body of your request: {}", e.what()));
    }
    pr = chat ? parse_chat_request(body, sched_.tokenizer(), opt_.limits)
              : parse_completion_request(body, sched_.tokenizer(), opt_.limits);
    if (!pr.model.empty() && pr.model != opt_.model_name)
      throw ApiError(404, "invalid_request_error", fmt::format("The model `{}` does not exist.", pr.model), "model",
                     "model_not_found");
    for (std::vector<int32_t>& prompt : pr.prompts) {
      SamplingParams p = pr.params;
      if (!pr.max_tokens_given && chat)  // what the context leaves, within the limit
        p.max_tokens =
            std::clamp<int64_t>(sched_.max_context() - static_cast<int64_t>(prompt.size()), 1, opt_.limits.max_tokens);
      reqs.push_back(sched_.submit(std::move(prompt), std::move(p)));
    }
  } catch (const ApiError& e) {
    for (auto& r : reqs) r->cancel();
    send_error(res, e);
    return;
  } catch (const InvalidRequest& e) {
    for (auto& r : reqs) r->cancel();
    send_error(res, invalid(e.param, e.what()));
    return;
  } catch (const ServerBusy& e) {
    for (auto& r : reqs) r->cancel();
    send_error(res, ApiError(stopping_ ? 503 : 429, stopping_ ? "server_error" : "rate_limit_error", e.what()));
    return;
  }
  const ResponseIds ids{.id = fmt::format("{}-{}", chat ? "chatcmpl" : "cmpl", next_id_++),
                        .model = opt_.model_name,
                        .created = static_cast<int64_t>(std::time(nullptr))};
  if (pr.stream) {
    auto st = std::make_shared<Stream>();
    st->reqs = std::move(reqs);
    st->pr = std::move(pr);
    st->ids = ids;
    st->done.assign(st->reqs.size(), 0);
    st->slot = std::move(slot);
    if (st->pr.chat)
      for (size_t i = 0; i < st->reqs.size(); ++i)
        st->frames.push_back(sse(chat_chunk(ids, static_cast<int64_t>(i), "", {}, st->pr, "", true)));
    stream_response(res, std::move(st));
    return;
  }
  std::vector<ChoiceResult> results(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    for (bool done = false; !done;) {
      if (auto e = reqs[i]->next_event(std::chrono::milliseconds(500))) {
        results[i].add(*e);
        done = e->done;
      }
    }
  }
  for (const ChoiceResult& r : results) {
    if (r.finish_reason == "error") {
      send_error(res, ApiError(500, "server_error", r.error));
      return;
    }
  }
  send_json(res, 200, chat ? chat_response(ids, results, pr) : completion_response(ids, results, pr));
}

void HttpServer::stream_response(httplib::Response& res, std::shared_ptr<Stream> st) {
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");
  const auto heartbeat = std::chrono::milliseconds(opt_.heartbeat_ms);
  res.set_chunked_content_provider(
      "text/event-stream",
      [st, heartbeat](size_t, httplib::DataSink& sink) {
        for (;;) {
          if (!st->frames.empty()) {
            const std::string frame = std::move(st->frames.front());
            st->frames.pop_front();
            if (!sink.write(frame.data(), frame.size())) {  // the client went away
              st->cancel();
              return false;
            }
            return true;
          }
          if (st->ended) {
            sink.done();
            return true;
          }
          if (auto e = st->next_event(heartbeat)) {
            st->add(e->first, e->second);
          } else {
            st->frames.push_back(": keep-alive\n\n");  // an SSE comment: clients skip it, a gone client fails it
          }
        }
      },
      [st](bool) {
        st->cancel();  // a no-op for finished requests; frees the cache blocks of the others
        st->slot.reset();
      });
}

}  // namespace diffmoe::serve
