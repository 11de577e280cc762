#include "serve/scheduler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "model/sampler.h"
#include "serve/logprobs.h"
#include "serve/text_stream.h"

namespace diffmoe::serve {

// A request the engine thread runs.
struct Scheduler::Active {
  std::shared_ptr<Request> req;
  int64_t seq = -1;                         // the engine's sequence (-1: none taken)
  int64_t prefilled = 0;                    // prompt positions in the cache
  int64_t budget_blocks = 0;                // blocks for prompt + max_tokens, reserved at admission
  std::vector<TokenLogprob> prompt_tokens;  // echo: the prompt's tokens (logprobs filled as chunks run)
  std::string prompt_text;
  std::vector<int32_t> generated;    // sampled tokens (the end-of-text token too)
  int32_t next = -1;                 // the last sampled token: fed at the next step
  std::string text;                  // completion bytes so far
  std::vector<TokenLogprob> tokens;  // the completion's tokens
  size_t sent_bytes = 0, sent_tokens = 0, searched = 0;
  int64_t text_base = 0;  // bytes before the completion in the reported text (echo)
  Sampler sampler;
  StopMatcher stop;
  bool done = false;

  Active(std::shared_ptr<Request> r, const SamplerOptions& so)
      : req(std::move(r)), sampler(so), stop(req->params().stop) {}
  const SamplingParams& params() const { return req->params(); }
  int64_t prompt_len() const { return static_cast<int64_t>(req->prompt().size()); }
  bool wants_prompt_logprobs() const { return params().echo && params().logprobs >= 0; }
};

Scheduler::Scheduler(Model& model, const data::Tokenizer& tokenizer, SchedulerOptions opt)
    : tok_(tokenizer), opt_(opt), engine_(model, opt.engine) {
  DIFFMOE_CHECK(opt_.prefill_chunk >= 1, "[scheduler] prefill_chunk {} must be >= 1", opt_.prefill_chunk);
  const int64_t V = model.config().vocab_size;
  valid_id_.assign(static_cast<size_t>(V), 0);
  for (int64_t id = 0; id < std::min<int64_t>(V, tokenizer.vocab_size()); ++id)
    valid_id_[static_cast<size_t>(id)] = tokenizer.is_token(static_cast<int32_t>(id)) ? 1 : 0;
  DIFFMOE_CHECK(std::any_of(valid_id_.begin(), valid_id_.end(), [](char c) { return c != 0; }),
                "[scheduler] the tokenizer ({} ids) has no id in the model's vocabulary of {}", tokenizer.vocab_size(),
                V);
  free_blocks_ = engine_.cache().free_blocks();
}

Scheduler::~Scheduler() {
  try {
    stop(false);
  } catch (...) {  // a destructor must not throw; stop() only joins
  }
}

void Scheduler::start() {
  std::lock_guard lock(mu_);
  DIFFMOE_CHECK(!thread_.joinable(), "[scheduler] already started");
  thread_ = std::thread([this] { thread_main(); });
}

void Scheduler::stop(bool drain) {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    drain_ = drain;
    wake_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Scheduler::cancel_all() {
  {
    std::lock_guard lock(mu_);
    for (auto& r : waiting_) r->mark_cancelled();
    cancel_running_ = true;  // the engine thread finishes the running ones at its next iteration
    wake_ = true;
  }
  cv_.notify_all();
}

std::shared_ptr<Request> Scheduler::submit(std::vector<int32_t> prompt, SamplingParams p) {
  const int64_t P = static_cast<int64_t>(prompt.size()), V = config().vocab_size;
  if (P == 0) throw InvalidRequest("prompt", "the prompt has no tokens");
  for (const int32_t id : prompt)
    if (id < 0 || id >= V || !valid_id_[static_cast<size_t>(id)])
      throw InvalidRequest("prompt", fmt::format("token id {} is not a token of this model's tokenizer", id));
  if (p.max_tokens < 0) throw InvalidRequest("max_tokens", fmt::format("max_tokens {} must be >= 0", p.max_tokens));
  const int64_t ctx = max_context();
  if (P >= ctx + (p.max_tokens == 0 ? 1 : 0))
    throw InvalidRequest("prompt",
                         fmt::format("This model's maximum context length is {} tokens. However, your prompt has "
                                     "{} tokens.",
                                     ctx, P));
  if (P + p.max_tokens > ctx)
    throw InvalidRequest("max_tokens", fmt::format("This model's maximum context length is {} tokens. However, you "
                                                   "requested {} tokens ({} in the prompt, {} for the completion).",
                                                   ctx, P + p.max_tokens, P, p.max_tokens));
  const int64_t blocks = engine_.cache().blocks_for(P + p.max_tokens);
  if (blocks > engine_.cache().total_blocks())
    throw InvalidRequest("max_tokens", fmt::format("{} tokens need {} cache blocks; the server's cache has {}",
                                                   P + p.max_tokens, blocks, engine_.cache().total_blocks()));
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature))
    throw InvalidRequest("temperature", fmt::format("temperature {} must be >= 0", p.temperature));
  if (!(p.top_p > 0.0 && p.top_p <= 1.0))
    throw InvalidRequest("top_p", fmt::format("top_p {} must be in (0, 1]", p.top_p));
  if (p.top_k < 0) throw InvalidRequest("top_k", fmt::format("top_k {} must be >= 0 (0 = off)", p.top_k));
  if (p.logprobs > max_logprobs())
    throw InvalidRequest("logprobs", fmt::format("logprobs {} exceeds the limit of {}", p.logprobs, max_logprobs()));
  if (!p.seed) p.seed = std::random_device{}() * uint64_t{0x100000001} ^ std::random_device{}();

