// Helpers of the libFuzzer targets (tests/fuzz/fuzz_*.cpp). Each target feeds its input to one
// reader and accepts exactly two outcomes: success, or a diffmoe::Error (the one-line error the
// user sees). Anything else — a sanitizer report, another exception escaping, a hang, a huge
// allocation (libFuzzer's -rss_limit_mb / -malloc_limit_mb) — is a finding.
#pragma once
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace diffmoe::fuzz {

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Writes all of `text` to `fd` from offset 0 and truncates the rest; aborts on failure (the
// harness, not the code under test, failed).
inline void rewrite(int fd, std::string_view text) {
  if (::ftruncate(fd, 0) != 0 || ::lseek(fd, 0, SEEK_SET) != 0) std::abort();
  for (size_t done = 0; done < text.size();) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w <= 0) std::abort();
    done += static_cast<size_t>(w);
  }
}

// An anonymous in-memory file holding the input, opened by path ("/proc/self/fd/N") by readers
// that take a path: no disk I/O per input.
class MemFile {
 public:
  explicit MemFile(std::string_view text) : fd_(::memfd_create("fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) std::abort();
    rewrite(fd_, text);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_;
};

// A directory of this process, made once, for readers that need file names (extensions, a
// checkpoint's layout). Left behind: one per fuzzing process, small.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    // In memory where there is a tmpfs (/dev/shm): the targets rewrite files at every input.
    char shm[] = "/dev/shm/diffmoe-fuzz-XXXXXX";
    if (::mkdtemp(shm) != nullptr) return std::string(shm);
    char tmp[] = "/tmp/diffmoe-fuzz-XXXXXX";
    if (::mkdtemp(tmp) == nullptr) std::abort();
    return std::string(tmp);
  }();
  return dir;
}

// Replaces <path> with `text`.
inline void write_file(const std::string& path, std::string_view text) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (!text.empty() && std::fwrite(text.data(), 1, text.size(), f) != text.size()) std::abort();
  if (std::fclose(f) != 0) std::abort();
}

// A finding that is not a crash: a property of the reader does not hold.
[[noreturn]] inline void finding(const char* what) {
  std::fprintf(stderr, "fuzz finding: %s\n", what);
  std::abort();
}

}  // namespace diffmoe::fuzz
