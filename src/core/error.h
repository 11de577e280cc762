// One error policy (docs/style.md habit 7): library code throws diffmoe::Error, only main() exits.
// An Error's message is for the user (what went wrong, naming the file and field); the C++
// source location it was raised at is kept apart, for developers (`diffmoe` prints it when the
// environment has DIFFMOE_ERROR_LOCATION=1).
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace diffmoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what, std::string location = {})
      : std::runtime_error(what), location_(std::move(location)) {}
  const std::string& location() const { return location_; }  // "file.cpp:123", or empty

 private:
  std::string location_;
};

// Thrown by an allocator whose memory ran out (the CPU arena allocator): callers that know what
// the memory was for (the trainer: which config keys set the sizes) catch it and say so.
class OutOfMemory : public Error {
 public:
  OutOfMemory(const std::string& what, size_t bytes, std::string location = {})
      : Error(what, std::move(location)), bytes_(bytes) {}
  size_t bytes() const { return bytes_; }  // the allocation that failed

 private:
  size_t bytes_;
};

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& msg) {
  throw Error(msg, fmt::format("{}:{}", file, line));
}

}  // namespace diffmoe

// DIFFMOE_CHECK(cond, "[op] message {}", args...): throws diffmoe::Error naming the call site.
#define DIFFMOE_CHECK(cond, ...)                                                       \
  do {                                                                                 \
    if (!(cond)) ::diffmoe::throw_error(__FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)

#define DIFFMOE_FAIL(...) ::diffmoe::throw_error(__FILE__, __LINE__, fmt::format(__VA_ARGS__))
