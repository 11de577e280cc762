#include "eval/report.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "io/file_util.h"

namespace diffmoe::eval {

double mean(std::span<const double> values) {
  double s = 0;
  for (const double v : values) s += v;
  return values.empty() ? std::nan("") : s / static_cast<double>(values.size());
}

std::optional<double> mean_stderr(std::span<const double> values) {
  const size_t n = values.size();
  if (n < 2) return std::nullopt;
  const double m = mean(values);
  double ss = 0;
  for (const double v : values) ss += (v - m) * (v - m);
  return std::sqrt(ss / static_cast<double>(n - 1)) / std::sqrt(static_cast<double>(n));
}

namespace {

// JSON has no NaN or infinity: those become null.
nlohmann::ordered_json number(double v) {
  return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr);
}

}  // namespace

nlohmann::ordered_json report_json(const EvalReport& r) {
  nlohmann::ordered_json j;
  j["model"] = r.model;
  j["step"] = r.step >= 0 ? nlohmann::ordered_json(r.step) : nlohmann::ordered_json(nullptr);
  j["tokenizer"] = r.tokenizer;
  j["device"] = r.device;
  j["precision"] = r.precision;
  j["batch"] = r.batch;
  j["results"] = nlohmann::ordered_json::array();
  for (const MetricRow& m : r.rows) {
    nlohmann::ordered_json row;
    row["task"] = m.task;
    row["metric"] = m.metric;
    row["value"] = number(m.value);
    row["stderr"] = m.stderr_of_mean ? number(*m.stderr_of_mean) : nlohmann::ordered_json(nullptr);
    row["count"] = m.count;
    j["results"].push_back(row);
  }
  j["tasks"] = r.tasks;
  return j;
}

std::string report_table(const EvalReport& r) {
  // Values print with 4 decimals; very large ones (a word perplexity) in scientific notation.
  const auto value = [](double v) { return std::abs(v) < 1e7 ? fmt::format("{:.4f}", v) : fmt::format("{:.4e}", v); };
  size_t wt = 4, wm = 6, wv = 10;
  for (const MetricRow& m : r.rows) {
    wt = std::max(wt, m.task.size());
    wm = std::max(wm, m.metric.size());
    wv = std::max(wv, value(m.value).size());
  }
  std::string s = fmt::format("| {:<{}} | {:<{}} | {:>{}} | {:>10} | {:>7} |\n", "task", wt, "metric", wm, "value", wv,
                              "stderr", "n");
  s += fmt::format("|{:-<{}}|{:-<{}}|{:-<{}}|{:-<12}|{:-<9}|\n", "", wt + 2, "", wm + 2, "", wv + 2, "", "");
  std::string last;
  for (const MetricRow& m : r.rows) {
    const std::string err = m.stderr_of_mean ? fmt::format("± {:>8.4f}", *m.stderr_of_mean) : "";
    s += fmt::format("| {:<{}} | {:<{}} | {:>{}} | {:>10} | {:>7} |\n", m.task == last ? "" : m.task, wt, m.metric, wm,
                     value(m.value), wv, err, m.count);
    last = m.task;
  }
  return s;
}

void write_report(const std::string& path, const EvalReport& r) {
  io::check_output_path(path, "eval report");  // the rename would replace a device node or FIFO
  const std::string text = report_json(r).dump(2) + "\n";
  const io::Failure f = io::replace_file(path, [&](int fd) { return io::write_all(fd, text.data(), text.size()); });
  DIFFMOE_CHECK(!f, "{}: cannot write the report ({} failed: {})", path, f.step, std::strerror(f.err));
}

}  // namespace diffmoe::eval
