// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::rope(Context, const RopeArgs&) { DIFFMOE_FAIL("[rope] not implemented"); }
}  // namespace diffmoe
