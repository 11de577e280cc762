// Where training metrics go: a JSONL file (one object per log step), TensorBoard event files
// (docs/formats.md §1a), and the terminal (a progress bar with ETA on a TTY, plain lines otherwise).
// Only the host-side values are logged here; the trainer decides when to read them from the device.
#pragma once
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "io/tfevents.h"
#include "train/train_config.h"

namespace diffmoe {

class MetricsLogger {
 public:
  // Opens <out_dir>/metrics.jsonl for appending — a fresh run finds none (run_dir.h); a resumed run
  // keeps the rows up to `start_step` and drops later ones (they belong to the interrupted run) — and a new TensorBoard
  // file in <out_dir>/tb; on resume `start_step` > 0 writes a SessionLog START at start_step + 1
  // (the first step this run logs) so TensorBoard drops the orphaned points too.
  MetricsLogger(const RunConfig& rc, int64_t start_step, int64_t max_steps, bool resumed);
  ~MetricsLogger();  // never throws: call close() to see write errors
  void close();      // flushes and closes both files; write errors throw, naming the file

  // Logs scalars for `step` (JSONL object {"step":..., "kind":kind, ...}, TensorBoard tags
  // "<kind>/<name>"), and prints them.
  void log(int64_t step, const std::string& kind, const std::map<std::string, double>& values);
  void text(int64_t step, const std::string& tag, const std::string& markdown);
  // Redraws the progress bar (TTY) — cheap, call every step.
  void progress(int64_t step, double loss, double tokens_per_s);
  void message(const std::string& line);  // a line above the bar (or a plain line)
  void flush();

 private:
  void clear_bar();
  FILE* jsonl_ = nullptr;
  std::string jsonl_path_;
  std::unique_ptr<EventWriter> tb_;
  bool bar_ = false;
  bool bar_drawn_ = false;
  int64_t start_step_, max_steps_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace diffmoe
