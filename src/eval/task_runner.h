// Runs one eval task (task_config.h) on a model: sets the model's batch shape, scores the task's
// documents and returns its report rows (report.h) and a description for the report's "tasks".
//   multiple choice: acc and acc_norm (mean over documents, with stderr);
//   text:            loss, perplexity, bits_per_byte, byte_perplexity, word_perplexity (ratios of
//                    sums over the whole corpus: no stderr).
#pragma once
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "eval/report.h"
#include "eval/task_config.h"
#include "model/model.h"

namespace diffmoe::eval {

struct TaskRunOptions {
  int64_t batch = 8;  // sequences per forward
  int64_t seq = 0;    // positions per sequence; 0 = max_seq_len for text, the longest request for multiple choice
  int64_t limit = 0;  // documents per task; 0 = all
  std::function<void(std::string_view)> log;  // progress lines (optional)
};

struct TaskOutcome {
  std::vector<MetricRow> rows;
  nlohmann::ordered_json info;  // file, format, documents, requests, forwards, seq, ...
};

// The token that stands before a document or an empty context: the tokenizer's end-of-text token.
// Throws naming the tokenizer when it has none.
int32_t prefix_token(const data::Tokenizer& tokenizer);

TaskOutcome run_task(Model& model, const data::Tokenizer& tokenizer, const TaskConfig& task, const TaskRunOptions& opt);

}  // namespace diffmoe::eval
