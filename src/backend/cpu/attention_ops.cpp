// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::mla_kv_split_fwd(Context, const MlaKvSplitFwdArgs&) { DIFFMOE_FAIL("[mla_kv_split_fwd] not implemented"); }
void CpuBackend::mla_kv_split_bwd(Context, const MlaKvSplitBwdArgs&) { DIFFMOE_FAIL("[mla_kv_split_bwd] not implemented"); }
void CpuBackend::diff_lambda_fwd(Context, const DiffLambdaFwdArgs&) { DIFFMOE_FAIL("[diff_lambda_fwd] not implemented"); }
void CpuBackend::diff_lambda_bwd(Context, const DiffLambdaBwdArgs&) { DIFFMOE_FAIL("[diff_lambda_bwd] not implemented"); }
void CpuBackend::attention_fwd(Context, const AttentionFwdArgs&) { DIFFMOE_FAIL("[attention_fwd] not implemented"); }
void CpuBackend::attention_bwd(Context, const AttentionBwdArgs&) { DIFFMOE_FAIL("[attention_bwd] not implemented"); }
}  // namespace diffmoe
