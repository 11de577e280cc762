// POSIX file primitives shared by the io writers (safetensors, checkpoints): whole writes that
// survive short writes and EINTR, fsync of files and directories, and the atomic replacement of a
// file (temporary file in the same directory, fsync, rename). They report the failing step and its
// errno instead of throwing, so that every caller keeps its own error messages.
// Also the one bounded reader of small files (read_small_file) and the check of output paths,
// which throw diffmoe::Error naming the path.
#pragma once
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

namespace diffmoe::io {

// The steps a Failure can name. Each is one object (an inline array), so `step == kStepRename`
// compares identities; the text is what error messages print.
inline constexpr char kStepCreate[] = "create";
inline constexpr char kStepWrite[] = "write";
inline constexpr char kStepFsync[] = "fsync";
inline constexpr char kStepClose[] = "close";
inline constexpr char kStepRename[] = "rename";
inline constexpr char kStepOpenForFsync[] = "open for fsync";

// The first step of a file operation that failed and its errno (later cleanup calls may overwrite
// errno); `step == nullptr` means success.
struct Failure {
  const char* step = nullptr;
  int err = 0;
  explicit operator bool() const { return step != nullptr; }
  // Records `failed_step` with the current errno unless an earlier step already failed.
  void note(const char* failed_step);
};

// Closes a file descriptor on scope exit (error paths included).
struct FdGuard {
  int fd = -1;
  ~FdGuard();
};

// Writes all of `n` bytes, retrying short writes and EINTR. Returns false with errno set on error.
bool write_all(int fd, const void* data, size_t n);

// Writes a file's contents to `fd`; returns false with errno set on error (e.g. from write_all).
using WriteContents = std::function<bool(int fd)>;

// Creates or truncates `path` (mode 0644), runs `contents`, fsyncs and closes it. close() counts
// too: it can report a deferred write error (e.g. on NFS). Steps: create, write, fsync, close.
Failure write_file_synced(const std::string& path, const WriteContents& contents);

// The temporary file of replace_file for `path`: "<path>.tmp.<pid>", in the same directory.
std::string temp_path(const std::string& path);

// Replaces `path` atomically: write_file_synced(temp_path(path)), then rename over `path`. On any
// failure the temporary is removed and `path` is untouched. Steps: those of write_file_synced,
// rename. The rename is durable only after fsync_parent_directory(path).
Failure replace_file(const std::string& path, const WriteContents& contents);

// fsync of a file or directory. Steps: open for fsync, fsync.
Failure fsync_path(const std::string& path);

// The directory holding `path` ("." for a bare file name).
std::string parent_directory(const std::string& path);

// fsync of parent_directory(path): makes a create or rename of `path` durable.
Failure fsync_parent_directory(const std::string& path);

// ---- bounded reads of small files ----

// Size caps of the small files diffmoe reads whole. A file over its cap is refused (an error naming
// it), not read: a pointer or manifest that names /dev/zero, or a config path that is a FIFO, must
// fail at once instead of hanging or filling memory.
inline constexpr size_t kMaxPointerFileBytes = 4096;               // checkpoint `latest`
inline constexpr size_t kMaxManifestBytes = size_t{16} << 20;      // checkpoint manifest.json, shard meta.json
inline constexpr size_t kMaxTrainerStateBytes = size_t{64} << 20;  // trainer_state.json (config + loader state)
inline constexpr size_t kMaxConfigBytes = size_t{16} << 20;        // YAML configs, tokenizer_config.json
inline constexpr size_t kMaxTokenizerBytes = size_t{512} << 20;    // tokenizer.json, .tiktoken rank files

// Reads the whole of `path` when it is a regular file of at most `max_bytes` bytes. Anything else
// throws diffmoe::Error naming the path and `what` it was to be (e.g. "checkpoint manifest"):
// "<path>: checkpoint manifest is a FIFO, not a regular file" or "<path>: checkpoint manifest is
// 2000000 bytes, over the 1048576-byte limit". Never blocks on a FIFO (opened non-blocking) and
// never reads more than max_bytes + 1 bytes (a file that grows while read is refused too).
std::string read_small_file(const std::string& path, size_t max_bytes, std::string_view what);

// What an output path must be when something is there already.
enum class OutputKind { kFile, kDirectory };
// Throws "<path>: the <what> exists and is a FIFO; expected a regular file (or nothing there yet)"
// unless `path` is missing or of `kind`: the check of paths diffmoe is about to write, so that an
// output named /dev/null or a FIFO is refused instead of replaced or blocked on.
void check_output_path(const std::string& path, std::string_view what, OutputKind kind = OutputKind::kFile);

// The kind of a file type for messages: "a FIFO", "a character device", "a directory", ...
std::string_view file_type_name(unsigned mode);

}  // namespace diffmoe::io
