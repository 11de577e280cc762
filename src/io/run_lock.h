// An advisory lock on a directory a trainer writes into (its out_dir, its checkpoint root; also a
// shard directory being prepared): one writer per directory. The lock is flock(2) on a lock file (<out_dir>/train.lock;
// beside a checkpoint root, <root>.lock, so that the root itself is made only by the first save), which also holds the
// holder's pid, host and start time for the message a second trainer gets. The kernel drops the lock when the holder
// exits, however it exits (kill -9 included), so a stale lock file never blocks a run. With the lock held, leftovers in
// the directory (temporary checkpoint directories, *.tmp.<pid> files) belong to a process that is gone and may be
// removed.
#pragma once
#include <string>

namespace diffmoe {

inline constexpr const char* kRunLockName = "train.lock";

// The lock file of a run directory: <dir>/train.lock.
std::string run_dir_lock_path(const std::string& dir);
// The lock file beside a directory, so that the directory holds only its own files: <dir>.lock
// ("runs/x/checkpoints" -> "runs/x/checkpoints.lock"; a checkpoint root, a shard directory), or
// inside it as "dir.lock" when the path has no name of its own (".").
std::string sibling_lock_path(const std::string& dir);

class RunLock {
 public:
  // Takes the lock of `guarded` in the file `lock_path` (created, with its directory, when missing),
  // or throws "<guarded>: in use by another diffmoe process (pid 123 on host h, started ...; lock
  // <lock_path>); <hint>".
  RunLock(const std::string& lock_path, const std::string& guarded,
          const std::string& hint = "wait for it to finish or stop it, or use another train.out_dir / checkpoint.dir");
  ~RunLock();  // releases the lock (the file stays: removing it would race with a new holder)
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace diffmoe
