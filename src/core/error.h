// One error policy (STYLE.md habit 7): library code throws diffmoe::Error, only main() exits.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace diffmoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& msg) {
  throw Error(fmt::format("{} ({}:{})", msg, file, line));
}

}  // namespace diffmoe

// DIFFMOE_CHECK(cond, "[op] message {}", args...): throws diffmoe::Error naming the call site.
#define DIFFMOE_CHECK(cond, ...)                                                   \
  do {                                                                             \
    if (!(cond)) ::diffmoe::throw_error(__FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)

#define DIFFMOE_FAIL(...) ::diffmoe::throw_error(__FILE__, __LINE__, fmt::format(__VA_ARGS__))
