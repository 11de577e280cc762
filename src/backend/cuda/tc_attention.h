// Tensor-core (bf16 mma.sync) fused causal (differential) attention (tc_attention_ops.cu, kernels in
// tc_attention.cuh). attention_ops.cu calls these under GemmPrecision::kBF16 for the shapes they
// cover; the f32 flash kernels (flash_attention.h) and the simple ones stay for the rest.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "backend/op_args.h"
#include "backend/op_validation.h"

namespace diffmoe {
class CudaBackend;
namespace cuda {

// Covered: d_qk ∈ {32, 48, 64, 96, 128} and value-group width comps·d_v ∈ {32, 64, 128}, plain or
// differential, any B and T (T need not be a multiple of the 64-row tiles).
bool tc_attention_covers(const AttnDims& d);

// Same contract as Backend::attention_fwd / attention_bwd (op_args.h), with q, k, v and dout rounded
// to bf16 (nearest even) as tensor-core operands and P, dS rounded to bf16 for their products;
// softmax statistics, D, dλ and every accumulation in f32 (dλ's sum in f64), outputs f32. q, k, v
// may be bf16 already: read in place, so a bf16 tensor gives bitwise the results of the f32 tensor
// it was rounded from. Deterministic (no atomics). Scratch: the backend's shared workspace (bf16
// copies of f32 inputs, dout, D and the dλ partials).
void tc_attention_fwd(CudaBackend& be, cudaStream_t s, const AttentionFwdArgs& a, const AttnDims& d);
void tc_attention_bwd(CudaBackend& be, cudaStream_t s, const AttentionBwdArgs& a, const AttnDims& d);

}  // namespace cuda
}  // namespace diffmoe
