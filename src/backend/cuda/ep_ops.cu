// The expert-parallel dispatch plan (op_args.h EpDispatchPlanArgs, docs/model.md §12) on the GPU, in three
// launches and one scan, deterministic (no order depends on timing):
//   1. flags[r·N + n] = 1 when token n has a slot whose expert is on rank r (one thread per (r, n));
//   2. an inclusive scan over the flags in (r, n) order: pair (r, n)'s index is scan − 1, and the
//      pairs to rank r are scan[(r+1)·N − 1] − scan[r·N − 1];
//   3. one thread per (n, r) writes pair_of, pair_token, pair_idx, pair_w and adds its slots to the
//      per-expert counts (integer atomics: the totals do not depend on their order); one thread per
//      rank writes the pair counts.
#include <cub/device/device_scan.cuh>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {

using namespace cuda;

namespace {

__global__ void ep_flags_kernel(int32_t* flags, const int32_t* topk_idx, int64_t n_tokens, int64_t top_k, int64_t ranks,
                                int64_t local_experts, DeviceIssue* issue) {
  const int64_t total = n_tokens * ranks;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / n_tokens, n = i % n_tokens;
    int32_t any = 0;
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t e = topk_idx[n * top_k + k];
      if (!index_ok(issue, IssueSite::kEpPlanTopkIdx, n * top_k + k, e, ranks * local_experts)) continue;
      any |= e / local_experts == r ? 1 : 0;
    }
    flags[i] = any;
  }
}

template <class W>
__global__ void ep_pairs_kernel(int32_t* counts, int32_t* pair_token, int32_t* pair_of, int32_t* pair_idx, W* pair_w,
                                const int32_t* flags, const int32_t* scan, const int32_t* topk_idx, const W* topk_w,
                                int64_t n_tokens, int64_t top_k, int64_t ranks, int64_t local_experts) {
  const int64_t total = n_tokens * ranks;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / n_tokens, n = i % n_tokens;
    if (!flags[i]) {
      pair_of[n * ranks + r] = -1;
      continue;
    }
    const int64_t p = scan[i] - 1;
    pair_of[n * ranks + r] = static_cast<int32_t>(p);
    pair_token[p] = static_cast<int32_t>(n);
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t e = topk_idx[n * top_k + k];
      const bool here = e >= 0 && e / local_experts == r;
      pair_idx[p * top_k + k] = here ? static_cast<int32_t>(e - r * local_experts) : -1;
      pair_w[p * top_k + k] = here ? topk_w[n * top_k + k] : W(0);
      if (here) atomicAdd(&counts[r * (1 + local_experts) + 1 + (e - r * local_experts)], 1);
    }
  }
}

__global__ void ep_pair_counts_kernel(int32_t* counts, const int32_t* scan, int64_t n_tokens, int64_t ranks,
                                      int64_t local_experts) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < ranks; r += int64_t{gridDim.x} * blockDim.x) {
    const int32_t before = r == 0 ? 0 : scan[r * n_tokens - 1];
    counts[r * (1 + local_experts)] = scan[(r + 1) * n_tokens - 1] - before;
  }
}

}  // namespace

void CudaBackend::ep_dispatch_plan(Context ctx, const EpDispatchPlanArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "ep_dispatch_plan");
  constexpr std::string_view kOp = "ep_dispatch_plan";
  const EpPlanDims d = validate_ep_dispatch_plan(a, Device::kCUDA);
  require_f32(a.topk_w, kOp);
  const cudaStream_t s = stream(ctx);
  CUDA_CHECK(cudaMemsetAsync(a.counts.data, 0, a.counts.nbytes(), s));
  const int64_t total = d.tokens * d.ranks;
  if (total == 0) return;
  DIFFMOE_CHECK(total <= INT32_MAX, "[{}] {} tokens x {} ranks overflow the i32 scan", kOp, d.tokens, d.ranks);
  // Scratch: flags, their inclusive scan, CUB's temporaries.
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, static_cast<const int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), static_cast<int>(total), s));
  const size_t flag_bytes = align256(static_cast<size_t>(total) * sizeof(int32_t));
  char* base = static_cast<char*>(scratch(2 * flag_bytes + temp_bytes));
  auto* flags = reinterpret_cast<int32_t*>(base);
  auto* scan = reinterpret_cast<int32_t*>(base + flag_bytes);
  ep_flags_kernel<<<grid_for(total), kThreads, 0, s>>>(flags, i32(a.topk_idx), d.tokens, d.top_k, d.ranks,
                                                       d.local_experts, issue());
  CUDA_CHECK_LAUNCH(kOp);
  CUDA_CHECK(cub::DeviceScan::InclusiveSum(base + 2 * flag_bytes, temp_bytes, flags, scan, static_cast<int>(total), s));
  ep_pairs_kernel<float><<<grid_for(total), kThreads, 0, s>>>(
      i32(a.counts), i32(a.pair_token), i32(a.pair_of), i32(a.pair_idx), f32(a.pair_w), flags, scan, i32(a.topk_idx),
      f32(a.topk_w), d.tokens, d.top_k, d.ranks, d.local_experts);
  CUDA_CHECK_LAUNCH(kOp);
  ep_pair_counts_kernel<<<grid_for(d.ranks), kThreads, 0, s>>>(i32(a.counts), scan, d.tokens, d.ranks, d.local_experts);
  CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace diffmoe
