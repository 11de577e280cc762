#include "serve/openai_api.h"

#include <fmt/format.h>

#include <cmath>

#include "serve/chat_template.h"

namespace diffmoe::serve {

json error_body(const ApiError& e) {
  return json{{"error",
               {{"message", e.what()},
                {"type", e.type},
                {"param", e.param.empty() ? json(nullptr) : json(e.param)},
                {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

ApiError invalid(const std::string& param, const std::string& message) {
  return ApiError(400, "invalid_request_error", message, param);
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

namespace {

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::null: return "null";
    case json::value_t::number_float: return "a number";
    default: return "an integer";
  }
}

ApiError wrong_type(const std::string& name, const char* want, const json& got) {
  return invalid(name,
                 fmt::format("Invalid type for '{}': expected {}, but got {} instead.", name, want, type_name(got)));
}

// The field's value, or none when absent or null.
const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

bool is_integer(const json& v) {
  if (v.is_number_integer() || v.is_number_unsigned()) return true;
  return v.is_number_float() && std::isfinite(v.get<double>()) && std::floor(v.get<double>()) == v.get<double>() &&
         std::abs(v.get<double>()) < 9.0e15;
}

std::optional<int64_t> get_int(const json& body, const char* name, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!is_integer(*v)) throw wrong_type(name, "an integer", *v);
  const int64_t x = v->is_number_float() ? static_cast<int64_t>(v->get<double>()) : v->get<int64_t>();
  if (x < lo || x > hi) throw invalid(name, fmt::format("'{}' must be in [{}, {}], got {}", name, lo, hi, x));
  return x;
}

std::optional<double> get_number(const json& body, const char* name, double lo, double hi, bool lo_open = false) {
  const json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) throw wrong_type(name, "a number", *v);
  const double x = v->get<double>();
  if (!std::isfinite(x) || x > hi || x < lo || (lo_open && x == lo))
    throw invalid(name, fmt::format("'{}' must be in {}{}, {}], got {}", name, lo_open ? "(" : "[", lo, hi, x));
  return x;
}

std::optional<bool> get_bool(const json& body, const char* name) {
  const json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) throw wrong_type(name, "a boolean", *v);
  return v->get<bool>();
}

// Options the server does not implement: accepted only at their neutral values.
void reject_unsupported(const json& body) {
  if (const auto n = get_int(body, "n", 1, 128); n && *n != 1) throw invalid("n", "only n = 1 is supported");
  if (const auto b = get_int(body, "best_of", 1, 128); b && *b != 1)
    throw invalid("best_of", "only best_of = 1 is supported");
  for (const char* p : {"presence_penalty", "frequency_penalty"})
    if (const auto v = get_number(body, p, -2.0, 2.0); v && *v != 0.0)
      throw invalid(p, fmt::format("{} is not supported (only 0)", p));
  if (const json* v = field(body, "logit_bias"); v && !(v->is_object() && v->empty()))
    throw invalid("logit_bias", "logit_bias is not supported");
  if (const json* v = field(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty()))
    throw invalid("suffix", "suffix is not supported");
  if (const json* v = field(body, "tools"); v && !(v->is_array() && v->empty()))
    throw invalid("tools", "tools are not supported");
}

// The options both endpoints share: sampling, stop, stream, seed, model.
void parse_common(const json& body, const ApiLimits& limits, ParsedRequest& r) {
  if (!body.is_object())
    throw invalid("", fmt::format("the request body must be a JSON object, got {}", type_name(body)));
  reject_unsupported(body);
  if (const json* m = field(body, "model")) {
    if (!m->is_string()) throw wrong_type("model", "a string", *m);
    r.model = m->get<std::string>();
  }
  SamplingParams& p = r.params;
  if (const auto t = get_number(body, "temperature", 0.0, 2.0)) p.temperature = *t;
  if (const auto t = get_number(body, "top_p", 0.0, 1.0, /*lo_open=*/true)) p.top_p = *t;
  if (const auto k = get_int(body, "top_k", -1, int64_t{1} << 31)) p.top_k = *k < 0 ? 0 : *k;  // -1: off (vLLM's)
  if (const json* s = field(body, "seed")) {
    if (!is_integer(*s)) throw wrong_type("seed", "an integer", *s);
    p.seed =
        static_cast<uint64_t>(s->is_number_unsigned() ? s->get<uint64_t>() : static_cast<uint64_t>(s->get<int64_t>()));
  }
  if (const json* s = field(body, "stop")) {
    if (s->is_string()) {
      p.stop.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      for (const json& x : *s) {
        if (!x.is_string()) throw wrong_type("stop", "a string or an array of strings", *s);
        p.stop.push_back(x.get<std::string>());
      }
    } else {
      throw wrong_type("stop", "a string or an array of strings", *s);
    }
    if (static_cast<int64_t>(p.stop.size()) > limits.max_stop)
      throw invalid("stop", fmt::format("at most {} stop strings, got {}", limits.max_stop, p.stop.size()));
  }
  if (const auto b = get_bool(body, "ignore_eos")) p.ignore_eos = *b;
  if (const auto b = get_bool(body, "stream")) r.stream = *b;
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) throw wrong_type("stream_options", "an object", *so);
    if (const auto u = get_bool(*so, "include_usage")) r.include_usage = *u;
  }
}

void parse_max_tokens(const json& body, const ApiLimits& limits, ParsedRequest& r, const char* name) {
  const json* v = field(body, name);
  if (!v) return;
  if (!is_integer(*v)) throw wrong_type(name, "an integer", *v);
  const int64_t x = v->is_number_float() ? static_cast<int64_t>(v->get<double>()) : v->get<int64_t>();
  if (x < 0) throw invalid(name, fmt::format("'{}' must be >= 0, got {}", name, x));
  if (x > limits.max_tokens)
    throw invalid(name, fmt::format("'{}' is {}, more than this server's limit of {} tokens per request", name, x,
                                    limits.max_tokens));
  r.params.max_tokens = x;
  r.max_tokens_given = true;
}

// A text prompt's tokens, special tokens matched (as OpenAI's completions API reads
// "<|endoftext|>" in a prompt); an empty text starts a new document (the end-of-text token).
std::vector<int32_t> encode_prompt(const std::string& text, const data::Tokenizer& tok) {
  std::vector<int32_t> ids = tok.encode_with_special(text);
  if (ids.empty()) {
    if (!tok.eos_id())
      throw invalid("prompt", "the prompt is empty and the tokenizer has no end-of-text token to start from");
    ids.push_back(*tok.eos_id());
  }
  return ids;
}

std::vector<int32_t> token_list(const json& a, const char* name) {
  std::vector<int32_t> ids;
  for (const json& x : a) {
    if (!is_integer(x)) throw wrong_type(name, "a string, an array of strings or an array of token ids", a);
    const int64_t id = x.is_number_float() ? static_cast<int64_t>(x.get<double>()) : x.get<int64_t>();
    if (id < 0 || id > INT32_MAX) throw invalid(name, fmt::format("token id {} is out of range", id));
    ids.push_back(static_cast<int32_t>(id));
  }
  if (ids.empty()) throw invalid(name, "a token prompt must not be empty");
  return ids;
}

// Whether s is valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    const uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

// A token as logprobs show it: its text, or "bytes:\xNN..." when its bytes are not valid UTF-8
// on their own (part of a character), as OpenAI's API writes such tokens: two byte tokens never
// collapse into the same "\uFFFD" key of a top_logprobs object.
std::string token_text(const std::string& bytes) {
  if (valid_utf8(bytes)) return bytes;
  std::string out = "bytes:";
  for (const char c : bytes) out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
  return out;
}

json token_logprobs_completion(const std::vector<TokenLogprob>& toks) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  for (const TokenLogprob& t : toks) {
    tokens.push_back(token_text(t.text));
    lps.push_back(t.logprob ? json(*t.logprob) : json(nullptr));
    if (t.logprob) {
      json top = json::object();
      for (const auto& [text, lp] : t.top) top[token_text(text)] = lp;
      tops.push_back(top);
    } else {
      tops.push_back(nullptr);
    }
    offsets.push_back(t.text_offset);
  }
  return json{{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json bytes_of(const std::string& s) {
  json b = json::array();
  for (const char c : s) b.push_back(static_cast<int>(static_cast<unsigned char>(c)));
  return b;
}

json token_logprobs_chat(const std::vector<TokenLogprob>& toks) {
  json content = json::array();
  for (const TokenLogprob& t : toks) {
    json top = json::array();
    for (const auto& [text, lp] : t.top)
      top.push_back({{"token", token_text(text)}, {"logprob", lp}, {"bytes", bytes_of(text)}});
    content.push_back({{"token", token_text(t.text)},
                       {"logprob", t.logprob.value_or(0.0)},
                       {"bytes", bytes_of(t.text)},
                       {"top_logprobs", top}});
  }
  return json{{"content", content}};
}

}  // namespace

ParsedRequest parse_completion_request(const json& body, const data::Tokenizer& tok, const ApiLimits& limits) {
  ParsedRequest r;
  parse_common(body, limits, r);
  r.params.max_tokens = limits.default_max_tokens;
  parse_max_tokens(body, limits, r, "max_tokens");
  if (const auto e = get_bool(body, "echo")) r.params.echo = *e;
  if (const auto k = get_int(body, "logprobs", 0, limits.max_logprobs)) r.params.logprobs = *k;
  const json* p = field(body, "prompt");
  if (!p) throw invalid("prompt", "'prompt' is required");
  if (p->is_string()) {
    r.prompts.push_back(encode_prompt(p->get<std::string>(), tok));
  } else if (p->is_array() && !p->empty()) {
    const json& first = p->front();
    if (first.is_string()) {
      for (const json& x : *p) {
        if (!x.is_string()) throw wrong_type("prompt", "a string, an array of strings or an array of token ids", *p);
        r.prompts.push_back(encode_prompt(x.get<std::string>(), tok));
      }
    } else if (first.is_array()) {
      for (const json& x : *p) {
        if (!x.is_array()) throw wrong_type("prompt", "a string, an array of strings or an array of token ids", *p);
        r.prompts.push_back(token_list(x, "prompt"));
      }
    } else {
      r.prompts.push_back(token_list(*p, "prompt"));
    }
  } else {
    throw p->is_array() ? invalid("prompt", "'prompt' must not be an empty array")
                        : wrong_type("prompt", "a string, an array of strings or an array of token ids", *p);
  }
  if (static_cast<int64_t>(r.prompts.size()) > limits.max_prompts)
    throw invalid("prompt",
                  fmt::format("at most {} prompts per request, got {}", limits.max_prompts, r.prompts.size()));
  return r;
}

ParsedRequest parse_chat_request(const json& body, const data::Tokenizer& tok, const ApiLimits& limits) {
  ParsedRequest r;
  r.chat = true;
  parse_common(body, limits, r);
  parse_max_tokens(body, limits, r, "max_tokens");
  parse_max_tokens(body, limits, r, "max_completion_tokens");
  if (get_bool(body, "logprobs").value_or(false))
    r.params.logprobs = get_int(body, "top_logprobs", 0, limits.max_logprobs).value_or(0);
  const json* m = field(body, "messages");
  if (!m) throw invalid("messages", "'messages' is required");
  if (!m->is_array() || m->empty()) throw invalid("messages", "'messages' must be a non-empty array of messages");
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!msg.is_object()) throw wrong_type(where, "an object", msg);
    const json* role = field(msg, "role");
    if (!role || !role->is_string()) throw invalid(where + ".role", "each message needs a string 'role'");
    const std::string rs = role->get<std::string>();
    if (rs != "system" && rs != "user" && rs != "assistant" && rs != "developer")
      throw invalid(where + ".role", fmt::format("role '{}' is not one of system, user, assistant", rs));
    ChatMessage cm{.role = rs == "developer" ? "system" : rs, .content = ""};
    if (const json* c = field(msg, "content")) {
      if (c->is_string()) {
        cm.content = c->get<std::string>();
      } else if (c->is_array()) {  // content parts: text only
        for (const json& part : *c) {
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
              !part["text"].is_string())
            throw invalid(where + ".content",
                          "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported");
          cm.content += part["text"].get<std::string>();
        }
      } else {
        throw wrong_type(where + ".content", "a string or an array of text parts", *c);
      }
    }
    messages.push_back(std::move(cm));
  }
  r.prompts.push_back(apply_chat_template(messages, tok));
  for (std::string& s : chat_stop_strings()) r.params.stop.push_back(std::move(s));
  return r;
}

