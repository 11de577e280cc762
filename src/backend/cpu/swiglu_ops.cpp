// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::swiglu_fwd(Context, const SwigluFwdArgs&) { DIFFMOE_FAIL("[swiglu_fwd] not implemented"); }
void CpuBackend::swiglu_bwd(Context, const SwigluBwdArgs&) { DIFFMOE_FAIL("[swiglu_bwd] not implemented"); }
}  // namespace diffmoe