  std::shared_ptr<Request> r;
  {
    std::lock_guard lock(mu_);
    if (stopping_) throw ServerBusy("the server is shutting down");
    if (static_cast<int64_t>(waiting_.size()) >= opt_.max_waiting)
      throw ServerBusy(fmt::format("{} requests are waiting already", waiting_.size()));
    r = std::make_shared<Request>(next_id_++, std::move(prompt), std::move(p));
    r->set_on_cancel([this] {
      {
        std::lock_guard l(mu_);
        wake_ = true;
      }
      cv_.notify_all();
    });
    waiting_.push_back(r);
    n_waiting_ = static_cast<int64_t>(waiting_.size());
    wake_ = true;
  }
  cv_.notify_all();
  return r;
}

SchedulerStats Scheduler::stats() const {
  return SchedulerStats{.running = n_running_.load(),
                        .waiting = n_waiting_.load(),
                        .free_blocks = free_blocks_.load(),
                        .total_blocks = engine_.cache().total_blocks(),
                        .block_size = engine_.cache().block_size(),
                        .steps = steps_.load(),
                        .prompt_tokens = prompt_tokens_.load(),
                        .generated_tokens = generated_.load(),
                        .finished = finished_.load(),
                        .cancelled = cancelled_.load()};
}

void Scheduler::thread_main() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || wake_ || !waiting_.empty() || !running_.empty(); });
      wake_ = false;
      if (stopping_ && !drain_) {
        for (auto& r : waiting_) r->mark_cancelled();
        cancel_running_ = true;
      }
      if (stopping_ && waiting_.empty() && running_.empty()) break;
    }
    iteration();
  }
}

bool Scheduler::run_once() {
  DIFFMOE_CHECK(!thread_.joinable(), "[scheduler] run_once is for a scheduler without its thread");
  return iteration();
}

