// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::adamw(Context, const AdamWArgs&) { DIFFMOE_FAIL("[adamw] not implemented"); }
}  // namespace diffmoe