void ChoiceResult::add(const RequestEvent& e) {
  if (e.prompt) {
    prompt_text = e.text;
    prompt_tokens = e.tokens;
    return;
  }
  text += e.text;
  tokens.insert(tokens.end(), e.tokens.begin(), e.tokens.end());
  if (e.done) {
    finish_reason = e.finish_reason;
    error = e.error;
    prompt_tokens_n = e.prompt_tokens;
    completion_tokens_n = e.completion_tokens;
  }
}

json usage_json(int64_t prompt_tokens, int64_t completion_tokens) {
  return json{{"prompt_tokens", prompt_tokens},
              {"completion_tokens", completion_tokens},
              {"total_tokens", prompt_tokens + completion_tokens}};
}

json completion_response(const ResponseIds& ids, const std::vector<ChoiceResult>& choices, const ParsedRequest& req) {
  json cs = json::array();
  int64_t pt = 0, ct = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceResult& c = choices[i];
    json logprobs = nullptr;
    if (req.params.logprobs >= 0) {
      std::vector<TokenLogprob> all = req.params.echo ? c.prompt_tokens : std::vector<TokenLogprob>{};
      all.insert(all.end(), c.tokens.begin(), c.tokens.end());
      logprobs = token_logprobs_completion(all);
    }
    cs.push_back({{"index", i},
                  {"text", (req.params.echo ? c.prompt_text : "") + c.text},
                  {"logprobs", logprobs},
                  {"finish_reason", c.finish_reason}});
    pt += c.prompt_tokens_n;
    ct += c.completion_tokens_n;
  }
  return json{{"id", ids.id},  {"object", "text_completion"}, {"created", ids.created}, {"model", ids.model},
              {"choices", cs}, {"usage", usage_json(pt, ct)}};
}

