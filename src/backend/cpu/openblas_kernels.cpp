#include "backend/cpu/openblas_kernels.h"

#include <cblas.h>
#include <fmt/format.h>
#include <strings.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace diffmoe {

std::optional<std::string> generic_kernel_warning(const char* corename, bool avx2, bool avx512f,
                                                  const char* coretype_env) {
  if (corename == nullptr || strcasecmp(corename, "prescott") != 0) return std::nullopt;
  if (coretype_env != nullptr && coretype_env[0] != '\0') return std::nullopt;  // the user chose
  if (!avx2 && !avx512f) return std::nullopt;                                   // Prescott is then the right choice
  const char* type = avx512f ? "SkylakeX" : "Haswell";
  return fmt::format(
      "warning: OpenBLAS did not recognise this CPU and runs its generic Prescott kernels, though the CPU has {}; "
      "export OPENBLAS_CORETYPE={} before starting diffmoe for its {} kernels (about 1.8x the tokens/s of the tiny run "
      "on a 2-core VM)",
      avx512f ? "AVX-512" : "AVX2", type, avx512f ? "AVX-512" : "AVX2");
}

void warn_if_generic_blas_kernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    __builtin_cpu_init();
    const auto w = generic_kernel_warning(openblas_get_corename(), __builtin_cpu_supports("avx2") != 0,
                                          __builtin_cpu_supports("avx512f") != 0, std::getenv("OPENBLAS_CORETYPE"));
    if (w) std::fprintf(stderr, "%s\n", w->c_str());
  });
}

}  // namespace diffmoe
