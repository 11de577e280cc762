// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::gemm(Context, const GemmArgs&) { DIFFMOE_FAIL("[gemm] not implemented"); }
void CpuBackend::grouped_gemm(Context, const GroupedGemmArgs&) { DIFFMOE_FAIL("[grouped_gemm] not implemented"); }
void CpuBackend::grouped_gemm_wgrad(Context, const GroupedGemmWgradArgs&) { DIFFMOE_FAIL("[grouped_gemm_wgrad] not implemented"); }
}  // namespace diffmoe
