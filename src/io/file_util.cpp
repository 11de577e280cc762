#include "io/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "core/error.h"

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

std::string_view file_type_name(unsigned mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return "a regular file";
    case S_IFDIR: return "a directory";
    case S_IFIFO: return "a FIFO";
    case S_IFCHR: return "a character device";
    case S_IFBLK: return "a block device";
    case S_IFSOCK: return "a socket";
    case S_IFLNK: return "a symbolic link";
    default: return "not a regular file";
  }
}

std::string read_small_file(const std::string& path, size_t max_bytes, std::string_view what) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. O_NOCTTY: a terminal
  // path must not become the controlling terminal.
  const FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)};
  DIFFMOE_CHECK(fd.fd >= 0, "{}: cannot open the {} ({})", path, what, std::strerror(errno));
  struct stat st {};
  DIFFMOE_CHECK(::fstat(fd.fd, &st) == 0, "{}: cannot stat the {} ({})", path, what, std::strerror(errno));
  DIFFMOE_CHECK(S_ISREG(st.st_mode), "{}: the {} is {}, not a regular file", path, what, file_type_name(st.st_mode));
  DIFFMOE_CHECK(static_cast<uint64_t>(st.st_size) <= max_bytes, "{}: the {} is {} bytes, over the {}-byte limit", path,
                what, static_cast<uint64_t>(st.st_size), max_bytes);
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  for (;;) {
    if (got == text.size()) {  // at the size fstat gave: grow (once, to the cap + 1) only if more comes
      if (text.size() > max_bytes) break;
      text.resize(std::min(max_bytes + 1, std::max<size_t>(text.size() * 2, 4096)));
    }
    const ssize_t r = ::read(fd.fd, text.data() + got, text.size() - got);
    if (r < 0 && errno == EINTR) continue;
    DIFFMOE_CHECK(r >= 0, "{}: cannot read the {} ({})", path, what, std::strerror(errno));
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  DIFFMOE_CHECK(got <= max_bytes, "{}: the {} grew past the {}-byte limit while being read", path, what, max_bytes);
  text.resize(got);
  return text;
}

void check_output_path(const std::string& path, std::string_view what, OutputKind kind) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    DIFFMOE_CHECK(errno == ENOENT || errno == ENOTDIR, "{}: cannot use as the {} ({})", path, what,
                  std::strerror(errno));
    return;  // missing: it will be created (a missing parent fails when it is)
  }
  const bool dir = kind == OutputKind::kDirectory;
  DIFFMOE_CHECK(dir ? S_ISDIR(st.st_mode) : S_ISREG(st.st_mode),
                "{}: the {} exists and is {}; expected {} (or nothing there yet)", path, what,
                file_type_name(st.st_mode), dir ? "a directory" : "a regular file");
}

}  // namespace diffmoe::io
