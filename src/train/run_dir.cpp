#include "train/run_dir.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "io/file_util.h"

namespace diffmoe {

namespace fs = std::filesystem;

namespace {

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// The entries of `dir` whose names start with one of `prefixes` (none when `dir` is missing).
std::vector<fs::path> entries_named(const std::string& dir, std::initializer_list<const char*> prefixes) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    for (const char* p : prefixes)
      if (starts_with(name, p)) {
        out.push_back(it->path());
        break;
      }
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Everything an --overwrite removes: checkpoints (finished, temporary and half-pruned) and the
// pointer in the checkpoint root; the metrics file; the TensorBoard event files.
std::vector<fs::path> removable_products(const RunConfig& rc) {
  std::vector<fs::path> out = entries_named(rc.checkpoint.dir, {"step_", "latest"});
  std::error_code ec;
  const fs::path metrics = fs::path(rc.train.out_dir) / "metrics.jsonl";
  if (fs::exists(metrics, ec)) out.push_back(metrics);
  for (const auto& p : entries_named((fs::path(rc.train.out_dir) / "tb").string(), {"events.out.tfevents."}))
    out.push_back(p);
  return out;
}

}  // namespace

std::vector<std::string> earlier_run_products(const RunConfig& rc) {
  std::vector<std::string> found;
  std::error_code ec;
  const auto checkpoints = entries_named(rc.checkpoint.dir, {"step_"});
  if (!checkpoints.empty())
    found.push_back(fmt::format("{} checkpoint director{} in {}", checkpoints.size(),
                                checkpoints.size() == 1 ? "y" : "ies", rc.checkpoint.dir));
  const fs::path latest = fs::path(rc.checkpoint.dir) / "latest";
  if (fs::exists(latest, ec)) found.push_back(latest.string());
  const fs::path metrics = fs::path(rc.train.out_dir) / "metrics.jsonl";
  if (fs::is_regular_file(metrics, ec) && fs::file_size(metrics, ec) > 0) found.push_back(metrics.string());
  const auto events = entries_named((fs::path(rc.train.out_dir) / "tb").string(), {"events.out.tfevents."});
  if (!events.empty())
    found.push_back(fmt::format("{} TensorBoard event file(s) in {}/tb", events.size(), rc.train.out_dir));
  return found;
}

RunDirectories::RunDirectories(const RunConfig& rc, bool resume, bool overwrite, const LogLine& log) {
  DIFFMOE_CHECK(!(resume && overwrite),
                "--resume and --overwrite exclude each other (continue the earlier run, or replace it)");
  // What the run writes must be what it seems: directories, regular files, or nothing yet.
  io::check_output_path(rc.train.out_dir, "train.out_dir", io::OutputKind::kDirectory);
  io::check_output_path(rc.checkpoint.dir, "checkpoint.dir", io::OutputKind::kDirectory);
  if (!rc.data.shards.empty()) io::check_output_path(rc.data.shards, "data.shards", io::OutputKind::kDirectory);
  out_lock_ = std::make_unique<RunLock>(run_dir_lock_path(rc.train.out_dir), rc.train.out_dir);
  checkpoint_lock_ = std::make_unique<RunLock>(sibling_lock_path(rc.checkpoint.dir), rc.checkpoint.dir);
  if (resume) return;
  const std::vector<std::string> found = earlier_run_products(rc);
  if (found.empty()) return;
  std::string what;
  for (const auto& f : found) what += (what.empty() ? "" : ", ") + f;
  DIFFMOE_CHECK(overwrite,
                "{}: holds an earlier run ({}); pass --resume to continue it, or --overwrite to delete its "
                "checkpoints and logs and start again",
                rc.train.out_dir, what);
  // With both locks held, nothing else writes here.
  std::error_code ec;
  const std::vector<fs::path> doomed = removable_products(rc);
  for (const auto& p : doomed) {
    fs::remove_all(p, ec);
    DIFFMOE_CHECK(!ec, "{}: cannot remove ({}) for --overwrite", p.string(), ec.message());
  }
  log(fmt::format("--overwrite: removed the earlier run's {} checkpoint entries and logs ({})", doomed.size(), what));
}

}  // namespace diffmoe
