#include "io/run_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "core/error.h"
#include "io/file_util.h"

namespace diffmoe {

namespace {

constexpr size_t kMaxHolderBytes = 4096;  // what a holder writes is one short line

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

// The holder's line, as the holder wrote it ("pid 123 on host h, started 2024-01-02T03:04:05Z").
std::string read_holder(int fd) {
  char buf[kMaxHolderBytes];
  const ssize_t r = ::pread(fd, buf, sizeof buf, 0);
  std::string s = r > 0 ? std::string(buf, static_cast<size_t>(r)) : std::string();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\0')) s.pop_back();
  for (char& c : s)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  return s.empty() ? "holder unknown" : s;
}

}  // namespace

std::string run_dir_lock_path(const std::string& dir) { return (std::filesystem::path(dir) / kRunLockName).string(); }

std::string sibling_lock_path(const std::string& dir) {
  std::filesystem::path p = std::filesystem::path(dir).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // "a/b/" -> "a/b"
  const std::string name = p.filename().string();
  if (name.empty() || name == "." || name == "..") return (std::filesystem::path(dir) / "dir.lock").string();
  p += ".lock";
  return p.string();
}

RunLock::RunLock(const std::string& lock_path, const std::string& guarded, const std::string& hint) : path_(lock_path) {
  const std::string dir = io::parent_directory(lock_path);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DIFFMOE_CHECK(!ec, "{}: cannot create the directory ({})", dir, ec.message());
  // O_NOFOLLOW: the lock is this directory's own file. O_CLOEXEC: a child process must not keep
  // the lock (an flock belongs to the open file, which a child would share).
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  DIFFMOE_CHECK(fd_ >= 0, "{}: cannot open the run lock ({})", path_, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    DIFFMOE_FAIL("{}: the run lock is not a regular file", path_);
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    const std::string holder = err == EWOULDBLOCK ? read_holder(fd_) : std::string();
    ::close(fd_);
    if (err == EWOULDBLOCK)
      DIFFMOE_FAIL("{}: in use by another diffmoe process ({}; lock {}); {}", guarded, holder, path_, hint);
    DIFFMOE_FAIL("{}: cannot lock ({})", path_, std::strerror(err));
  }
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  const std::string line = fmt::format("pid {} on host {}, started {}\n", ::getpid(), host_name(), when);
  // Best effort: the lock itself is what excludes; the text only names the holder.
  if (::ftruncate(fd_, 0) == 0) io::write_all(fd_, line.data(), line.size());
}

RunLock::~RunLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor of the open file releases the flock
}

}  // namespace diffmoe
