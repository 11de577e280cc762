// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::cross_entropy_fwd(Context, const CrossEntropyFwdArgs&) { DIFFMOE_FAIL("[cross_entropy_fwd] not implemented"); }
void CpuBackend::cross_entropy_bwd(Context, const CrossEntropyBwdArgs&) { DIFFMOE_FAIL("[cross_entropy_bwd] not implemented"); }
}  // namespace diffmoe
