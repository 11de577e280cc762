// Atomic training checkpoints (docs/formats.md §4.6).
//
// Commit protocol of save_checkpoint, in this order, so that a crash or an I/O error at any point
// leaves either the previous state or a complete, verifiable new checkpoint:
//   1. remove stale "step_*.tmp" directories (crashed saves; one saver per root is assumed);
//   2. mkdir <root>/step_N.tmp/, run each writer, write trainer_state.json, fsync every file;
//   3. write manifest.json LAST (sizes + XXH3-64 of every other file) and fsync it: a directory
//      without a manifest is by definition incomplete;
//   4. fsync the temporary directory, rename it to <root>/step_N/, fsync <root>;
//   5. replace <root>/latest atomically (tmp + fsync + rename + fsync of <root>);
//   6. prune: keep the newest keep_last checkpoints and every keep_every multiple ("major every M",
//      as in llm.c). A pruned directory is first renamed to "*.prune.tmp", so a crash mid-removal
//      leaves a name that loading ignores and the next save cleans up.
// Loading trusts nothing but the manifest: a directory is used only when every listed file has the
// listed size and hash; otherwise the loader falls back to older directories with a warning.
#include "io/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <set>
#include <utility>

#include "core/error.h"
#include "io/file_util.h"

namespace diffmoe {
namespace {

namespace fs = std::filesystem;

constexpr const char* kManifestName = "manifest.json";
constexpr const char* kStateName = "trainer_state.json";
constexpr const char* kLatestName = "latest";
constexpr const char* kStepPrefix = "step_";
constexpr const char* kTmpSuffix = ".tmp";
constexpr int kManifestVersion = 1;
constexpr size_t kHashHexDigits = 16;        // XXH3-64 as hex
constexpr size_t kHashChunkBytes = 1 << 20;  // streaming read size for hashing
constexpr size_t kMaxStepDigits = 18;        // fits int64 without overflow checks

[[noreturn]] void fail_errno(const std::string& path, const char* what, int err) {
  DIFFMOE_FAIL("{}: {} failed ({})", path, what, std::strerror(err));
}

// The contents writer of io::write_file_synced / io::replace_file for a string.
io::WriteContents text_contents(const std::string& text) {
  return [&text](int fd) { return io::write_all(fd, text.data(), text.size()); };
}

// Creates/truncates `path` with `text` and fsyncs it. No rename: used inside the temporary
// directory, whose rename is the commit.
void write_file_synced(const std::string& path, const std::string& text) {
  if (const io::Failure failed = io::write_file_synced(path, text_contents(text)))
    fail_errno(path, failed.step, failed.err);
}

// The `latest` pointer: a regular file of at most kMaxPointerFileBytes (io::read_small_file).
std::string read_pointer(const std::string& path) {
  return io::read_small_file(path, io::kMaxPointerFileBytes, "checkpoint pointer");
}

std::optional<std::string> read_pointer_if_present(const std::string& path) {
  if (::access(path.c_str(), F_OK) != 0) return std::nullopt;
  try {
    return read_pointer(path);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::string join(const std::string& dir, const std::string& name) { return (fs::path(dir) / name).string(); }

// The last component of a path, ignoring trailing separators ("a/step_1/" -> "step_1").
fs::path last_component(const std::string& path) {
  fs::path p = fs::path(path).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return p;
}

std::string step_dir_name(int64_t step) { return fmt::format("{}{:09d}", kStepPrefix, step); }

// "step_<digits>" -> step; anything else (".tmp" directories, stray files) -> nullopt.
std::optional<int64_t> parse_step_dir(const std::string& name) {
  const std::string prefix = kStepPrefix;
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  const std::string digits = name.substr(prefix.size());
  if (digits.size() > kMaxStepDigits) return std::nullopt;
  int64_t step = 0;
  for (const char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    step = step * 10 + (c - '0');
  }
  return step;
}

bool is_temporary_name(const std::string& name) {
  const std::string prefix = kStepPrefix, suffix = kTmpSuffix;
  return name.size() > prefix.size() + suffix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A plain file name: the manifest may only name files inside the checkpoint directory.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

bool is_lower_hex(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// The step directories directly under `root`, newest first. Missing root -> empty.
std::vector<std::pair<int64_t, std::string>> list_step_dirs(const std::string& root) {
  std::vector<std::pair<int64_t, std::string>> dirs;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const auto step = parse_step_dir(name);
    std::error_code type_ec;
    if (step && it->is_directory(type_ec)) dirs.emplace_back(*step, name);
  }
  std::sort(dirs.begin(), dirs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return dirs;
}

std::string iso_utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Best-effort removal on an error path: the original error is what gets reported.
void discard(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

void ensure_root(const std::string& root) {
  std::error_code ec;
  if (fs::is_directory(root, ec)) return;
  fs::create_directories(root, ec);
  if (ec) DIFFMOE_FAIL("{}: cannot create checkpoint root ({})", root, ec.message());
  // Make the new root's own directory entry durable too.
  fsync_path(io::parent_directory(last_component(fs::absolute(root).string()).string()));
}

// Leftovers of crashed saves and prunes ("step_*.tmp") and of atomic_write_text ("latest.tmp.*").
// Safe because one process saves into a root at a time.
void remove_stale_temporaries(const std::string& root) {
  const std::string latest_tmp = std::string(kLatestName) + ".tmp.";
  std::vector<std::string> stale;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (is_temporary_name(name) || name.compare(0, latest_tmp.size(), latest_tmp) == 0) stale.push_back(it->path());
  }
  for (const auto& path : stale) discard(path);
}

void validate_options(const CheckpointSaveOptions& opt) {
  DIFFMOE_CHECK(!opt.root.empty(), "[checkpoint] the checkpoint root directory is empty");
  DIFFMOE_CHECK(opt.step >= 0, "[checkpoint] step {} is negative", opt.step);
  DIFFMOE_CHECK(opt.keep_last >= 0, "[checkpoint] keep_last {} is negative (0 keeps all)", opt.keep_last);
  DIFFMOE_CHECK(opt.keep_every >= 0, "[checkpoint] keep_every {} is negative (0 = none)", opt.keep_every);
  std::set<std::string> names;
  for (const auto& f : opt.files) {
    DIFFMOE_CHECK(is_plain_file_name(f.name), "[checkpoint] file name '{}' is not a plain file name", f.name);
    DIFFMOE_CHECK(f.name != kManifestName && f.name != kStateName,
                  "[checkpoint] file name '{}' is reserved for the checkpoint itself", f.name);
    DIFFMOE_CHECK(names.insert(f.name).second, "[checkpoint] file name '{}' appears twice", f.name);
  }
}

// fsync, size and hash of one finished file: one manifest entry.
nlohmann::ordered_json describe_file(const std::string& dir, const std::string& name) {
  const std::string path = join(dir, name);
  fsync_path(path);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail_errno(path, "stat", errno);
  return {{"name", name}, {"bytes", static_cast<uint64_t>(st.st_size)}, {"xxh3_64", xxh3_file_hex(path)}};
}

// Steps 2-4a of the protocol: everything inside the temporary directory, manifest last.
void write_temporary_dir(const CheckpointSaveOptions& opt, const std::string& tmp_dir) {
  if (::mkdir(tmp_dir.c_str(), 0755) != 0) fail_errno(tmp_dir, "mkdir", errno);
  for (const auto& f : opt.files) {
    if (!f.write) continue;  // written by another process during an earlier writer (checked below)
    const std::string path = join(tmp_dir, f.name);
    try {
      f.write(path);
    } catch (const std::exception& e) {
      // Writers usually name their path already (SafetensorsWriter does); add it when they don't.
      const std::string msg = e.what();
      if (msg.find(path) != std::string::npos) throw;
      DIFFMOE_FAIL("{}: writer failed: {}", path, msg);
    }
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
      DIFFMOE_FAIL("{}: the writer returned without creating this file", path);
  }
  for (const auto& f : opt.files) {
    struct stat st {};
    const std::string path = join(tmp_dir, f.name);
    if (!f.write && (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)))
      DIFFMOE_FAIL("{}: not written (another rank's file)", path);
  }
  write_file_synced(join(tmp_dir, kStateName), opt.state.dump(2) + "\n");

  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  for (const auto& f : opt.files) files.push_back(describe_file(tmp_dir, f.name));
  files.push_back(describe_file(tmp_dir, kStateName));
  const nlohmann::ordered_json manifest = {
      {"version", kManifestVersion}, {"step", opt.step}, {"files", files}, {"created", iso_utc_now()}};
  write_file_synced(join(tmp_dir, kManifestName), manifest.dump(2) + "\n");  // LAST (docs/formats.md §4.6)
  fsync_path(tmp_dir);
}

// Step 6: older checkpoints beyond keep_last go, keep_every multiples and anything newer stay.
// Checkpoints newer than `step` (left by a run resumed from an older checkpoint) are not ours to
// judge; a later save of the same step replaces them.
void prune(const CheckpointSaveOptions& opt) {
  if (opt.keep_last == 0) return;
  auto warn = [&](std::string msg) {
    if (opt.warnings) opt.warnings->push_back(std::move(msg));
  };
  std::vector<std::string> doomed;
  int kept = 1;  // the checkpoint just written
  for (const auto& [step, name] : list_step_dirs(opt.root)) {
    if (step >= opt.step) continue;
    if (kept < opt.keep_last) {
      ++kept;
      continue;
    }
    if (opt.keep_every > 0 && step % opt.keep_every == 0) continue;  // "major" checkpoint
    // Rename first: a crash while removing leaves a ".tmp" name that loading ignores.
    const std::string from = join(opt.root, name);
    const std::string to = from + ".prune" + kTmpSuffix;
    discard(to);
    if (::rename(from.c_str(), to.c_str()) != 0) {
      warn(fmt::format("{}: not pruned: rename failed ({})", from, std::strerror(errno)));
      continue;
    }
    doomed.push_back(to);
  }
  if (doomed.empty()) return;
  try {
    fsync_path(opt.root);
  } catch (const std::exception& e) {
    warn(e.what());
  }
  for (const auto& path : doomed) {
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) warn(fmt::format("{}: not fully removed ({}); the next save retries", path, ec.message()));
  }
}

// The cause already carries its call site; the wrapper only adds what it means for the run.
[[noreturn]] void fail_not_saved(int64_t step, const std::string& why) {
  throw Error(
      fmt::format("[checkpoint] step {} not saved (previous checkpoints and '{}' kept): {}", step, kLatestName, why));
}

// Renames `from` over an existing `to` atomically (RENAME_EXCHANGE) so that re-saving a step never
// has a moment without a complete copy; `from` then holds the old contents. Returns false where the
// file system has no exchange (the caller removes and renames instead).
bool exchange(const std::string& from, const std::string& to) {
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) return true;
  if (errno == EINVAL || errno == ENOSYS) return false;
  fail_errno(to, "rename (exchange)", errno);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

void fsync_path(const std::string& path) {
  if (const io::Failure failed = io::fsync_path(path)) fail_errno(path, failed.step, failed.err);
}

void atomic_write_text(const std::string& path, const std::string& text) {
  io::check_output_path(path, "file");  // the rename would replace a device node or FIFO
  const io::Failure failed = io::replace_file(path, text_contents(text));
  if (failed.step == io::kStepRename)
    DIFFMOE_FAIL("{}: not replaced: rename failed ({})", path, std::strerror(failed.err));
  if (failed)
    DIFFMOE_FAIL("{}: not replaced: {}: {} failed ({})", path, io::temp_path(path), failed.step,
                 std::strerror(failed.err));
  fsync_path(io::parent_directory(path));
}

std::string xxh3_file_hex(const std::string& path) {
  io::FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) fail_errno(path, "open", errno);
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  DIFFMOE_CHECK(state && XXH3_64bits_reset(state.get()) == XXH_OK, "{}: cannot initialise XXH3", path);
  std::vector<unsigned char> buf(kHashChunkBytes);
  for (;;) {
    const ssize_t r = ::read(fd.fd, buf.data(), buf.size());
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, "read", errno);
    }
    if (r == 0) break;
    XXH3_64bits_update(state.get(), buf.data(), static_cast<size_t>(r));
  }
  return fmt::format("{:016x}", static_cast<uint64_t>(XXH3_64bits_digest(state.get())));
}

// ---------------------------------------------------------------------------------------------
// Save
// ---------------------------------------------------------------------------------------------

std::string save_checkpoint(const CheckpointSaveOptions& opt) {
  validate_options(opt);
  const std::string name = step_dir_name(opt.step);
  const std::string final_dir = join(opt.root, name);
  const std::string tmp_dir = final_dir + kTmpSuffix;
  const auto not_saved = [&](const std::string& why) { fail_not_saved(opt.step, why); };

  ensure_root(opt.root);
  remove_stale_temporaries(opt.root);
  try {
    write_temporary_dir(opt, tmp_dir);
  } catch (const std::exception& e) {
    discard(tmp_dir);
    not_saved(e.what());
  } catch (...) {  // a writer threw something that is not a std::exception: clean up, pass it on
    discard(tmp_dir);
    throw;
  }

  // Commit: rename the finished directory into place.
  bool replaced = false;
  try {
    struct stat st {};
    if (::lstat(final_dir.c_str(), &st) == 0) {
      replaced = exchange(tmp_dir, final_dir);
      if (!replaced) {  // no RENAME_EXCHANGE here: not crash-atomic, but loading falls back to older ones
        std::error_code ec;
        fs::remove_all(final_dir, ec);
        if (ec) DIFFMOE_FAIL("{}: cannot replace ({})", final_dir, ec.message());
      }
    }
    if (!replaced && ::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) fail_errno(final_dir, "rename", errno);
  } catch (const std::exception& e) {
    discard(tmp_dir);
    not_saved(e.what());
  }

  // Make the rename durable, then point `latest` at it. If either fails, undo the rename so that a
  // failed save never leaves a new checkpoint behind.
  const std::string latest_path = join(opt.root, kLatestName);
  const std::optional<std::string> latest_before = read_pointer_if_present(latest_path);
  try {
    fsync_path(opt.root);
    atomic_write_text(latest_path, name + "\n");
  } catch (const std::exception& e) {
    // atomic_write_text can fail after its rename (in the directory fsync): put the pointer back.
    if (read_pointer_if_present(latest_path) != latest_before) {
      try {
        if (latest_before) {
          atomic_write_text(latest_path, *latest_before);
        } else {
          ::unlink(latest_path.c_str());
        }
      } catch (const std::exception&) {  // best effort; loading falls back to a verified directory
      }
    }
    if (replaced) {
      ::renameat2(AT_FDCWD, tmp_dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE);
    } else {
      ::rename(final_dir.c_str(), tmp_dir.c_str());
    }
    discard(tmp_dir);
    not_saved(e.what());
  }
  if (replaced) discard(tmp_dir);  // the previous copy of this step

  prune(opt);
  return final_dir;
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

CheckpointInfo open_checkpoint(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) DIFFMOE_FAIL("{}: no checkpoint directory ({})", dir, std::strerror(errno));
  DIFFMOE_CHECK(S_ISDIR(st.st_mode), "{}: not a directory", dir);

  const std::string manifest_path = join(dir, kManifestName);
  if (::stat(manifest_path.c_str(), &st) != 0) {
    if (errno == ENOENT)
      DIFFMOE_FAIL("{}: missing (an incomplete checkpoint: the manifest is written last)", manifest_path);
    fail_errno(manifest_path, "stat", errno);
  }
  nlohmann::ordered_json manifest;
  try {
    manifest =
        nlohmann::ordered_json::parse(io::read_small_file(manifest_path, io::kMaxManifestBytes, "checkpoint manifest"));
  } catch (const nlohmann::json::exception& e) {
    DIFFMOE_FAIL("{}: invalid JSON: {}", manifest_path, e.what());
  }
  DIFFMOE_CHECK(manifest.is_object(), "{}: not a JSON object", manifest_path);
  DIFFMOE_CHECK(manifest.contains("version") && manifest["version"].is_number_integer() &&
                    manifest["version"].get<int64_t>() == kManifestVersion,
                "{}: 'version' must be {}", manifest_path, kManifestVersion);
  DIFFMOE_CHECK(
      manifest.contains("step") && manifest["step"].is_number_integer() && manifest["step"].get<int64_t>() >= 0,
      "{}: 'step' must be a non-negative integer", manifest_path);
  const int64_t step = manifest["step"].get<int64_t>();
  // A directory renamed by hand keeps working; a step_N directory must hold step N.
  const auto dir_step = parse_step_dir(last_component(dir).filename().string());
  DIFFMOE_CHECK(!dir_step || *dir_step == step, "{}: step {} does not match the directory name", manifest_path, step);
  DIFFMOE_CHECK(manifest.contains("files") && manifest["files"].is_array(), "{}: 'files' must be an array",
                manifest_path);

  // Pass 1 (cheap): entries well formed, files present with the listed sizes.
  struct Listed {
    std::string path;
    std::string hash;
  };
  std::vector<Listed> listed;
  std::set<std::string> names;
  for (const auto& entry : manifest["files"]) {
    DIFFMOE_CHECK(entry.is_object() && entry.contains("name") && entry["name"].is_string(),
                  "{}: a 'files' entry has no name", manifest_path);
    const std::string name = entry["name"].get<std::string>();
    DIFFMOE_CHECK(is_plain_file_name(name) && name != kManifestName, "{}: invalid file name '{}'", manifest_path, name);
    DIFFMOE_CHECK(names.insert(name).second, "{}: '{}' is listed twice", manifest_path, name);
    DIFFMOE_CHECK(entry.contains("bytes") && entry["bytes"].is_number_unsigned(), "{}: '{}' has no valid 'bytes'",
                  manifest_path, name);
    DIFFMOE_CHECK(entry.contains("xxh3_64") && entry["xxh3_64"].is_string() &&
                      entry["xxh3_64"].get<std::string>().size() == kHashHexDigits &&
                      is_lower_hex(entry["xxh3_64"].get<std::string>()),
                  "{}: '{}' has no valid 'xxh3_64' ({} lowercase hex digits)", manifest_path, name, kHashHexDigits);
    const std::string path = join(dir, name);
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) DIFFMOE_FAIL("{}: missing (listed in the manifest)", path);
      fail_errno(path, "stat", errno);
    }
    DIFFMOE_CHECK(S_ISREG(st.st_mode), "{}: not a regular file", path);
    const auto bytes = static_cast<uint64_t>(st.st_size);
    const auto expected = entry["bytes"].get<uint64_t>();
    DIFFMOE_CHECK(bytes == expected, "{}: size {} != manifest {} ({})", path, bytes, expected,
                  bytes < expected ? "truncated?" : "appended to?");
    listed.push_back({path, entry["xxh3_64"].get<std::string>()});
  }
  DIFFMOE_CHECK(names.contains(kStateName), "{}: does not list {}", manifest_path, kStateName);
  // Everything in the directory is listed: a file slipped in beside a verified checkpoint (another
  // tokenizer, a swapped model) would otherwise be read on the manifest's word.
  {
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      DIFFMOE_CHECK(name == kManifestName || names.contains(name),
                    "{}: not listed in {} (a checkpoint holds only what its manifest lists)", it->path().string(),
                    manifest_path);
    }
    DIFFMOE_CHECK(!ec, "{}: cannot list the directory ({})", dir, ec.message());
  }

  // Pass 2 (reads everything): contents match the hashes.
  for (const auto& f : listed) {
    const std::string hash = xxh3_file_hex(f.path);
    DIFFMOE_CHECK(hash == f.hash, "{}: xxh3 {} != manifest {} (corrupted)", f.path, hash, f.hash);
  }

  CheckpointInfo info{dir, step, nlohmann::ordered_json::object(),
                      std::vector<std::string>(names.begin(), names.end())};
  const std::string state_path = join(dir, kStateName);
  try {
    info.state =
        nlohmann::ordered_json::parse(io::read_small_file(state_path, io::kMaxTrainerStateBytes, "trainer state"));
  } catch (const nlohmann::json::exception& e) {
    DIFFMOE_FAIL("{}: invalid JSON: {}", state_path, e.what());
  }
  return info;
}

