// Fused flash-style causal (differential) attention, f32 (flash_attention_ops.cu). attention_ops.cu
// calls these for the shapes they cover and keeps its simple kernels for the rest.
#pragma once
#include <cuda_runtime_api.h>

#include "backend/op_args.h"
#include "backend/op_validation.h"

namespace diffmoe {
class CudaBackend;
namespace cuda {

// Covered: d_qk ∈ {32, 48, 96, 128} and value-group width comps·d_v ∈ {32, 64, 128} (d_v = 32 or 64;
// 2·d_v for a differential head), any B and T (T need not be a multiple of the 64-row tiles).
bool flash_attention_covers(const AttnDims& d);

// Same contract as Backend::attention_fwd / attention_bwd (op_args.h); d from the validation.
void flash_attention_fwd(CudaBackend& be, cudaStream_t s, const AttentionFwdArgs& a, const AttnDims& d);
void flash_attention_bwd(CudaBackend& be, cudaStream_t s, const AttentionBwdArgs& a, const AttnDims& d);

}  // namespace cuda
}  // namespace diffmoe
