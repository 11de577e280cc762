// The warning for OpenBLAS's generic kernels on a CPU that has better ones (backend/cpu/openblas_kernels.h).
#include "backend/cpu/openblas_kernels.h"

#include <gtest/gtest.h>

namespace diffmoe {
namespace {

TEST(OpenBlasKernels, WarnsForPrescottOnAnAvx512Cpu) {
  const auto w = generic_kernel_warning("Prescott", true, true, nullptr);
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->rfind("warning: ", 0), 0u) << *w;  // the CLI tests accept stderr lines of this form
  EXPECT_NE(w->find("OPENBLAS_CORETYPE=SkylakeX"), std::string::npos) << *w;
  EXPECT_EQ(w->find('\n'), std::string::npos) << "one line";
}

TEST(OpenBlasKernels, NamesHaswellForAnAvx2OnlyCpu) {
  const auto w = generic_kernel_warning("PRESCOTT", true, false, "");
  ASSERT_TRUE(w.has_value());
  EXPECT_NE(w->find("OPENBLAS_CORETYPE=Haswell"), std::string::npos) << *w;
}

TEST(OpenBlasKernels, SilentWhenTheKernelsFitOrTheUserChose) {
  EXPECT_FALSE(generic_kernel_warning("SkylakeX", true, true, nullptr).has_value());
  EXPECT_FALSE(generic_kernel_warning("Haswell", true, false, nullptr).has_value());
  EXPECT_FALSE(generic_kernel_warning("Prescott", false, false, nullptr).has_value());  // an SSE3-only CPU
  EXPECT_FALSE(generic_kernel_warning("Prescott", true, true, "Prescott").has_value());
  EXPECT_FALSE(generic_kernel_warning(nullptr, true, true, nullptr).has_value());
}

}  // namespace
}  // namespace diffmoe
