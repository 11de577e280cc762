#include "io/file_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include <fmt/format.h>

namespace diffmoe::io {

void Failure::note(const char* failed_step) {
  if (step != nullptr) return;
  step = failed_step;
  err = errno;
}

FdGuard::~FdGuard() {
  if (fd >= 0) ::close(fd);
}

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

Failure write_file_synced(const std::string& path, const WriteContents& contents) {
  Failure failed;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    failed.note(kStepCreate);
    return failed;
  }
  if (!contents(fd)) failed.note(kStepWrite);
  if (!failed && ::fsync(fd) != 0) failed.note(kStepFsync);
  if (::close(fd) != 0) failed.note(kStepClose);
  return failed;
}

std::string temp_path(const std::string& path) { return fmt::format("{}.tmp.{}", path, ::getpid()); }

Failure replace_file(const std::string& path, const WriteContents& contents) {
  const std::string tmp = temp_path(path);
  Failure failed = write_file_synced(tmp, contents);
  if (!failed && ::rename(tmp.c_str(), path.c_str()) != 0) failed.note(kStepRename);
  if (failed) ::unlink(tmp.c_str());
  return failed;
}

Failure fsync_path(const std::string& path) {
  Failure failed;
  const FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) failed.note(kStepOpenForFsync);
  else if (::fsync(fd.fd) != 0) failed.note(kStepFsync);
  return failed;
}

std::string parent_directory(const std::string& path) {
  const std::string parent = std::filesystem::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

Failure fsync_parent_directory(const std::string& path) { return fsync_path(parent_directory(path)); }

}  // namespace diffmoe::io
