// The eval report: one row per (task, metric) with its value, the standard error of the mean where
// the metric is a mean over documents, and the number of documents; the model it came from. Written
// as JSON (docs/evaluation.md "Report") and printed as a table.
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace diffmoe::eval {

struct MetricRow {
  std::string task, metric;
  double value = 0;
  std::optional<double> stderr_of_mean;  // none where the metric is not a mean over documents
  int64_t count = 0;                     // documents (or windows, for shard loss: sequences)
};

struct EvalReport {
  std::string model;  // the checkpoint directory or model file
  int64_t step = -1;  // the checkpoint's step; −1 for a bare model file
  std::string tokenizer;
  std::string device, precision;
  int64_t batch = 0;  // sequences per forward
  std::vector<MetricRow> rows;
  nlohmann::ordered_json tasks = nlohmann::ordered_json::object();  // per task: file, format, docs, requests, ...
};

// The sample standard deviation (n − 1) over √n, as lm-evaluation-harness's mean_stderr; none for n < 2.
std::optional<double> mean_stderr(std::span<const double> values);
double mean(std::span<const double> values);

nlohmann::ordered_json report_json(const EvalReport& r);
// | task | metric | value | ± stderr | n |, one line per row.
std::string report_table(const EvalReport& r);
// Writes report_json atomically (temporary file + rename); errors name the path.
void write_report(const std::string& path, const EvalReport& r);

}  // namespace diffmoe::eval
