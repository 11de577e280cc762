// The OpenAI API subset of `diffmoe serve` as JSON, without HTTP (docs/serving.md "API"): parsing
// and checking /v1/completions and /v1/chat/completions bodies into prompts and SamplingParams, and
// building the response objects, streaming chunks and errors in OpenAI's shapes. A field of the
// wrong type, a value out of range or an unsupported option is an ApiError (HTTP 400) naming it.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "serve/request.h"

namespace diffmoe::serve {

using json = nlohmann::json;

// An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct ApiError : std::runtime_error {
  ApiError(int status, std::string type, const std::string& message, std::string param = "", std::string code = "")
      : std::runtime_error(message),
        status(status),
        type(std::move(type)),
        param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string type, param, code;
};
json error_body(const ApiError& e);
// A 400 invalid_request_error naming `param`.
ApiError invalid(const std::string& param, const std::string& message);

struct ApiLimits {
  int64_t max_tokens = 4096;        // the most tokens one request may ask to generate
  int64_t default_max_tokens = 16;  // /v1/completions without max_tokens (OpenAI's default)
  int64_t max_prompts = 64;         // prompts in one /v1/completions request
  int64_t max_stop = 16;            // stop strings per request
  int64_t max_logprobs = 20;
};

// A parsed request: one prompt per choice (n = 1 each), and the sampling parameters they share.
// max_tokens_given is false when the body had none: the server then uses the limits' default
// (completions) or what the context leaves (chat), capped by the limit.
struct ParsedRequest {
  std::vector<std::vector<int32_t>> prompts;
  SamplingParams params;
  bool max_tokens_given = false;
  bool stream = false, include_usage = false;
  bool chat = false;
  std::string model;
};

ParsedRequest parse_completion_request(const json& body, const data::Tokenizer& tok, const ApiLimits& limits);
ParsedRequest parse_chat_request(const json& body, const data::Tokenizer& tok, const ApiLimits& limits);

// One choice's result, accumulated from its request's events.
struct ChoiceResult {
  std::string prompt_text, text;  // echo: prompt_text comes first
  std::vector<TokenLogprob> prompt_tokens, tokens;
  std::string finish_reason, error;
  int64_t prompt_tokens_n = 0, completion_tokens_n = 0;
  void add(const RequestEvent& e);
};

struct ResponseIds {
  std::string id, model;
  int64_t created = 0;
};

json usage_json(int64_t prompt_tokens, int64_t completion_tokens);
json completion_response(const ResponseIds& ids, const std::vector<ChoiceResult>& choices, const ParsedRequest& req);
json chat_response(const ResponseIds& ids, const std::vector<ChoiceResult>& choices, const ParsedRequest& req);
// One streaming chunk for choice `index`: `text` with its tokens' logprobs (when asked), or the
// last chunk of the choice (finish_reason set). A chat choice's first chunk carries the role.
json completion_chunk(const ResponseIds& ids, int64_t index, const std::string& text,
                      const std::vector<TokenLogprob>& tokens, const ParsedRequest& req,
                      const std::string& finish_reason);
json chat_chunk(const ResponseIds& ids, int64_t index, const std::string& text, const std::vector<TokenLogprob>& tokens,
                const ParsedRequest& req, const std::string& finish_reason, bool first);
// The usage chunk of a stream (stream_options.include_usage): no choices.
json usage_chunk(const ResponseIds& ids, bool chat, int64_t prompt_tokens, int64_t completion_tokens);

// JSON text with invalid UTF-8 (a token that is part of a character) replaced by U+FFFD.
std::string dump(const json& j);

}  // namespace diffmoe::serve
