// SCAFFOLD: replaced by the real implementation.
#include "backend/cpu/cpu_backend.h"
namespace diffmoe {
void CpuBackend::fill(Context, const FillArgs&) { DIFFMOE_FAIL("[fill] not implemented"); }
void CpuBackend::copy(Context, const CopyArgs&) { DIFFMOE_FAIL("[copy] not implemented"); }
void CpuBackend::axpy(Context, const AxpyArgs&) { DIFFMOE_FAIL("[axpy] not implemented"); }
void CpuBackend::scale(Context, const ScaleArgs&) { DIFFMOE_FAIL("[scale] not implemented"); }
void CpuBackend::sum_squares(Context, const SumSquaresArgs&) { DIFFMOE_FAIL("[sum_squares] not implemented"); }
void CpuBackend::embedding_fwd(Context, const EmbeddingFwdArgs&) { DIFFMOE_FAIL("[embedding_fwd] not implemented"); }
void CpuBackend::embedding_bwd(Context, const EmbeddingBwdArgs&) { DIFFMOE_FAIL("[embedding_bwd] not implemented"); }
}  // namespace diffmoe
