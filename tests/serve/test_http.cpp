// `diffmoe serve` as a process, with real clients over loopback (curl, a raw socket, the openai npm
// client), on a micro model with the test tokenizer:
//  - every endpoint; completions and chat streamed over SSE equal the plain responses; echo +
//    logprobs in lm-evaluation-harness's form; the prompt forms (string, list, token ids);
//  - errors (malformed JSON, wrong field types, too-long prompts, max_tokens over the limit, an
//    oversize body, unknown routes and models, unsupported options) are 4xx in OpenAI's error shape
//    and the server keeps serving;
//  - a client that hangs up mid-stream frees its cache blocks; many simultaneous streaming clients
//    each get their own completion;
//  - SIGTERM lets streams in flight finish, then the process exits 0 (or cancels them after
//    --shutdown-timeout).
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "http_test_util.h"
#include "model/model_file.h"
#include "serve/chat_template.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace fs = std::filesystem;
using test::curl;
using test::json;
using test::parse_sse;

constexpr const char* kModel = "micro";

class HttpTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / fmt::format("diffmoe-serve-http-{}", ::getpid());
    fs::create_directories(dir_);
    tok_ = test::test_tokenizer(dir_ / "tokenizer.json");
    CpuBackend be;
    Model m(test::serve_config(300, 512), be, DType::kF32);
    diffmoe::test::randomize_for_test(m, 5);
    save_model(m, (dir_ / "model.safetensors").string());
    server_ = std::make_unique<test::ServerProcess>(server_args(), dir_);
    ASSERT_GT(server_->port(), 0) << "the server did not start:\n" << server_->log();
  }
  static void TearDownTestSuite() {
    if (server_) {
      EXPECT_EQ(server_->stop(SIGTERM), 0) << server_->log();
    }
    server_.reset();
    tok_.reset();
    std::error_code ec;
    if (!::testing::UnitTest::GetInstance()->Passed()) {
      std::fprintf(stderr, "[http] kept %s\n", dir_.c_str());
      return;
    }
    fs::remove_all(dir_, ec);
  }
  static std::vector<std::string> server_args(const std::string& max_batch = "8", std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"--checkpoint",        (dir_ / "model.safetensors").string(),
                                  "--tokenizer",         (dir_ / "tokenizer.json").string(),
                                  "--model-name",        kModel,
                                  "--max-batch",         max_batch,
                                  "--max-tokens",        "500",
                                  "--max-request-bytes", "65536",
                                  "--max-concurrency",   "32",
                                  "--prefill-chunk",     "16",
                                  "--block-size",        "8"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static test::HttpResult post(const std::string& path, const std::string& body) {
    return curl(dir_, "POST", server_->url() + path, body);
  }
  static test::HttpResult get(const std::string& path) { return curl(dir_, "GET", server_->url() + path); }
  static json health() { return json::parse(get("/health").body); }

  // The text, finish reason and usage of a streamed completion (or chat) body.
  struct Streamed {
    std::string text = {}, finish_reason = {}, role = {};
    json usage = {};
    bool done = false, clean = false;
  };
  static Streamed streamed(const std::string& body, bool chat) {
    const test::SseBody s = parse_sse(body);
    Streamed out{.done = s.done, .clean = s.clean};
    for (const json& e : s.events) {
      if (e.contains("usage") && !e["usage"].is_null()) out.usage = e["usage"];
      for (const json& c : e["choices"]) {
        if (chat) {
          if (c["delta"].contains("role")) out.role = c["delta"]["role"];
          if (c["delta"].contains("content")) out.text += c["delta"]["content"].get<std::string>();
        } else {
          out.text += c["text"].get<std::string>();
        }
        if (!c["finish_reason"].is_null()) out.finish_reason = c["finish_reason"];
      }
    }
    return out;
  }

  static inline fs::path dir_;
  static inline std::unique_ptr<data::Tokenizer> tok_;
  static inline std::unique_ptr<test::ServerProcess> server_;
};

