// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::rmsnorm_fwd(Context, const RmsNormFwdArgs&) { DIFFMOE_FAIL("[rmsnorm_fwd] not implemented"); }
void CpuBackend::rmsnorm_bwd(Context, const RmsNormBwdArgs&) { DIFFMOE_FAIL("[rmsnorm_bwd] not implemented"); }
}  // namespace diffmoe
