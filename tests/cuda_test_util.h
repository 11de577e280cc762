// CUDA tests on machines without a usable CUDA device (CI builds the CUDA backend but has no GPU):
// DIFFMOE_REQUIRE_CUDA(), first thing in a test, skips the test and says why. Where a GPU is
// expected (tools/gpu-check.sh sets DIFFMOE_REQUIRE_GPU=1) it fails instead, so that a GPU check
// cannot pass by skipping everything.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "backend/backend_registry.h"

namespace diffmoe::test {

// "" when a CUDA backend can start here, else why not (asked once per process; starts no backend).
inline const std::string& cuda_unusable_reason() {
  static const std::string reason = backend_unusable_reason("cuda");
  return reason;
}

// DIFFMOE_REQUIRE_GPU=1: a missing device is a failure, not a skip.
inline bool gpu_required() {
  const char* v = std::getenv("DIFFMOE_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

}  // namespace diffmoe::test

#define DIFFMOE_REQUIRE_CUDA()                                                                          \
  do {                                                                                                  \
    const std::string& diffmoe_unusable = ::diffmoe::test::cuda_unusable_reason();                      \
    if (!diffmoe_unusable.empty()) {                                                                    \
      if (::diffmoe::test::gpu_required()) FAIL() << "DIFFMOE_REQUIRE_GPU=1, but " << diffmoe_unusable; \
      GTEST_SKIP() << "CUDA test skipped: " << diffmoe_unusable;                                        \
    }                                                                                                   \
  } while (0)