json chat_response(const ResponseIds& ids, const std::vector<ChoiceResult>& choices, const ParsedRequest& req) {
  json cs = json::array();
  int64_t pt = 0, ct = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceResult& c = choices[i];
    cs.push_back({{"index", i},
                  {"message", {{"role", "assistant"}, {"content", c.text}}},
                  {"logprobs", req.params.logprobs >= 0 ? token_logprobs_chat(c.tokens) : json(nullptr)},
                  {"finish_reason", c.finish_reason}});
    pt += c.prompt_tokens_n;
    ct += c.completion_tokens_n;
  }
  return json{{"id", ids.id},  {"object", "chat.completion"}, {"created", ids.created}, {"model", ids.model},
              {"choices", cs}, {"usage", usage_json(pt, ct)}};
}

json completion_chunk(const ResponseIds& ids, int64_t index, const std::string& text,
                      const std::vector<TokenLogprob>& tokens, const ParsedRequest& req,
                      const std::string& finish_reason) {
  json choice = {
      {"index", index},
      {"text", text},
      {"logprobs", req.params.logprobs >= 0 && !tokens.empty() ? token_logprobs_completion(tokens) : json(nullptr)},
      {"finish_reason", finish_reason.empty() ? json(nullptr) : json(finish_reason)}};
  return json{{"id", ids.id},
              {"object", "text_completion"},
              {"created", ids.created},
              {"model", ids.model},
              {"choices", json::array({choice})}};
}

json chat_chunk(const ResponseIds& ids, int64_t index, const std::string& text, const std::vector<TokenLogprob>& tokens,
                const ParsedRequest& req, const std::string& finish_reason, bool first) {
  json delta = json::object();
  if (first) delta["role"] = "assistant";
  if (!text.empty() || (first && finish_reason.empty())) delta["content"] = text;
  json choice = {
      {"index", index},
      {"delta", delta},
      {"logprobs", req.params.logprobs >= 0 && !tokens.empty() ? token_logprobs_chat(tokens) : json(nullptr)},
      {"finish_reason", finish_reason.empty() ? json(nullptr) : json(finish_reason)}};
  return json{{"id", ids.id},
              {"object", "chat.completion.chunk"},
              {"created", ids.created},
              {"model", ids.model},
              {"choices", json::array({choice})}};
}

json usage_chunk(const ResponseIds& ids, bool chat, int64_t prompt_tokens, int64_t completion_tokens) {
  return json{{"id", ids.id},
              {"object", chat ? "chat.completion.chunk" : "text_completion"},
              {"created", ids.created},
              {"model", ids.model},
              {"choices", json::array()},
              {"usage", usage_json(prompt_tokens, completion_tokens)}};
}

}  // namespace diffmoe::serve
