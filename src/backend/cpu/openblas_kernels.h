// Which kernels OpenBLAS runs on this CPU, and the warning when they are the generic ones.
//
// OpenBLAS chooses its GEMM kernels at load time from the CPU's vendor and model numbers. A virtual
// CPU whose model it does not know (a cloud VM reporting "Intel(R) Xeon(R) Processor") gets the
// generic Prescott (SSE3) kernels even when the CPU has AVX2 or AVX-512: on the 2-core CI VM the tiny
// run went at 2,300 tokens/s with them and 4,200 with OPENBLAS_CORETYPE=SkylakeX (README). The
// variable must be set before the library loads, so diffmoe can only say so.
#pragma once
#include <optional>
#include <string>

namespace diffmoe {

// The warning for a CPU with AVX2 or AVX-512 on which OpenBLAS chose its Prescott kernels and
// OPENBLAS_CORETYPE is unset: one line starting "warning: ", naming the variable and its value.
// nullopt otherwise. Arguments as OpenBLAS and the CPU report them (pure, for tests).
std::optional<std::string> generic_kernel_warning(const char* corename, bool avx2, bool avx512f,
                                                  const char* coretype_env);

// Prints generic_kernel_warning() for this process to stderr, at most once.
void warn_if_generic_blas_kernels();

}  // namespace diffmoe
