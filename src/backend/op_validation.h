// Argument validation shared by every backend (docs/style.md habit 7): devices, ranks, shapes, dtypes
// and options of each op's argument struct (op_args.h), with errors that name the op and the field.
// Each validate_* checks every tensor is on `dev` and that every float tensor of the call has one
// dtype (index tensors i32); it returns the sizes the op needs.
//
// Not here, because they depend on the backend: which float dtypes it computes in (CPU: f32 or
// f64; CUDA: f32, and bf16 where op_args.h allows it in the bf16 GEMM mode), and checks of tensor CONTENTS (token ids,
// expert indices, slot positions, targets in range). The CPU backend reads those on the host; the CUDA backend checks
// them on the device and reports at the next synchronize(), so no op syncs the host. Group offsets of the grouped GEMMs
// are read on the host by the CPU backend and by the CUDA backend's f32 path, then checked by check_group_offsets below
// (the CUDA bf16 kernels check them on the device).
//
// This header is plain C++17 so that CUDA translation units can include it.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <utility>
#include <vector>

#include "backend/op_args.h"

namespace diffmoe {

// "[op] name is on cuda, the cpu backend needs cpu memory"; also rejects a null view of non-zero size.
void check_device(const Tensor& t, Device dev, std::string_view op, std::string_view name);

// ---------------------------------------------------------------- basic ops and the embedding
void validate_fill(const FillArgs& a, Device dev);  // an i32 out needs an integral value in range
void validate_copy(const CopyArgs& a, Device dev);  // equal numel; a dtype change converts among
                                                    // f32, f64, bf16, f8e4m3 and never in place
void validate_axpy(const AxpyArgs& a, Device dev);
void validate_scale(const ScaleArgs& a, Device dev);
void validate_sum_squares(const SumSquaresArgs& a, Device dev);
void validate_count_nonfinite(const CountNonfiniteArgs& a, Device dev);  // count [1] i64; x any float dtype

struct EmbeddingDims {
  int64_t rows = 0, vocab = 0, dim = 0;
};
EmbeddingDims validate_embedding_fwd(const EmbeddingFwdArgs& a, Device dev);
EmbeddingDims validate_embedding_bwd(const EmbeddingBwdArgs& a, Device dev);

// ---------------------------------------------------------------- RMSNorm
struct RmsNormDims {
  int64_t x_stride = 0, y_stride = 0;  // effective strides (0 in the args means width)
};
RmsNormDims validate_rmsnorm_fwd(const RmsNormFwdArgs& a, Device dev);
RmsNormDims validate_rmsnorm_bwd(const RmsNormBwdArgs& a, Device dev);

// ---------------------------------------------------------------- GEMM
struct GemmDims {
  int64_t m = 0, n = 0, k = 0;
};
// Also the addend (C's shape and dtype, C itself or apart from it) and a bf16 C (beta = 0, not
// f32_exact; whether the bf16 GEMM mode is on: check_gemm_bf16_mode).
GemmDims validate_gemm(const GemmArgs& a, Device dev);
struct GroupedGemmDims {
  int64_t rows = 0, k = 0, n = 0, groups = 0;
  int64_t k2 = 0;  // the second term's inner size (0 without one)
  bool two_terms = false;
};
// Offsets' shape/dtype too, and the optional second term (a2 and b2 both given or both empty).
GroupedGemmDims validate_grouped_gemm(const GroupedGemmArgs& a, Device dev);
struct GroupedGemmWgradDims {
  int64_t rows = 0, m = 0, n = 0, groups = 0;
};
GroupedGemmWgradDims validate_grouped_gemm_wgrad(const GroupedGemmWgradArgs& a, Device dev);
// The GEMM ops' bf16 tensors (operands, a bf16 C; `tensors` names them) need the bf16 GEMM mode
// (bf16_mode: GemmPrecision::kBF16) and, for gemm, f32_exact = false. Both backends ask it: the f32
// mode multiplies its f32 tensors as they are, and the model plans bf16 GEMM tensors only in the
// bf16 mode, so a bf16 tensor in an f32-mode GEMM is a planning error on every backend.
void check_gemm_bf16_mode(std::string_view op, bool bf16_mode, bool f32_exact,
                          std::initializer_list<std::pair<const Tensor*, std::string_view>> tensors);
// The values of offsets [G+1] read to the host: offsets[0] = 0, non-decreasing, offsets[G] ≤ rows, and, when
// max_group_rows > 0 (GroupedGemmArgs), no group above it. Returned widened to int64 so callers index without
// further checks.
std::vector<int64_t> check_group_offsets(const int32_t* offsets, int64_t groups, int64_t rows, std::string_view op,
                                         int64_t max_group_rows = 0);

// ---------------------------------------------------------------- FP8 (fp8_validation.cpp)
// Shapes, dtypes and the scale layouts of op_args.h's FP8 section, naming the field. The float
// outputs a backend writes: f32 or bf16, and on the CPU also f64. The CUDA-only rules of fp8_gemm
// (cuBLASLt's sizes and alignments) are the CUDA backend's.
struct Fp8QuantDims {
  int64_t rows = 0, cols = 0;               // the source's [M, K] (act_quant) or [N, K] (weights)
  bool row_wise = false, col_wise = false;  // which copies are written: (q, scale), (q_t, scale_t)
  int64_t groups = 1;                       // weight_quant of a stack [G, N, K]: G; act_quant with offsets: G (else 1)
  bool grouped = false;                     // act_quant with offsets: the grouped transposed copy (op_args.h)
};
Fp8QuantDims validate_act_quant(const ActQuantArgs& a, Device dev);
Fp8QuantDims validate_weight_quant(const WeightQuantArgs& a, Device dev);
Fp8QuantDims validate_weight_dequant(const WeightDequantArgs& a, Device dev);
GemmDims validate_fp8_gemm(const Fp8GemmArgs& a, Device dev);
struct Fp8GroupedGemmDims {
  int64_t rows = 0, n = 0, k = 0, k2 = 0, groups = 0;
  bool two_terms = false;
};
Fp8GroupedGemmDims validate_fp8_grouped_gemm(const Fp8GroupedGemmArgs& a, Device dev);
struct Fp8GroupedWgradDims {
  int64_t m = 0, n = 0, groups = 0, slots = 0;  // C [G, M, N]; the copies' tile slots T
};
Fp8GroupedWgradDims validate_fp8_grouped_gemm_wgrad(const Fp8GroupedGemmWgradArgs& a, Device dev);

// ---------------------------------------------------------------- RoPE
int64_t validate_rope(const RopeArgs& a, Device dev);  // returns the row width W of x [N, W]

// ---------------------------------------------------------------- MLA split, λ, attention
struct KvSplitDims {
  int64_t rows = 0, d_qk = 0, kr_stride = 0;  // kr_stride: effective (0 in the args means d_rope)
};
KvSplitDims validate_mla_kv_split_fwd(const MlaKvSplitFwdArgs& a, Device dev);
KvSplitDims validate_mla_kv_split_bwd(const MlaKvSplitBwdArgs& a, Device dev);
void validate_diff_lambda_fwd(const DiffLambdaFwdArgs& a, Device dev);
void validate_diff_lambda_bwd(const DiffLambdaBwdArgs& a, Device dev);

struct AttnDims {
  int64_t batch = 0, seq = 0, heads = 0, d_qk = 0, d_v = 0;
  int64_t comps = 1;   // components per value group: 2 when differential, else 1
  int64_t groups = 0;  // heads / comps
};
AttnDims validate_attention_fwd(const AttentionFwdArgs& a, Device dev);
AttnDims validate_attention_bwd(const AttentionBwdArgs& a, Device dev);

struct LatentDims {
  int64_t batch = 0, tq = 0, heads = 0, r_kv = 0, d_rope = 0;
  int64_t q_rope_width = 0;                      // W: values per head in q_rope
  int64_t capacity = 0;                          // S: cache rows per sequence
  int64_t comps = 1;                             // components per value group: 2 when differential, else 1
  int64_t groups = 0;                            // heads / comps = H_out
  int64_t row() const { return r_kv + d_rope; }  // one cache row [ĉ ; k^R]
};
LatentDims validate_latent_attention(const LatentAttentionArgs& a, Device dev);

// ---------------------------------------------------------------- paged latent cache (paged_validation.cpp)
struct PagedCacheWriteDims {
  int64_t rows = 0, width = 0, n_blocks = 0, block_size = 0;
};
PagedCacheWriteDims validate_paged_cache_write(const PagedCacheWriteArgs& a, Device dev);
// slots [rows] read to the host: each in [0, n_blocks·block_size) and no two equal.
void check_paged_slots(const int32_t* slots, const PagedCacheWriteDims& d, std::string_view op);

struct PagedLatentDims {
  int64_t rows = 0, batch = 0, heads = 0, r_kv = 0, d_rope = 0;
  int64_t q_rope_width = 0;  // W: values per head in q_rope
  int64_t n_blocks = 0, block_size = 0, max_blocks = 0;
  int64_t comps = 1, groups = 0;  // as LatentDims
  int64_t row() const { return r_kv + d_rope; }
};
PagedLatentDims validate_paged_latent_attention(const PagedLatentAttentionArgs& a, Device dev);
// The index contents read to the host (the CPU backend): 0 = q_offsets[0] ≤ … ≤ q_offsets[B] = rows,
// n_b ≤ kv_lens[b] ≤ max_blocks·block_size, and the block ids that cover kv_lens[b] in [0, n_blocks).
void check_paged_indices(const int32_t* block_table, const int32_t* kv_lens, const int32_t* q_offsets,
                         const PagedLatentDims& d, std::string_view op);

// ---------------------------------------------------------------- SwiGLU
void validate_swiglu_fwd(const SwigluFwdArgs& a, Device dev);
void validate_swiglu_bwd(const SwigluBwdArgs& a, Device dev);

// ---------------------------------------------------------------- MoE
// Shapes and router options; the index contents (topk_idx, src_row, slot_pos) are the backend's.
void validate_router_fwd(const RouterFwdArgs& a, Device dev);
void validate_router_bwd(const RouterBwdArgs& a, Device dev);
void validate_aux_loss_fwd(const AuxLossFwdArgs& a, Device dev);
void validate_aux_loss_bwd(const AuxLossBwdArgs& a, Device dev);
void validate_moe_permute(const MoePermuteArgs& a, Device dev);
void validate_moe_gather(const MoeGatherArgs& a, Device dev);
void validate_moe_gather_bwd(const MoeGatherBwdArgs& a, Device dev);
void validate_moe_combine_fwd(const MoeCombineFwdArgs& a, Device dev);
void validate_moe_combine_bwd(const MoeCombineBwdArgs& a, Device dev);
void validate_moe_bias_update(const MoeBiasUpdateArgs& a, Device dev);
struct EpPlanDims {
  int64_t tokens, top_k, ranks, local_experts, max_pairs;
};
EpPlanDims validate_ep_dispatch_plan(const EpDispatchPlanArgs& a, Device dev);

// ---------------------------------------------------------------- loss and optimizer
struct CrossEntropyDims {
  int64_t rows = 0, vocab = 0;
};
CrossEntropyDims validate_cross_entropy_fwd(const CrossEntropyFwdArgs& a, Device dev);
CrossEntropyDims validate_cross_entropy_bwd(const CrossEntropyBwdArgs& a, Device dev);
void validate_adamw(const AdamWArgs& a, Device dev);
// Every entry as validate_adamw, naming it ("[adamw_multi] entries[3].m ..."); one float dtype for
// all entries' params and grads and grad_sq (entries[0].param's); each entry's moments in it or in bf16.
void validate_adamw_multi(const AdamWMultiArgs& a, Device dev);

}  // namespace diffmoe
