#include "eval/task_runner.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "data/text_source.h"
#include "eval/multiple_choice.h"
#include "eval/perplexity.h"
#include "eval/task_docs.h"

namespace diffmoe::eval {

int32_t prefix_token(const data::Tokenizer& tokenizer) {
  const std::optional<int32_t> eot = tokenizer.eos_id();
  DIFFMOE_CHECK(eot.has_value(),
                "tokenizer {}: no end-of-text token, which eval puts before each document and empty context",
                tokenizer.name());
  return *eot;
}

namespace {

using Clock = std::chrono::steady_clock;

void say(const TaskRunOptions& opt, const std::string& s) {
  if (opt.log) opt.log(s);
}

TaskOutcome run_multiple_choice(Model& model, const data::Tokenizer& tok, const TaskConfig& task,
                                const TaskRunOptions& opt) {
  const std::vector<McDoc> docs = load_task_docs(task, opt.limit);
  const McRequests req = encode_requests(tok, docs, task.target_delimiter, prefix_token(tok));
  // A request of n tokens is a row of n − 1 inputs; longer ones lose context from the left.
  const int64_t seq = opt.seq > 0 ? opt.seq : std::clamp<int64_t>(req.longest - 1, 1, model.config().max_seq_len);
  model.set_batch_shape(opt.batch, seq);
  BatchScorer scorer(model, prefix_token(tok));
  const auto t0 = Clock::now();
  const McResult r = score_multiple_choice(scorer, docs, req);
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  say(opt, fmt::format("{}: {} documents, {} requests in {} forwards of {}x{} ({:.1f} s)", task.name, docs.size(),
                       r.requests, r.forwards, opt.batch, seq, s));
  const std::vector<double> acc = r.acc_values(), acc_norm = r.acc_norm_values();
  const int64_t n = static_cast<int64_t>(docs.size());
  TaskOutcome out;
  out.rows.push_back(MetricRow{
      .task = task.name, .metric = "acc", .value = mean(acc), .stderr_of_mean = mean_stderr(acc), .count = n});
  out.rows.push_back(MetricRow{.task = task.name,
                               .metric = "acc_norm",
                               .value = mean(acc_norm),
                               .stderr_of_mean = mean_stderr(acc_norm),
                               .count = n});
  int64_t truncated = 0;
  for (const EncodedPair& p : req.pairs)
    truncated += static_cast<int64_t>(p.context.size() + p.continuation.size()) - 1 > seq ? 1 : 0;
  out.info = {{"file", task.file},
              {"format", task_format_name(task.format)},
              {"num_fewshot", task.num_fewshot},
              {"documents", n},
              {"requests", r.requests},
              {"truncated_requests", truncated},
              {"forwards", r.forwards},
              {"seq", seq},
              {"seconds", s}};
  return out;
}

TaskOutcome run_text(Model& model, const data::Tokenizer& tok, const TaskConfig& task, const TaskRunOptions& opt) {
  const std::vector<std::filesystem::path> files = data::expand_inputs(task.file);
  const int64_t seq = opt.seq > 0 ? opt.seq : model.config().max_seq_len;
  DIFFMOE_CHECK(task.stride <= seq, "{}: stride {} is longer than the sequence length {}", task.source, task.stride,
                seq);
  model.set_batch_shape(opt.batch, seq);
  BatchScorer scorer(model, prefix_token(tok));
  const auto t0 = Clock::now();
  const PerplexityResult r =
      evaluate_perplexity(scorer, tok, prefix_token(tok), files,
                          PerplexityOptions{.stride = task.stride, .text_field = task.text_field, .limit = opt.limit});
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  DIFFMOE_CHECK(r.docs > 0, "{}: no documents in {}", task.source, task.file);
  say(opt, fmt::format("{}: {} documents, {} tokens, {} bytes in {} windows of {} ({:.1f} s)", task.name, r.docs,
                       r.tokens, r.bytes, r.windows, seq, s));
  TaskOutcome out;
  const auto row = [&](const char* metric, double v) {
    out.rows.push_back(
        MetricRow{.task = task.name, .metric = metric, .value = v, .stderr_of_mean = std::nullopt, .count = r.docs});
  };
  row("loss", r.loss());
  row("perplexity", r.perplexity());
  row("bits_per_byte", r.bits_per_byte());
  row("byte_perplexity", r.byte_perplexity());
  row("word_perplexity", r.word_perplexity());
  out.info = {{"file", task.file},   {"format", "text"},
              {"documents", r.docs}, {"tokens", r.tokens},
              {"bytes", r.bytes},    {"words", r.words},
              {"nats", r.nats},      {"windows", r.windows},
              {"seq", seq},          {"stride", task.stride > 0 ? task.stride : seq},
              {"seconds", s}};
  return out;
}

}  // namespace

TaskOutcome run_task(Model& model, const data::Tokenizer& tokenizer, const TaskConfig& task,
                     const TaskRunOptions& opt) {
  DIFFMOE_CHECK(tokenizer.vocab_size() <= model.config().vocab_size,
                "tokenizer {}: {} ids, more than the model's vocabulary of {}", tokenizer.name(),
                tokenizer.vocab_size(), model.config().vocab_size);
  DIFFMOE_CHECK(opt.batch >= 1, "--batch must be >= 1, got {}", opt.batch);
  DIFFMOE_CHECK(opt.seq >= 0 && opt.seq <= model.config().max_seq_len, "--seq {} must be in [1, max_seq_len = {}]",
                opt.seq, model.config().max_seq_len);
  return task.multiple_choice() ? run_multiple_choice(model, tokenizer, task, opt)
                                : run_text(model, tokenizer, task, opt);
}

}  // namespace diffmoe::eval