TEST_F(HttpTest, HealthAndModels) {
  const test::HttpResult h = get("/health");
  ASSERT_EQ(h.status, 200) << h.body;
  const json hj = json::parse(h.body);
  EXPECT_EQ(hj["status"], "ok");
  EXPECT_GT(hj["total_blocks"].get<int64_t>(), 0);
  const json models = json::parse(get("/v1/models").body);
  ASSERT_EQ(models["data"].size(), 1u);
  EXPECT_EQ(models["data"][0]["id"], kModel);
  EXPECT_EQ(models["data"][0]["max_model_len"], 512);
  EXPECT_EQ(get(std::string("/v1/models/") + kModel).status, 200);
  const test::HttpResult other = get("/v1/models/gpt-4");
  EXPECT_EQ(other.status, 404);
  EXPECT_EQ(json::parse(other.body)["error"]["code"], "model_not_found");
}

TEST_F(HttpTest, StreamedCompletionEqualsPlain) {
  for (const std::string sampling : {R"("temperature": 0)", R"("temperature": 0.9, "top_p": 0.9, "seed": 11)"}) {
    const std::string req =
        R"({"model": "micro", "prompt": "the captain walked", "max_tokens": 24, "ignore_eos": true, )" + sampling;
    const test::HttpResult plain = post("/v1/completions", req + "}");
    ASSERT_EQ(plain.status, 200) << plain.body;
    const json p = json::parse(plain.body);
    EXPECT_EQ(p["object"], "text_completion");
    EXPECT_EQ(p["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(p["usage"]["completion_tokens"], 24);
    EXPECT_EQ(p["usage"]["prompt_tokens"], static_cast<int64_t>(tok_->encode("the captain walked").size()));
    const test::HttpResult sse =
        post("/v1/completions", req + R"(, "stream": true, "stream_options": {"include_usage": true}})");
    ASSERT_EQ(sse.status, 200) << sse.body;
    const Streamed s = streamed(sse.body, false);
    EXPECT_TRUE(s.done && s.clean) << sse.body;
    EXPECT_EQ(s.text, p["choices"][0]["text"]) << sampling;
    EXPECT_EQ(s.finish_reason, "length");
    EXPECT_EQ(s.usage, p["usage"]);
  }
}

TEST_F(HttpTest, StreamedChatEqualsPlain) {
  const std::string req =
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The sea?"},
                                           {"role": "assistant", "content": "Deep."}, {"role": "user", "content": [{"type": "text", "text": "And?"}]}],
                              "max_tokens": 16, "temperature": 0)";
  const test::HttpResult plain = post("/v1/chat/completions", req + "}");
  ASSERT_EQ(plain.status, 200) << plain.body;
  const json p = json::parse(plain.body);
  EXPECT_EQ(p["object"], "chat.completion");
  EXPECT_EQ(p["choices"][0]["message"]["role"], "assistant");
  const test::HttpResult sse = post("/v1/chat/completions", req + R"(, "stream": true})");
  const Streamed s = streamed(sse.body, true);
  EXPECT_TRUE(s.done && s.clean) << sse.body;
  EXPECT_EQ(s.role, "assistant");
  EXPECT_EQ(s.text, p["choices"][0]["message"]["content"]);
  EXPECT_EQ(s.finish_reason, p["choices"][0]["finish_reason"]);
  // The prompt is the documented template (docs/serving.md).
  EXPECT_EQ(p["usage"]["prompt_tokens"].get<int64_t>(),
            static_cast<int64_t>(
                apply_chat_template(
                    {{"system", "Be brief."}, {"user", "The sea?"}, {"assistant", "Deep."}, {"user", "And?"}}, *tok_)
                    .size()));
}

// lm-evaluation-harness's local-completions loglikelihood request: echo, max_tokens 0 (older) or 1,
// logprobs 1. It sums token_logprobs over the continuation and checks greediness with top_logprobs.
TEST_F(HttpTest, EchoLogprobsForLmEval) {
  const std::string prompt = "the whale and the ship";
  const int64_t n = static_cast<int64_t>(tok_->encode(prompt).size());
  for (const int max_tokens : {0, 1}) {
    const test::HttpResult r =
        post("/v1/completions", fmt::format(R"({{"prompt": "{}", "max_tokens": {}, "echo": true, "logprobs": 1,
                                                                      "temperature": 0, "ignore_eos": true}})",
                                            prompt, max_tokens));
    ASSERT_EQ(r.status, 200) << r.body;
    const json c = json::parse(r.body)["choices"][0];
    EXPECT_TRUE(c["text"].get<std::string>().starts_with(prompt));
    const json& lp = c["logprobs"];
    ASSERT_EQ(lp["token_logprobs"].size(), static_cast<size_t>(n + max_tokens));
    EXPECT_TRUE(lp["token_logprobs"][0].is_null());
    EXPECT_TRUE(lp["top_logprobs"][0].is_null());
    for (size_t i = 1; i < lp["token_logprobs"].size(); ++i) {
      const double tok_lp = lp["token_logprobs"][i];
      EXPECT_LE(tok_lp, 0.0);
      ASSERT_EQ(lp["top_logprobs"][i].size(), 1u);
      double best = -1e300;
      for (const auto& [text, v] : lp["top_logprobs"][i].items()) best = std::max(best, v.get<double>());
      EXPECT_GE(best, tok_lp);
    }
    EXPECT_EQ(lp["text_offset"][0], 0);
    if (max_tokens == 1) {
      EXPECT_EQ(lp["top_logprobs"][n].begin().value(), lp["token_logprobs"][n]) << "greedy picks the top token";
    }
  }
}

