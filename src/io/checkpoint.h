// Atomic training checkpoints (docs/formats.md §4.6).
//
// Layout under a root directory:
//   <root>/step_000001000/      one directory per saved step (name: "step_%09d")
//       model.safetensors ...   files produced by the caller's writers
//       trainer_state.json      the trainer state (step, data cursor, RNG, ...), pretty JSON
//       manifest.json           written LAST: {"version":1,"step":N,"files":[{"name","bytes","xxh3_64"}],"created"}
//   <root>/latest               text file holding the newest directory's name, replaced atomically
//
// A checkpoint counts only if its manifest verifies (every listed file present, with the listed size
// and XXH3-64 hash, and no file that it does not list); a crash or a full disk at any point leaves either the previous
// state or a complete new checkpoint, never a half-written one that a resume would pick up.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace diffmoe {

// One file of a checkpoint: `write` must create exactly the file at `path` (inside the temporary
// directory) and throw on failure, e.g. SafetensorsWriter::write. `name` is a plain file name. A
// null `write`: another process writes the file into the temporary directory while an earlier
// writer runs (a multi-rank checkpoint); it must exist once every writer has returned.
struct CheckpointFile {
  std::string name;
  std::function<void(const std::string& path)> write;
};

struct CheckpointSaveOptions {
  std::string root;                   // e.g. "runs/x/ckpt"; created when missing
  int64_t step = 0;                   // >= 0; the directory is "step_%09d"
  std::vector<CheckpointFile> files;  // names must be unique, not "manifest.json"/"trainer_state.json"
  nlohmann::ordered_json state = nlohmann::ordered_json::object();  // -> trainer_state.json
  int keep_last = 3;                             // keep this many newest checkpoints (this one included); 0 = keep all
  int64_t keep_every = 0;                        // steps that are multiples of this are kept forever; 0 = none
  std::vector<std::string>* warnings = nullptr;  // optional: pruning problems (the save itself succeeded)
};

// Saves a checkpoint atomically (docs/formats.md §4.6): <root>/step_N.tmp/, each file written and
// fsync'ed, trainer_state.json, manifest.json last, fsync of the directory, rename to <root>/step_N/
// (replacing an existing directory of the same step), fsync of <root>, then <root>/latest replaced
// atomically; finally older checkpoints beyond keep_last (except keep_every multiples) are removed.
// Stale "step_*.tmp" directories of crashed saves are removed first: one saver per root, which the
// trainer ensures by holding the root's lock (io/run_lock.h) for the whole run.
// On any failure (a writer throws, ENOSPC, EIO, ...) the temporary directory is removed, earlier
// checkpoints and `latest` are untouched, and diffmoe::Error names the path and the errno text.
// Returns the final directory "<root>/step_N".
std::string save_checkpoint(const CheckpointSaveOptions& opt);

struct CheckpointInfo {
  std::string dir;                 // the checkpoint directory
  int64_t step = 0;                // from the manifest
  nlohmann::ordered_json state;    // trainer_state.json
  std::vector<std::string> files;  // the names the manifest lists (each verified), trainer_state.json included
  // <dir>/<name> when the manifest lists `name`; otherwise throws "<dir>/<name>: not listed in
  // <dir>/manifest.json": a reader opens only files the manifest vouches for.
  std::string path_of(const std::string& name) const;
};

// Verifies <dir>/manifest.json against the files (presence, size, XXH3-64), checks that the
// directory holds no file the manifest does not list, and parses trainer_state.json. Errors name
// the file and the fault, e.g. "<dir>/model.safetensors: size 1234 != manifest 5678 (truncated?)".
CheckpointInfo open_checkpoint(const std::string& dir);

// The checkpoint to resume from: the directory named by <root>/latest if it verifies, otherwise the
// newest "step_N" directory (".tmp" ones ignored) that verifies. Every directory skipped adds one
// line to `warnings` (when given) saying why. nullopt when no checkpoint verifies (or no root).
std::optional<CheckpointInfo> find_latest_checkpoint(const std::string& root,
                                                     std::vector<std::string>* warnings = nullptr);

// The --resume argument: "" or "latest" -> find_latest_checkpoint(root); a checkpoint root (a
// directory without manifest.json holding step_* directories or `latest`) -> its latest checkpoint
// (throws if none verifies); otherwise a checkpoint directory (as given, or relative to root),
// opened with open_checkpoint (throws if it fails).
std::optional<CheckpointInfo> resolve_resume(const std::string& arg, const std::string& root,
                                             std::vector<std::string>* warnings = nullptr);

// ---- helpers shared with other writers ----

// fsync of a file or directory; throws Error("<path>: fsync failed (<errno text>)").
void fsync_path(const std::string& path);
// Replaces `path` with `text` atomically: <path>.tmp.<pid>, fsync, rename, fsync of the directory.
// On failure the old file is untouched, no temporary remains, and the error names path and errno.
void atomic_write_text(const std::string& path, const std::string& text);
// XXH3-64 (seed 0) of a file's contents as 16 lowercase hex digits.
std::string xxh3_file_hex(const std::string& path);

}  // namespace diffmoe