std::string CheckpointInfo::path_of(const std::string& name) const {
  DIFFMOE_CHECK(std::find(files.begin(), files.end(), name) != files.end(), "{}: not listed in {}", join(dir, name),
                join(dir, kManifestName));
  return join(dir, name);
}

std::optional<CheckpointInfo> find_latest_checkpoint(const std::string& root, std::vector<std::string>* warnings) {
  auto warn = [&](std::string msg) {
    if (warnings) warnings->push_back(std::move(msg));
  };
  std::error_code ec;
  if (root.empty() || !fs::is_directory(root, ec)) return std::nullopt;
  const auto dirs = list_step_dirs(root);

  // The pointer first (docs/formats.md §4.6): it names the last save that completed.
  const std::string latest_path = join(root, kLatestName);
  std::string tried;
  if (::access(latest_path.c_str(), F_OK) == 0) {
    std::string name;
    std::string unreadable;  // why the pointer could not be read; one warning, not a second about its text
    try {
      name = read_pointer(latest_path);
    } catch (const std::exception& e) {
      unreadable = e.what();
    }
    while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
    if (!unreadable.empty()) {
      warn(fmt::format("{}: unreadable, scanning step directories: {}", latest_path, unreadable));
    } else if (!is_plain_file_name(name)) {
      warn(fmt::format("{}: holds '{}', not a directory name; scanning step directories", latest_path, name));
    } else {
      tried = name;
      try {
        CheckpointInfo info = open_checkpoint(join(root, name));
        for (const auto& [step, other] : dirs)
          if (step > info.step)
            warn(
                fmt::format("{}: newer than '{}' named by {}; not used (a save interrupted before updating "
                            "the pointer, or a run resumed from an older checkpoint)",
                            join(root, other), name, latest_path));
        return info;
      } catch (const std::exception& e) {
        warn(fmt::format("{} (named by {}): skipped: {}", join(root, name), latest_path, e.what()));
      }
    }
  } else if (!dirs.empty()) {
    warn(fmt::format("{}: missing; scanning step directories", latest_path));
  }

  // Fallback: newest first, the first one whose manifest verifies.
  for (const auto& [step, name] : dirs) {
    if (name == tried) continue;
    try {
      return open_checkpoint(join(root, name));
    } catch (const std::exception& e) {
      warn(fmt::format("{}: skipped: {}", join(root, name), e.what()));
    }
  }
  return std::nullopt;
}