// vLLM's tokenizer endpoints as lm-evaluation-harness's tokenizer_backend=remote uses them: the
// end-of-text id from /tokenizer_info's eos_token through /tokenize, context and continuation
// tokenized separately and sent as one token-id prompt, and the continuation's logprobs taken as
// token_logprobs[ctxlen:-1] (the last entry is the generated token).
TEST_F(HttpTest, TokenizerEndpointsForLmEvalRemoteTokenizer) {
  const json info = json::parse(get("/tokenizer_info").body);
  ASSERT_EQ(info["eos_token"], "<|endoftext|>");
  EXPECT_EQ(info["model_max_length"], 512);
  const json eos = json::parse(post("/tokenize", R"({"prompt": "<|endoftext|>", "add_special_tokens": false})").body);
  ASSERT_EQ(eos["tokens"].size(), 1u);
  EXPECT_EQ(eos["tokens"][0], *tok_->eos_id());
  const json ctx = json::parse(post("/tokenize", R"({"prompt": "the captain looked at"})").body);
  const json cont = json::parse(post("/tokenize", R"({"prompt": " the whale"})").body);
  EXPECT_EQ(ctx["tokens"].get<std::vector<int32_t>>(), tok_->encode("the captain looked at"));
  EXPECT_EQ(ctx["count"], ctx["tokens"].size());
  EXPECT_EQ(json::parse(post("/detokenize", json{{"tokens", ctx["tokens"]}}.dump()).body)["prompt"],
            "the captain looked at");
  EXPECT_EQ(post("/detokenize", R"({"tokens": [1, 300]})").status, 400);
  EXPECT_EQ(post("/tokenize", R"({"text": "x"})").status, 400);

  std::vector<int32_t> ids = ctx["tokens"].get<std::vector<int32_t>>();
  const size_t ctxlen = ids.size();
  for (const json& t : cont["tokens"]) ids.push_back(t.get<int32_t>());
  const json scored = json::parse(post("/v1/completions", json{{"model", kModel},
                                                               {"prompt", {ids}},
                                                               {"temperature", 0},
                                                               {"max_tokens", 1},
                                                               {"logprobs", 1},
                                                               {"seed", 1234},
                                                               {"echo", true}}
                                                              .dump())
                                      .body);
  const json& lp = scored["choices"][0]["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), ids.size() + 1)
      << "the generated token is listed, also when it is the end-of-text token";
  double sum = 0.0;
  for (size_t i = ctxlen; i + 1 < lp["token_logprobs"].size(); ++i) sum += lp["token_logprobs"][i].get<double>();
  EXPECT_LT(sum, 0.0);
  EXPECT_EQ(lp["tokens"].size(), ids.size() + 1);
}

// Tokens that are part of a character are written "bytes:\xNN" (OpenAI's form), so two of them never
// collapse into one U+FFFD key of a top_logprobs object: every object keeps its k entries.
TEST_F(HttpTest, ByteTokensKeepDistinctLogprobKeys) {
  const test::HttpResult r =
      post("/v1/completions", R"({"prompt": "Zürich 日本 東京 smörgåsbord", "max_tokens": 8, "echo": true,
                                                        "logprobs": 5, "temperature": 0, "ignore_eos": true})");
  ASSERT_EQ(r.status, 200) << r.body;
  const json lp = json::parse(r.body)["choices"][0]["logprobs"];
  bool saw_bytes = false;
  for (size_t i = 1; i < lp["top_logprobs"].size(); ++i)
    EXPECT_EQ(lp["top_logprobs"][i].size(), 5u) << "position " << i;
  for (const json& t : lp["tokens"]) saw_bytes |= t.get<std::string>().starts_with("bytes:\\x");
  for (size_t i = 1; i < lp["top_logprobs"].size(); ++i)
    for (const auto& [key, v] : lp["top_logprobs"][i].items()) saw_bytes |= key.starts_with("bytes:\\x");
  EXPECT_TRUE(saw_bytes) << "the test text has multi-byte characters split across byte tokens: " << r.body;
}

