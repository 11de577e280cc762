// Helpers for the CPU op tests (test_*.cpp here): the backend under test, either one shared
// instance or a fresh one per test through the fixture.
#pragma once
#include <gtest/gtest.h>

#include <memory>

#include "backend/cpu/cpu_backend.h"

namespace diffmoe::test {

// The CPU backend, created once per test binary.
inline Backend& cpu() {
  static std::unique_ptr<Backend> backend = make_cpu_backend();
  return *backend;
}

// A fresh CPU backend and a default context per test.
class CpuOpsTest : public ::testing::Test {
 protected:
  CpuBackend be;
  Context ctx;
};

}  // namespace diffmoe::test
