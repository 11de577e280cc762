// One generation request as the scheduler runs it, and the handle an HTTP handler keeps: the
// sampling parameters, the events the engine thread sends back (text deltas with their tokens and
// logprobs, then the end), and cancellation. A handle is shared by exactly two threads: the handler
// (waits for events, may cancel) and the engine thread (pushes events, reads the cancel flag).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace diffmoe::serve {

struct SamplingParams {
  double temperature = 1.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = all
  double top_p = 1.0;
  std::optional<uint64_t> seed = {};   // none: a fresh random seed per request
  int64_t max_tokens = 16;             // tokens to generate at most (0: only the prompt's logprobs)
  std::vector<std::string> stop = {};  // generation ends before the first occurrence of any (not part of the text)
  int64_t logprobs = -1;               // -1: none; k >= 0: each token's logprob and the k most likely alternatives
  bool echo = false;                   // the prompt's tokens (and, with logprobs, their logprobs) come first
  bool ignore_eos = false;             // keep generating after the end-of-text token
};

// One token of a result, with its logprob under the model (log-softmax of the raw logits, whatever
// the sampling temperature) when logprobs were asked for.
struct TokenLogprob {
  int32_t id = -1;
  std::string text = {};                                 // the token's bytes (may be part of a character)
  std::optional<double> logprob = {};                    // none for the first prompt token (nothing predicts it)
  std::vector<std::pair<std::string, double>> top = {};  // the k most likely tokens at this position
  int64_t text_offset = 0;                               // bytes of text before this token (prompt + completion)
};

struct RequestEvent {
  std::string text = {};                  // new completion text (the prompt's when prompt = true)
  std::vector<TokenLogprob> tokens = {};  // the tokens behind `text`, when logprobs or echo were asked for
  bool prompt = false;                    // the echoed prompt (first event, echo only)
  bool done = false;                      // the last event: finish_reason and the counts are set
  std::string finish_reason = {};         // "stop" | "length" | "cancelled" | "error"
  std::string error = {};                 // the engine's error message (finish_reason "error")
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

class Request {
 public:
  Request(int64_t id, std::vector<int32_t> prompt, SamplingParams params)
      : id_(id), prompt_(std::move(prompt)), params_(std::move(params)) {}
  int64_t id() const { return id_; }
  const std::vector<int32_t>& prompt() const { return prompt_; }
  const SamplingParams& params() const { return params_; }

  // Handler side: the next event, waiting up to `timeout`; none on timeout. After the done event
  // has been taken, returns none at once.
  std::optional<RequestEvent> next_event(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return !events_.empty() || taken_done_; });
    if (events_.empty()) return std::nullopt;
    RequestEvent e = std::move(events_.front());
    events_.pop_front();
    if (e.done) taken_done_ = true;
    return e;
  }
  // Asks the engine thread to stop this request and free its cache blocks (at its next step).
  void cancel() {
    cancelled_.store(true);
    if (on_cancel_) on_cancel_();
  }
  // The flag alone (the scheduler, holding its own lock, which on_cancel takes).
  void mark_cancelled() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  bool finished() const {
    std::lock_guard lock(mu_);
    return done_pushed_;
  }

  // Engine side.
  void push(RequestEvent e) {
    {
      std::lock_guard lock(mu_);
      if (done_pushed_) return;
      done_pushed_ = e.done;
      events_.push_back(std::move(e));
    }
    cv_.notify_all();
  }
  void set_on_cancel(std::function<void()> f) { on_cancel_ = std::move(f); }

 private:
  const int64_t id_;
  const std::vector<int32_t> prompt_;
  const SamplingParams params_;
  std::atomic<bool> cancelled_{false};
  std::function<void()> on_cancel_;  // wakes the engine thread (set before the handle is shared)
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<RequestEvent> events_;
  bool done_pushed_ = false, taken_done_ = false;
};

}  // namespace diffmoe::serve