TEST_F(HttpTest, PromptForms) {
  const test::HttpResult two =
      post("/v1/completions",
           R"({"prompt": ["the sea", "a whale"], "max_tokens": 5, "temperature": 0, "ignore_eos": true})");
  ASSERT_EQ(two.status, 200) << two.body;
  const json t = json::parse(two.body);
  ASSERT_EQ(t["choices"].size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(t["choices"][i]["index"], i);
    const json one =
        json::parse(post("/v1/completions",
                         fmt::format(R"({{"prompt": "{}", "max_tokens": 5, "temperature": 0, "ignore_eos": true}})",
                                     i == 0 ? "the sea" : "a whale"))
                        .body);
    EXPECT_EQ(t["choices"][i]["text"], one["choices"][0]["text"]);
  }
  EXPECT_EQ(t["usage"]["completion_tokens"], 10);
  const std::vector<int32_t> ids = tok_->encode("the sea");
  const json by_ids = json::parse(
      post("/v1/completions", json{{"prompt", ids}, {"max_tokens", 5}, {"temperature", 0}, {"ignore_eos", true}}.dump())
          .body);
  EXPECT_EQ(by_ids["choices"][0]["text"], t["choices"][0]["text"]);
  const json nested = json::parse(post("/v1/completions", json{{"prompt", {ids, ids}}, {"max_tokens", 2}}.dump()).body);
  EXPECT_EQ(nested["choices"].size(), 2u);
  EXPECT_EQ(post("/v1/completions", R"({"prompt": "", "max_tokens": 2})").status, 200)
      << "an empty prompt starts a document";
}