void Scheduler::admit() {
  PagedCache& cache = engine_.cache();
  std::lock_guard lock(mu_);
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if ((*it)->cancelled()) {
      (*it)->push(RequestEvent{
          .done = true, .finish_reason = "cancelled", .prompt_tokens = static_cast<int64_t>((*it)->prompt().size())});
      ++cancelled_;
      it = waiting_.erase(it);
    } else {
      ++it;
    }
  }
  while (static_cast<int64_t>(running_.size()) < engine_.options().max_batch && !waiting_.empty()) {
    const std::shared_ptr<Request>& r = waiting_.front();
    const SamplingParams& p = r->params();
    const int64_t P = static_cast<int64_t>(r->prompt().size());
    const int64_t need = cache.blocks_for(P + p.max_tokens);
    int64_t outstanding = 0;  // blocks the running requests may still take
    for (const auto& a : running_) outstanding += a->budget_blocks - static_cast<int64_t>(cache.blocks(a->seq).size());
    if (cache.free_blocks() - outstanding < need) break;  // arrival order: nothing overtakes the head
    auto a = std::make_unique<Active>(
        r, SamplerOptions{.temperature = p.temperature, .top_k = p.top_k, .top_p = p.top_p, .seed = *p.seed});
    waiting_.pop_front();
    prompt_tokens_ += P;
    if (p.echo) {
      a->prompt_text = tok_.decode(a->req->prompt());
      a->text_base = static_cast<int64_t>(a->prompt_text.size());
      int64_t offset = 0;
      for (const int32_t id : a->req->prompt()) {
        TokenLogprob t{.id = id, .text = std::string(tok_.token_bytes(id)), .text_offset = offset};
        offset += static_cast<int64_t>(t.text.size());
        a->prompt_tokens.push_back(std::move(t));
      }
    }
    if (p.max_tokens == 0 && !a->wants_prompt_logprobs()) {  // nothing to compute: the prompt is the answer
      if (p.echo) a->req->push(RequestEvent{.text = a->prompt_text, .tokens = a->prompt_tokens, .prompt = true});
      a->req->push(RequestEvent{.done = true, .finish_reason = "length", .prompt_tokens = P});
      ++finished_;
      continue;
    }
    a->seq = engine_.add_sequence();
    a->budget_blocks = need;
    running_.push_back(std::move(a));
  }
  n_waiting_ = static_cast<int64_t>(waiting_.size());
}

bool Scheduler::iteration() {
  bool cancel_running = false;
  {
    std::lock_guard lock(mu_);
    cancel_running = cancel_running_;
    cancel_running_ = false;
  }
  for (auto& a : running_)
    if (cancel_running || a->req->cancelled()) finish(*a, "cancelled");
  std::erase_if(running_, [](const auto& a) { return a->done; });
  admit();
  n_running_ = static_cast<int64_t>(running_.size());
  free_blocks_ = engine_.cache().free_blocks();
  if (running_.empty()) return false;

  // The batch: decoding requests first (one row each), then prompt chunks while rows remain.
  const EngineOptions& eo = engine_.options();
  int64_t rows = eo.max_step_tokens, logit_rows = eo.max_logit_rows;
  std::vector<StepSequence> batch;
  std::vector<Active*> who;
  for (auto& a : running_) {
    if (a->prefilled < a->prompt_len()) continue;
    batch.push_back({.seq = a->seq, .tokens = std::span<const int32_t>(&a->next, 1), .logits = LogitRows::kLast});
    who.push_back(a.get());
    --rows;
    --logit_rows;
  }
  for (auto& a : running_) {
    const int64_t left = a->prompt_len() - a->prefilled;
    if (left == 0 || rows == 0) continue;
    int64_t n = std::min({opt_.prefill_chunk, left, rows});
    LogitRows lr = LogitRows::kNone;
    if (a->wants_prompt_logprobs()) {
      n = std::min(n, logit_rows);
      lr = LogitRows::kAll;
    } else if (n == left && a->params().max_tokens > 0) {
      lr = logit_rows > 0 ? LogitRows::kLast : LogitRows::kNone;
      if (lr == LogitRows::kNone) n = left - 1;  // the last prompt position waits for a logit row
    }
    if (n <= 0) continue;
    batch.push_back({.seq = a->seq,
                     .tokens = std::span<const int32_t>(a->req->prompt())
                                   .subspan(static_cast<size_t>(a->prefilled), static_cast<size_t>(n)),
                     .logits = lr});
    who.push_back(a.get());
    rows -= n;
    logit_rows -= lr == LogitRows::kAll ? n : lr == LogitRows::kLast ? 1 : 0;
  }
  if (batch.empty()) return false;

  StepOutput out;
  try {
    out = engine_.step({}, batch);
    const Tensor& logits = out.logits;
    host_logits_.resize(static_cast<size_t>(logits.numel()));
    if (logits.dtype == DType::kF64) {
      std::vector<double> d(static_cast<size_t>(logits.numel()));
      engine_.backend().download(d.data(), logits);
      std::copy(d.begin(), d.end(), host_logits_.begin());
    } else {
      engine_.backend().download(host_logits_.data(), logits);
    }
  } catch (const std::exception& e) {
    fail_all(e.what());
    return true;
  }
  ++steps_;
  // Sampling and logprobs run on the host; whatever throws there (a request's own bad state) fails the running
  // requests with its message, as a failed engine step does, and the server goes on serving.
  try {
    take_outputs(batch, who, out);
  } catch (const std::exception& e) {
    fail_all(e.what());
    return true;
  }
  std::erase_if(running_, [](const auto& a) { return a->done; });
  n_running_ = static_cast<int64_t>(running_.size());
  free_blocks_ = engine_.cache().free_blocks();
  return true;
}

