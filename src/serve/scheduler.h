// Continuous batching over the decode engine. One engine thread runs steps; any thread may submit
// a request and read its events (request.h). Each step:
//   1. drops cancelled requests (their cache blocks are freed at once) and admits waiting ones in
//      arrival order while the batch has room and the cache can hold every admitted request's
//      prompt + max_tokens (blocks are taken as positions are appended, but admission reserves the
//      whole budget, so a running request never runs out of cache);
//   2. builds the batch: one row per decoding request (its last sampled token), then prompt chunks
//      of at most prefill_chunk positions for prefilling requests while max_step_tokens allows, so a
//      new request joins the running batch at the next step and long prompts do not stall decoding;
//   3. runs Engine::step, then per request: prompt logprobs (echo), sampling of the next token
//      (temperature, top-k, top-p with the request's seed: counter = the token's index, so a seeded
//      request gives the same tokens whatever shares its steps), end-of-text, stop strings, max
//      tokens; text deltas are sent as soon as they are complete UTF-8 and cannot become part of a
//      stop string; a finished request frees its blocks at once.
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "data/tokenizer.h"
#include "model/model.h"
#include "serve/engine.h"
#include "serve/request.h"

namespace diffmoe::serve {

struct SchedulerOptions {
  EngineOptions engine;
  int64_t prefill_chunk = 256;  // prompt positions of one request per step
  int64_t max_waiting = 1024;   // requests queued beyond the running batch; more are refused (busy)
};

// A request that can never run as given (the HTTP layer answers 400 naming `param`).
struct InvalidRequest : std::runtime_error {
  InvalidRequest(std::string param, const std::string& message)
      : std::runtime_error(message), param(std::move(param)) {}
  std::string param;
};
// The waiting queue is full or the scheduler is stopping (the HTTP layer answers 429 / 503).
struct ServerBusy : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SchedulerStats {
  int64_t running = 0, waiting = 0;
  int64_t free_blocks = 0, total_blocks = 0, block_size = 0;
  int64_t steps = 0, prompt_tokens = 0, generated_tokens = 0, finished = 0, cancelled = 0;
};

class Scheduler {
 public:
  // The model and tokenizer must outlive the scheduler.
  Scheduler(Model& model, const data::Tokenizer& tokenizer, SchedulerOptions opt);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Starts the engine thread (optional: tests may drive run_once() themselves).
  void start();
  // Stops the engine thread: with drain, after every admitted and waiting request has finished;
  // otherwise running and waiting requests end at once as "cancelled". New submissions are refused.
  void stop(bool drain);
  // Cancels every running and waiting request (they end as "cancelled" at the next step).
  void cancel_all();

  // Thread safe. Validates against the limits (InvalidRequest), queues (ServerBusy when full).
  std::shared_ptr<Request> submit(std::vector<int32_t> prompt, SamplingParams params);
  // One engine iteration on the caller's thread (only when start() was not called). False when
  // there was nothing to do.
  bool run_once();

  SchedulerStats stats() const;
  const data::Tokenizer& tokenizer() const { return tok_; }
  const ModelConfig& config() const { return engine_.config(); }
  const SchedulerOptions& options() const { return opt_; }
  int64_t max_context() const { return engine_.options().max_context; }
  int64_t max_logprobs() const { return 20; }

 private:
  struct Active;
  void thread_main();
  bool iteration();
  void admit();
  void finish(Active& a, const std::string& reason);
  // After an engine step: prompt logprobs, the next token of every row that wants one (host_logits_ holds the logits).
  void take_outputs(std::span<const StepSequence> batch, std::span<Active* const> who, const StepOutput& out);
  void mask_unknown_ids(std::span<float> row) const;
  void sample_next(Active& a, std::span<float> row);
  void add_token(Active& a, int32_t id, std::span<const float> row, double lse);
  void send_ready(Active& a, bool final);
  void fail_all(const std::string& message);

  const data::Tokenizer& tok_;
  SchedulerOptions opt_;
  Engine engine_;
  std::vector<char> valid_id_;  // [V]: ids the tokenizer knows (others are never sampled)

  // Shared with submitting threads.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Request>> waiting_;
  bool stopping_ = false, drain_ = false, wake_ = false, cancel_running_ = false;
  int64_t next_id_ = 0;
  std::thread thread_;
  std::atomic<int64_t> n_running_{0}, n_waiting_{0}, free_blocks_{0}, steps_{0}, prompt_tokens_{0}, generated_{0};
  std::atomic<int64_t> finished_{0}, cancelled_{0};

  // Engine thread only.
  std::vector<std::unique_ptr<Active>> running_;
  std::vector<float> host_logits_;
};

}  // namespace diffmoe::serve