std::optional<CheckpointInfo> resolve_resume(const std::string& arg, const std::string& root,
                                             std::vector<std::string>* warnings) {
  if (arg.empty() || arg == kLatestName) return find_latest_checkpoint(root, warnings);
  std::error_code ec;
  if (fs::is_directory(arg, ec)) {
    // A checkpoint root (as eval and generate accept): no manifest of its own, but step_* or latest.
    const bool is_root = !fs::exists(join(arg, kManifestName), ec) &&
                         (!list_step_dirs(arg).empty() || fs::exists(join(arg, kLatestName), ec));
    if (!is_root) return open_checkpoint(arg);
    std::vector<std::string> skipped;
    auto info = find_latest_checkpoint(arg, &skipped);
    std::string why;
    for (const auto& s : skipped) why += "; " + s;
    if (warnings) warnings->insert(warnings->end(), skipped.begin(), skipped.end());
    DIFFMOE_CHECK(info.has_value(), "[resume] {}: no valid checkpoint under this root{}", arg, why);
    return info;
  }
  const std::string under_root = root.empty() ? arg : join(root, arg);
  DIFFMOE_CHECK(fs::is_directory(under_root, ec), "[resume] '{}' is not a checkpoint directory (nor is '{}')", arg,
                under_root);
  return open_checkpoint(under_root);
}

}  // namespace diffmoe