TEST_F(HttpTest, ErrorsAreOpenAiShapedAndTheServerKeepsServing) {
  struct Case {
    std::string name, method, path, body;
    int status;
    std::string param;
  };
  const auto id_list = [](int n) {
    std::string s = "[";
    for (int i = 0; i < n; ++i) s += i ? ",40" : "40";
    return s + "]";
  };
  const std::string long_prompt = id_list(600), prompt_100 = id_list(100);
  const std::vector<Case> cases = {
      {"malformed JSON", "POST", "/v1/completions", R"({"prompt": "x", )", 400, ""},
      {"not an object", "POST", "/v1/completions", R"(["x"])", 400, ""},
      {"no prompt", "POST", "/v1/completions", R"({"max_tokens": 3})", 400, "prompt"},
      {"prompt of a wrong type", "POST", "/v1/completions", R"({"prompt": 3.5})", 400, "prompt"},
      {"prompt of mixed types", "POST", "/v1/completions", R"({"prompt": ["a", 3]})", 400, "prompt"},
      {"temperature as a string", "POST", "/v1/completions", R"({"prompt": "x", "temperature": "hot"})", 400,
       "temperature"},
      {"max_tokens as a float", "POST", "/v1/completions", R"({"prompt": "x", "max_tokens": 2.5})", 400, "max_tokens"},
      {"stop as a number", "POST", "/v1/completions", R"({"prompt": "x", "stop": 7})", 400, "stop"},
      {"stream as a string", "POST", "/v1/completions", R"({"prompt": "x", "stream": "yes"})", 400, "stream"},
      {"top_p out of range", "POST", "/v1/completions", R"({"prompt": "x", "top_p": 1.5})", 400, "top_p"},
      {"logprobs over the limit", "POST", "/v1/completions", R"({"prompt": "x", "logprobs": 21})", 400, "logprobs"},
      {"max_tokens over the limit", "POST", "/v1/completions", R"({"prompt": "x", "max_tokens": 501})", 400,
       "max_tokens"},
      {"too-long prompt", "POST", "/v1/completions", R"({"prompt": )" + long_prompt + "}", 400, "prompt"},
      {"prompt + max_tokens over the context", "POST", "/v1/completions",
       R"({"prompt": )" + prompt_100 + R"(, "max_tokens": 450})", 400, "max_tokens"},
      {"token id outside the vocabulary", "POST", "/v1/completions", R"({"prompt": [1, 300]})", 400, "prompt"},
      {"n = 2", "POST", "/v1/completions", R"({"prompt": "x", "n": 2})", 400, "n"},
      {"another model", "POST", "/v1/completions", R"({"prompt": "x", "model": "gpt-4"})", 404, "model"},
      {"messages as a string", "POST", "/v1/chat/completions", R"({"messages": "hi"})", 400, "messages"},
      {"a message without a role", "POST", "/v1/chat/completions", R"({"messages": [{"content": "hi"}]})", 400,
       "messages[0].role"},
      {"an unknown role", "POST", "/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "hi"}]})", 400,
       "messages[0].role"},
      {"an image part", "POST", "/v1/chat/completions",
       R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", 400, "messages[0].content"},
      {"oversize body", "POST", "/v1/completions", R"({"prompt": ")" + std::string(70000, 'a') + R"("})", 413, ""},
      {"unknown route", "GET", "/v1/nothing", "", 404, ""},
      {"unsupported endpoint", "POST", "/v1/embeddings", R"({"input": "x"})", 404, ""},
      {"wrong method", "GET", "/v1/completions", "", 404, ""},
  };
  for (const Case& c : cases) {
    const test::HttpResult r = curl(dir_, c.method, server_->url() + c.path, c.body);
    EXPECT_EQ(r.status, c.status) << c.name << ": " << r.body;
    json e;
    ASSERT_NO_THROW(e = json::parse(r.body)) << c.name << ": not JSON: " << r.body;
    ASSERT_TRUE(e.contains("error") && e["error"]["message"].is_string() && e["error"]["type"].is_string())
        << c.name << ": " << r.body;
    if (!c.param.empty()) {
      EXPECT_EQ(e["error"]["param"], c.param) << c.name << ": " << r.body;
    }
  }
  EXPECT_EQ(get("/health").status, 200);
  const test::HttpResult ok = post("/v1/completions", R"({"prompt": "the sea", "max_tokens": 3})");
  EXPECT_EQ(ok.status, 200) << ok.body;
  const json h = health();
  EXPECT_EQ(h["free_blocks"], h["total_blocks"]);
}

// Poll /health until nothing runs (up to 20 s); returns the last reading.
json wait_idle(const std::function<json()>& health) {
  json h;
  for (int i = 0; i < 400; ++i) {
    h = health();
    if (h["running"] == 0 && h["waiting"] == 0 && h["in_flight"] == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return h;
}

TEST_F(HttpTest, ClientThatHangsUpFreesItsBlocks) {
  const int64_t cancelled = health()["cancelled"];
  const std::string got = test::post_and_hang_up(
      server_->port(), "/v1/completions",
      R"({"prompt": "the sea", "max_tokens": 480, "stream": true, "ignore_eos": true})", "\"text\"");
  ASSERT_NE(got.find("200 OK"), std::string::npos) << got;
  const json h = wait_idle([&] { return health(); });
  EXPECT_EQ(h["cancelled"].get<int64_t>(), cancelled + 1) << "the request was cancelled, not run to its end";
  EXPECT_EQ(h["free_blocks"], h["total_blocks"]);
}

TEST_F(HttpTest, ManySimultaneousStreamingClients) {
  const std::vector<std::string> prompts = {"the sea", "a whale", "Zürich café", "she walked to the garden"};
  std::map<std::string, std::string> want;
  for (const std::string& p : prompts)
    want[p] = json::parse(post("/v1/completions",
                               json{{"prompt", p}, {"max_tokens", 24}, {"temperature", 0}, {"ignore_eos", true}}.dump())
                              .body)["choices"][0]["text"];
  constexpr int kClients = 16;
  std::vector<std::string> got(kClients), bodies(kClients);
  std::vector<int> status(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      const std::string p = prompts[static_cast<size_t>(i) % prompts.size()];
      const test::HttpResult r = post(
          "/v1/completions",
          json{{"prompt", p}, {"max_tokens", 24}, {"temperature", 0}, {"ignore_eos", true}, {"stream", true}}.dump());
      status[static_cast<size_t>(i)] = r.status;
      got[static_cast<size_t>(i)] = streamed(r.body, false).text;
      bodies[static_cast<size_t>(i)] = r.body;
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    EXPECT_EQ(status[static_cast<size_t>(i)], 200);
    EXPECT_EQ(got[static_cast<size_t>(i)], want[prompts[static_cast<size_t>(i) % prompts.size()]])
        << "client " << i << ": " << bodies[static_cast<size_t>(i)];
  }
  const json h = wait_idle([&] { return health(); });
  EXPECT_EQ(h["free_blocks"], h["total_blocks"]);
}

TEST_F(HttpTest, OpenAiNpmClient) {
  const fs::path client_dir = fs::absolute(diffmoe::test::repo_path("tools/openai-client"));
  ASSERT_TRUE(fs::exists(client_dir / "node_modules" / "openai"))
      << "the openai npm client is not installed: run tools/openai-client/setup.sh (tools/setup.sh runs it)";
  const test::Proc p =
      test::run_process({"node", fs::absolute(diffmoe::test::repo_path("tests/serve/openai_client.mjs")).string(),
                         server_->url() + "/v1", kModel},
                        dir_, dir_ / "node.err", {"DIFFMOE_OPENAI_CLIENT_DIR=" + client_dir.string()});
  EXPECT_EQ(p.exit_code, 0) << p.out << "\n" << test::read_text(dir_ / "node.err");
  EXPECT_NE(p.out.find("\"ok\":true"), std::string::npos) << p.out;
}

// SIGTERM with streams in flight: with --max-batch 1, four long streams (raw sockets, all sent at
// once) run one after another, so at the signal at least the queued ones are still in flight. All
// four finish (drain), then the process exits 0. With a short --shutdown-timeout the unfinished
// ones end as "cancelled" instead, every stream still ends with [DONE], and the process exits 0.
void check_sigterm(const std::vector<std::string>& args, const fs::path& dir, bool drained) {
  fs::create_directories(dir);
  test::ServerProcess srv(args, dir);
  ASSERT_GT(srv.port(), 0) << srv.log();
  std::vector<std::unique_ptr<test::RawStream>> streams;
  for (int i = 0; i < 4; ++i)
    streams.push_back(std::make_unique<test::RawStream>(
        srv.port(), "/v1/completions",
        R"({"prompt": "the sea", "max_tokens": 480, "stream": true, "ignore_eos": true})"));
  for (int i = 0; i < 500; ++i) {  // until all four reached the server
    const test::HttpResult h = curl(dir, "GET", srv.url() + "/health");
    if (h.status == 200) {
      const json j = json::parse(h.body);
      if (j["in_flight"].get<int64_t>() + j["finished"].get<int64_t>() == 4) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::thread stopper([&] { EXPECT_EQ(srv.stop(SIGTERM), 0) << srv.log(); });
  int cancelled = 0;
  for (auto& s : streams) {
    const std::string response = s->read_until("data: [DONE]");
    s->close();  // an idle keep-alive connection would hold a server thread for its 5 s timeout
    ASSERT_NE(response.find("200 OK"), std::string::npos) << response;
    const test::SseBody sse = parse_sse(test::http_body(response));
    EXPECT_TRUE(sse.done && sse.clean) << "each stream ends with [DONE]: " << response;
    ASSERT_FALSE(sse.events.empty());
    const std::string finish = sse.events.back()["choices"][0]["finish_reason"];
    if (finish == "cancelled") ++cancelled;
    else EXPECT_EQ(finish, "length");
  }
  stopper.join();
  if (drained) {
    EXPECT_EQ(cancelled, 0);
    EXPECT_EQ(srv.log().find("finishing 0 requests"), std::string::npos)
        << "the signal came while requests ran: " << srv.log();
  } else {
    EXPECT_GE(cancelled, 1) << srv.log();
  }
  EXPECT_NE(srv.log().find("SIGTERM: finishing"), std::string::npos) << srv.log();
  EXPECT_NE(srv.log().find("[serve] stopped"), std::string::npos) << srv.log();
}

TEST_F(HttpTest, SigtermFinishesStreamsInFlightThenExits) { check_sigterm(server_args("1"), dir_ / "sigterm", true); }
TEST_F(HttpTest, SigtermCancelsStreamsAfterTheShutdownTimeout) {
  check_sigterm(server_args("1", {"--shutdown-timeout", "0.05"}), dir_ / "sigterm-timeout", false);
}

}  // namespace
}  // namespace diffmoe::serve