void Scheduler::take_outputs(std::span<const StepSequence> batch, std::span<Active* const> who, const StepOutput& out) {
  const int64_t V = config().vocab_size;
  const auto row = [&](int64_t r) { return std::span<float>(host_logits_.data() + r * V, static_cast<size_t>(V)); };
  for (size_t i = 0; i < batch.size(); ++i) {
    Active& a = *who[i];
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    if (a.prefilled == a.prompt_len()) {  // a decode row
      sample_next(a, row(out.first_row[i]));
      continue;
    }
    if (batch[i].logits == LogitRows::kAll) {  // row t predicts prompt position prefilled + t + 1
      for (int64_t t = 0; t < n; ++t) {
        const int64_t p = a.prefilled + t + 1;
        if (p >= a.prompt_len()) break;
        std::span<float> z = row(out.first_row[i] + t);
        mask_unknown_ids(z);
        const double lse = log_sum_exp(z);
        TokenLogprob& tok = a.prompt_tokens[static_cast<size_t>(p)];
        tok.logprob = z[static_cast<size_t>(tok.id)] - lse;
        for (const auto& [id, lp] : top_logprobs(z, a.params().logprobs, lse))
          tok.top.emplace_back(std::string(tok_.token_bytes(id)), lp);
      }
    }
    a.prefilled += n;
    if (a.prefilled < a.prompt_len()) continue;
    if (a.params().echo) a.req->push(RequestEvent{.text = a.prompt_text, .tokens = a.prompt_tokens, .prompt = true});
    if (a.params().max_tokens == 0) {
      finish(a, "length");
      continue;
    }
    sample_next(a, row(out.first_row[i] + (batch[i].logits == LogitRows::kAll ? n - 1 : 0)));
  }
}

// Only the tokenizer's ids: the model's vocabulary may be padded past them, and tiktoken vocabularies have unused ids
// in between. −inf is probability 0 to the sampler and to log-softmax.
void Scheduler::mask_unknown_ids(std::span<float> z) const {
  for (size_t id = 0; id < z.size(); ++id)
    if (!valid_id_[id]) z[id] = -std::numeric_limits<float>::infinity();
}

void Scheduler::sample_next(Active& a, std::span<float> z) {
  mask_unknown_ids(z);
  const double lse = a.params().logprobs >= 0 ? log_sum_exp(z) : 0.0;
  const int32_t id = a.sampler.sample(std::span<const float>(z.data(), z.size()), a.generated.size());
  add_token(a, id, z, lse);
}

