// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::router_fwd(Context, const RouterFwdArgs&) { DIFFMOE_FAIL("[router_fwd] not implemented"); }
void CpuBackend::router_bwd(Context, const RouterBwdArgs&) { DIFFMOE_FAIL("[router_bwd] not implemented"); }
void CpuBackend::aux_loss_fwd(Context, const AuxLossFwdArgs&) { DIFFMOE_FAIL("[aux_loss_fwd] not implemented"); }
void CpuBackend::aux_loss_bwd(Context, const AuxLossBwdArgs&) { DIFFMOE_FAIL("[aux_loss_bwd] not implemented"); }
void CpuBackend::moe_permute(Context, const MoePermuteArgs&) { DIFFMOE_FAIL("[moe_permute] not implemented"); }
void CpuBackend::moe_gather(Context, const MoeGatherArgs&) { DIFFMOE_FAIL("[moe_gather] not implemented"); }
void CpuBackend::moe_gather_bwd(Context, const MoeGatherBwdArgs&) { DIFFMOE_FAIL("[moe_gather_bwd] not implemented"); }
void CpuBackend::moe_combine_fwd(Context, const MoeCombineFwdArgs&) { DIFFMOE_FAIL("[moe_combine_fwd] not implemented"); }
void CpuBackend::moe_combine_bwd(Context, const MoeCombineBwdArgs&) { DIFFMOE_FAIL("[moe_combine_bwd] not implemented"); }
void CpuBackend::moe_bias_update(Context, const MoeBiasUpdateArgs&) { DIFFMOE_FAIL("[moe_bias_update] not implemented"); }
}  // namespace diffmoe
