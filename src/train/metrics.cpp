#include "train/metrics.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <utility>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/file_util.h"

namespace diffmoe {

MetricsLogger::MetricsLogger(const RunConfig& rc, int64_t start_step, int64_t max_steps, bool resumed)
    : start_step_(start_step), max_steps_(max_steps), t0_(std::chrono::steady_clock::now()) {
  std::filesystem::create_directories(rc.train.out_dir);
  if (rc.log.jsonl) {
    jsonl_path_ = rc.train.out_dir + "/metrics.jsonl";
    io::check_output_path(jsonl_path_, "metrics log");  // appending to a FIFO would block
    std::string kept;                                   // on resume: the rows of steps the checkpoint covers
    if (resumed) {
      std::ifstream in(jsonl_path_);
      for (std::string line; std::getline(in, line);) {
        const auto row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (row.is_object() && row.contains("step") && row["step"].is_number_integer() &&
            row["step"].get<int64_t>() <= start_step)
          kept += line + "\n";
      }
      atomic_write_text(jsonl_path_, kept);
    }
    jsonl_ = std::fopen(jsonl_path_.c_str(), "a");  // O_APPEND: every row lands at the end, never over another
    DIFFMOE_CHECK(jsonl_ != nullptr, "{}: cannot open for writing ({})", jsonl_path_, std::strerror(errno));
  }
  if (rc.log.tensorboard) {
    tb_ = std::make_unique<EventWriter>(rc.train.out_dir + "/tb");
    // TensorBoard's plugin loader treats the first START of a run as its beginning and purges
    // orphaned points only on later ones, so every run (fresh or resumed) starts with one. A START
    // at s purges the points with step >= s; a run resumed from the checkpoint of step s logs from
    // s + 1 on (steps are logged after they are taken), and step s's own points are valid.
    tb_->session_start(start_step > 0 ? start_step + 1 : 0);
  }
  bar_ = rc.log.progress == "bar" || (rc.log.progress == "auto" && ::isatty(STDERR_FILENO));
}

MetricsLogger::~MetricsLogger() {
  try {
    close();
  } catch (...) {  // already failing (or the caller skipped close()): never throw from here
  }
}

void MetricsLogger::close() {
  clear_bar();
  if (jsonl_) {
    FILE* f = std::exchange(jsonl_, nullptr);
    const bool ok = std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
    const int err = errno;
    const bool closed = std::fclose(f) == 0;
    DIFFMOE_CHECK(ok && closed, "{}: write failed ({})", jsonl_path_, std::strerror(ok ? errno : err));
  }
  if (tb_) {
    auto tb = std::move(tb_);
    tb->close();
  }
}

void MetricsLogger::clear_bar() {
  if (bar_drawn_) {
    std::fputs("\r\033[2K", stderr);
    bar_drawn_ = false;
  }
}

void MetricsLogger::log(int64_t step, const std::string& kind, const std::map<std::string, double>& values) {
  nlohmann::ordered_json j;
  j["step"] = step;
  j["kind"] = kind;
  std::string line = fmt::format("{} step {:>6}", kind, step);
  for (const auto& [k, v] : values) {
    j[k] = std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(fmt::format("{}", v));
    if (tb_) tb_->add_scalar(kind + "/" + k, step, static_cast<float>(v));
  }
  if (jsonl_) {
    DIFFMOE_CHECK(std::fprintf(jsonl_, "%s\n", j.dump().c_str()) >= 0, "{}: write failed ({})", jsonl_path_,
                  std::strerror(errno));
  }
  // The terminal gets the headline numbers only; everything is in the files.
  for (const char* k : {"loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "mfu_pct", "aux_loss"}) {
    auto it = values.find(k);
    if (it != values.end()) line += fmt::format("  {} {:.4g}", k, it->second);
  }
  message(line);
}

void MetricsLogger::text(int64_t step, const std::string& tag, const std::string& markdown) {
  if (tb_) tb_->add_text(tag, step, markdown);
}

void MetricsLogger::progress(int64_t step, double loss, double tokens_per_s) {
  if (!bar_) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const int64_t done = step - start_step_, left = max_steps_ - step;
  const double eta = done > 0 ? elapsed / static_cast<double>(done) * static_cast<double>(left) : 0.0;
  const int width = 30;
  const int filled =
      static_cast<int>(width * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, max_steps_)));
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(width, '.');
  fmt::print(stderr, "\r\033[2K[{}] {}/{}  loss {:.4f}  {:.0f} tok/s  ETA {:02d}:{:02d}", bar, step, max_steps_, loss,
             tokens_per_s, static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
  std::fflush(stderr);
  bar_drawn_ = true;
}

void MetricsLogger::message(const std::string& line) {
  clear_bar();
  fmt::print("{}\n", line);
  std::fflush(stdout);
}

void MetricsLogger::flush() {
  if (jsonl_) DIFFMOE_CHECK(std::fflush(jsonl_) == 0, "{}: write failed ({})", jsonl_path_, std::strerror(errno));
  if (tb_) tb_->flush();
}

}  // namespace diffmoe