void Scheduler::add_token(Active& a, int32_t id, std::span<const float> z, double lse) {
  const SamplingParams& p = a.params();
  ++generated_;
  a.generated.push_back(id);
  const bool eos = tok_.eos_id() && id == *tok_.eos_id() && !p.ignore_eos;
  // The end-of-text token adds no text but is reported with its logprob (zero-width, at the end):
  // a scorer that reads one token past the prompt (lm-evaluation-harness) must find it.
  TokenLogprob t{.id = id,
                 .text = eos ? std::string() : std::string(tok_.token_bytes(id)),
                 .text_offset = a.text_base + static_cast<int64_t>(a.text.size())};
  if (p.logprobs >= 0) {
    t.logprob = z[static_cast<size_t>(id)] - lse;
    for (const auto& [alt, lp] : top_logprobs(z, p.logprobs, lse))
      t.top.emplace_back(std::string(tok_.token_bytes(alt)), lp);
  }
  a.text += t.text;
  a.tokens.push_back(std::move(t));
  if (eos) {
    finish(a, "stop");
    return;
  }
  if (!a.stop.empty()) {
    const std::optional<size_t> at = a.stop.find(a.text, a.searched);
    a.searched = a.text.size();
    if (at) {
      a.text.resize(*at);
      finish(a, "stop");
      return;
    }
  }
  if (static_cast<int64_t>(a.generated.size()) >= p.max_tokens) {
    finish(a, "length");
    return;
  }
  a.next = id;
  send_ready(a, false);
}

// Sends the completion text that is final: all of it when the request ends, else the complete
// UTF-8 prefix of what no stop string can still claim. Tokens go with the event that sends their
// first byte.
void Scheduler::send_ready(Active& a, bool final) {
  size_t limit = a.text.size();
  if (!final) {
    limit -= std::min(limit, a.stop.holdback());
    limit = complete_utf8_prefix(std::string_view(a.text).substr(0, limit));
  }
  RequestEvent e;
  if (limit > a.sent_bytes) e.text = a.text.substr(a.sent_bytes, limit - a.sent_bytes);
  // At the end also the zero-width end-of-text token; a token past a stop string's cut is dropped.
  while (a.sent_tokens < a.tokens.size()) {
    const TokenLogprob& t = a.tokens[a.sent_tokens];
    const int64_t at = t.text_offset - a.text_base;
    if (!(at < static_cast<int64_t>(limit) || (final && t.text.empty() && at == static_cast<int64_t>(limit)))) break;
    e.tokens.push_back(a.tokens[a.sent_tokens++]);
  }
  if (e.text.empty() && e.tokens.empty()) return;
  a.sent_bytes = std::max(a.sent_bytes, limit);
  a.req->push(std::move(e));
}

void Scheduler::finish(Active& a, const std::string& reason) {
  if (a.done) return;
  if (reason != "cancelled") send_ready(a, true);
  a.req->push(RequestEvent{.done = true,
                           .finish_reason = reason,
                           .prompt_tokens = a.prompt_len(),
                           .completion_tokens = static_cast<int64_t>(a.generated.size())});
  if (a.seq >= 0) engine_.release(a.seq);  // the blocks are free for the next step
  a.seq = -1;
  a.done = true;
  if (reason == "cancelled") ++cancelled_;
  else ++finished_;
}

void Scheduler::fail_all(const std::string& message) {
  for (auto& a : running_) {
    if (a->done) continue;
    a->req->push(RequestEvent{.done = true,
                              .finish_reason = "error",
                              .error = message,
                              .prompt_tokens = a->prompt_len(),
                              .completion_tokens = static_cast<int64_t>(a->generated.size())});
    if (a->seq >= 0 && engine_.cache().contains(a->seq)) engine_.release(a->seq);
    a->seq = -1;
    a->done = true;
    ++finished_;
  }
  running_.clear();
  n_running_ = 0;
  free_blocks_ = engine_.cache().free_blocks();
}

}  // namespace diffmoe::serve
