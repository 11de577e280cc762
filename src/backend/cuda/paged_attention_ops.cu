// The paged latent cache on the GPU (op_args.h's paged section; docs/model.md §2, docs/derivations.md §2.4, §3.3).
//
// paged_cache_write: one block per row (grid-stride), threads over its W values; a slot outside the
// pool is skipped and reported (device_issue.h). Slots are assumed distinct (the engine hands out
// each row once; the CPU checks it).
//
// paged_latent_attention: absorbed MQA over one shared key/value head (key [ĉ_s ; k^R_s], value ĉ_s)
// in the flash-decoding style. One block per (query row n, chunk of up to kHeadsPerBlock component
// heads; differential pairs never split, kHeadsPerBlock is even). The block finds its sequence by a
// binary search over q_offsets, keeps its heads' queries in shared memory and walks the sequence's
// keys s ≤ p in tiles of kTile rows gathered through the block table: every key row is read once per
// block for all its heads (MLA's point: the heads share the key). Per tile: warps score (head, key)
// pairs, one thread per head updates the running max m_h and normaliser l_h (online softmax) and
// rescales, then every thread adds Σ_s p_{h,s} ĉ_s to its accumulator columns (in shared memory).
// At the end out[g, n] = acc_{2g}/l_{2g} − λ·acc_{2g+1}/l_{2g+1} (latent-space subtraction), or
// acc_g/l_g for plain heads. Shared memory does not grow with the context (it does in
// latent_attention_ops.cu); it is (H_b + kTile)·(r_kv + d_rope) + H_b·(kTile + r_kv + 3) floats.
// Split keys (flash-decoding): a decode step has few query rows (one per sequence), so rows × head
// chunks blocks leave most SMs idle while each walks the whole context (batch 1 of the bench preset:
// 2 blocks, 1.3 ms per layer). When that grid is below the SM count, each (row, head chunk) is split
// into S blocks over the keys (S from the block table's capacity, which the host knows, so a captured
// graph stays valid for any lengths; split k takes keys [k·c, (k+1)·c) ∩ [0, p], c = ⌈(p+1)/S⌉
// rounded up to a tile). Each writes its unnormalised acc, m and l to the scratch workspace, and
// paged_attention_combine_kernel merges the splits in split order: M = max_k m_k, L = Σ_k l_k e^{m_k−M},
// o = Σ_k acc_k e^{m_k−M} / L (an empty split has m = −∞, l = 0 and adds nothing), then the
// differential subtraction.
// f32 throughout; sums run in a fixed order per block (and per split), so results are reproducible run to run.
#include <algorithm>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kPagedThreads = 128;
constexpr int kPagedWarps = kPagedThreads / kWarp;
constexpr int kTile = 16;              // key rows per tile
constexpr int kHeadsPerBlock = 8;      // component heads per block (at most)
constexpr int64_t kSplitMinKeys = 32;  // keys per split at least (two tiles): a split must amortise its partial's write
constexpr int64_t kMaxSplits = 64;
constexpr int kCombineThreads = 128;
static_assert(kHeadsPerBlock % 2 == 0, "a differential pair of components must stay in one block");
static_assert(kHeadsPerBlock <= kPagedThreads, "one thread per head runs the online-softmax update");

struct PagedShape {
  int64_t rows, batch, heads, r_kv, row_w, q_rope_width, q_rope_offset, n_blocks, block_size, max_blocks;
  int comps;
  int64_t splits;  // key splits per (row, head chunk): 1 writes `out`, more write partials (the file comment)
};

// The partial of (row n, component head j, split k) in the workspace: acc [r_kv], then m and l.
__host__ __device__ inline int64_t partial_offset(const PagedShape& sh, int64_t n, int64_t j, int64_t k) {
  return ((n * sh.heads + j) * sh.splits + k) * (sh.r_kv + 2);
}

// Floats of shared memory for a block of hb heads (the layout of paged_attention_kernel).
size_t paged_smem_floats(int64_t hb, int64_t row_w, int64_t r_kv) {
  return static_cast<size_t>(hb * row_w + kTile * row_w + hb * kTile + hb * r_kv + 3 * hb);
}

// Largest b with q_offsets[b] <= n (q_offsets has batch + 1 entries, non-decreasing).
__device__ int64_t find_sequence(const int32_t* q_offsets, int64_t batch, int64_t n) {
  int64_t lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (q_offsets[mid] <= n) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kPagedThreads)
    paged_attention_kernel(float* out, const float* q_lat, const float* q_rope, const float* cache, const float* lambda,
                           const int32_t* block_table, const int32_t* kv_lens, const int32_t* q_offsets, PagedShape sh,
                           float scale, float* partials, DeviceIssue* issue) {
  extern __shared__ float smem[];
  __shared__ int64_t row_base[kTile];  // pool offset (in floats) of each key row of the tile
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n = blockIdx.x;
  const int64_t h0 = int64_t{blockIdx.y} * kHeadsPerBlock;
  const int64_t hb = min(int64_t{kHeadsPerBlock}, sh.heads - h0);
  const int64_t row_w = sh.row_w, r_kv = sh.r_kv;
  // In-block indices in 32 bits: the loops below divide by row_w and r_kv per element, and a 64-bit division is
  // many times the cost of a 32-bit one (these sizes are a few hundred; the host checks the shared memory fits).
  const int row_wi = static_cast<int>(row_w), r_kvi = static_cast<int>(r_kv), hbi = static_cast<int>(hb);
  float* q_s = smem;                 // [hb][row_w]: [q̃_j ; q^R_j]
  float* k_s = q_s + hb * row_w;     // [kTile][row_w]
  float* p_s = k_s + kTile * row_w;  // [hb][kTile]: scores, then probabilities
  float* acc = p_s + hb * kTile;     // [hb][r_kv]
  float* m_s = acc + hb * r_kv;      // [hb] running max
  float* l_s = m_s + hb;             // [hb] running normaliser
  float* corr_s = l_s + hb;          // [hb] rescale of this tile

  // The sequence of row n and its checks (every thread reads the same values: uniform branches).
  if (q_offsets[0] != 0 || q_offsets[sh.batch] != sh.rows) {
    if (threadIdx.x == 0)
      report_bad_index(issue, IssueSite::kPagedAttentionQOffsets, q_offsets[0] != 0 ? 0 : sh.batch,
                       q_offsets[0] != 0 ? q_offsets[0] : q_offsets[sh.batch], sh.rows);
    return;
  }
  const int64_t b = find_sequence(q_offsets, sh.batch, n);
  const int64_t q0 = q_offsets[b], n_b = int64_t{q_offsets[b + 1]} - q0;
  if (n < q0 || n_b <= 0 || n >= q0 + n_b) {  // offsets that decrease somewhere
    if (threadIdx.x == 0) report_bad_index(issue, IssueSite::kPagedAttentionQOffsets, b + 1, q_offsets[b + 1], sh.rows);
    return;
  }
  const int64_t kv_len = kv_lens[b], capacity = sh.max_blocks * sh.block_size;
  if (kv_len < n_b || kv_len > capacity) {
    if (threadIdx.x == 0) report_bad_index(issue, IssueSite::kPagedAttentionKvLens, b, kv_lens[b], capacity + 1);
    return;
  }
  const int64_t last = kv_len - n_b + (n - q0);  // absolute position p: keys s = 0 … p
  const int32_t* blocks = block_table + b * sh.max_blocks;

  for (int idx = threadIdx.x; idx < hbi * row_wi; idx += blockDim.x) {
    const int h = idx / row_wi, i = idx - h * row_wi;
    const int64_t j = h0 + h;
    q_s[idx] = i < r_kv ? q_lat[(j * sh.rows + n) * r_kv + i]
                        : q_rope[(n * sh.heads + j) * sh.q_rope_width + sh.q_rope_offset + (i - r_kv)];
  }
  for (int idx = threadIdx.x; idx < hbi * r_kvi; idx += blockDim.x) acc[idx] = 0.0f;
  if (threadIdx.x < hb) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.0f;
  }

  // This block's keys [s_begin, s_end) of 0 … last (all of them without splits).
  int64_t s_begin = 0, s_end = last + 1;
  if (sh.splits > 1) {
    const int64_t per = ((last + 1 + sh.splits - 1) / sh.splits + kTile - 1) / kTile * kTile;
    s_begin = min(int64_t{blockIdx.z} * per, last + 1);
    s_end = min(s_begin + per, last + 1);
  }
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kTile) {
    const int ns = static_cast<int>(min(int64_t{kTile}, s_end - s0));
    if (static_cast<int>(threadIdx.x) < ns) {
      const int64_t s = s0 + threadIdx.x, i = s / sh.block_size;
      const int32_t blk = blocks[i];
      // A bad block id reads block 0 instead (in bounds) and is reported: the result is then wrong
      // but the error surfaces at the next synchronize.
      const bool ok = index_ok(issue, IssueSite::kPagedAttentionBlockTable, b * sh.max_blocks + i, blk, sh.n_blocks);
      row_base[threadIdx.x] = ((ok ? blk : 0) * sh.block_size + s % sh.block_size) * row_w;
    }
    __syncthreads();  // row_base ready; the previous tile's k_s and p_s are no longer read
    for (int idx = threadIdx.x; idx < ns * row_wi; idx += blockDim.x) {
      const int s = idx / row_wi, i = idx - s * row_wi;
      k_s[idx] = cache[row_base[s] + i];
    }
    __syncthreads();
    // Scores z_{h,s} = scale · [q̃_j ; q^R_j]·[ĉ_s ; k^R_s], one warp per (head, key) pair.
    for (int pair = warp; pair < hbi * ns; pair += kPagedWarps) {
      const int h = pair / ns, s = pair - h * ns;
      float dot = 0.0f;
      for (int i = lane; i < row_wi; i += kWarp) dot += q_s[h * row_wi + i] * k_s[s * row_wi + i];
      dot = warp_sum(dot);
      if (lane == 0) p_s[h * kTile + s] = scale * dot;
    }
    __syncthreads();
    // Online softmax per head: m' = max(m, max_s z), p = exp(z − m'), l = l·exp(m − m') + Σ p.
    if (static_cast<int>(threadIdx.x) < hbi) {
      const int h = threadIdx.x;
      float m_new = m_s[h];
      for (int s = 0; s < ns; ++s) m_new = fmaxf(m_new, p_s[h * kTile + s]);
      const float corr = expf(m_s[h] - m_new);  // 0 on the first tile (m = −inf, m' finite)
      float sum = 0.0f;
      for (int s = 0; s < ns; ++s) {
        const float e = expf(p_s[h * kTile + s] - m_new);
        p_s[h * kTile + s] = e;
        sum += e;
      }
      l_s[h] = l_s[h] * corr + sum;
      m_s[h] = m_new;
      corr_s[h] = corr;
    }
    __syncthreads();
    // acc_h = acc_h · corr_h + Σ_s p_{h,s} ĉ_s (each thread owns its (head, column) entries).
    for (int idx = threadIdx.x; idx < hbi * r_kvi; idx += blockDim.x) {
      const int h = idx / r_kvi, i = idx - h * r_kvi;
      float a = acc[idx] * corr_s[h];
      for (int s = 0; s < ns; ++s) a += p_s[h * kTile + s] * k_s[s * row_wi + i];
      acc[idx] = a;
    }
    // The next tile's first barrier orders these reads of k_s and p_s before they are overwritten.
  }
  __syncthreads();
  if (sh.splits > 1) {  // the unnormalised partial; paged_attention_combine_kernel finishes
    for (int idx = threadIdx.x; idx < hbi * (r_kvi + 2); idx += blockDim.x) {
      const int h = idx / (r_kvi + 2), i = idx - h * (r_kvi + 2);
      partials[partial_offset(sh, n, h0 + h, blockIdx.z) + i] = i < r_kv    ? acc[h * r_kv + i]
                                                                : i == r_kv ? m_s[h]
                                                                            : l_s[h];
    }
    return;
  }
  const int64_t g0 = h0 / sh.comps, gb = hb / sh.comps;
  const float minus_lambda = sh.comps == 2 ? -lambda[0] : 0.0f;
  for (int idx = threadIdx.x; idx < static_cast<int>(gb) * r_kvi; idx += blockDim.x) {
    const int g = idx / r_kvi, i = idx - g * r_kvi;
    float v = acc[(sh.comps * g) * r_kv + i] / l_s[sh.comps * g];
    if (sh.comps == 2) v += minus_lambda * (acc[(2 * g + 1) * r_kv + i] / l_s[2 * g + 1]);
    out[((g0 + g) * sh.rows + n) * r_kv + i] = v;
  }
}

// One block per (row n, output group g): merges the splits of its comps component heads (the file
// comment's M, L and Σ), then out[g, n] = o_2g − λ·o_2g+1 or o_g. First the splits' m_k and l_k are read into
// shared memory in parallel and one thread per component turns them into weights w_k = e^{m_k−M} / L (in split
// order); then every thread sums its columns Σ_k w_k·acc_k, each split's row read coalesced and independently of the
// others (a thread that walked every split's scalars itself would make the kernel a chain of dependent global
// loads, ~0.15 ms per layer at batch 1 on an H100). Empty splits (l = 0) have w = 0 and are skipped. A row whose
// attention kernel returned early (a reported bad index) leaves its partials unwritten: its output is then garbage, and
// the error surfaces at the next synchronize, as without splits.
__global__ void __launch_bounds__(kCombineThreads)
    paged_attention_combine_kernel(float* out, const float* partials, const float* lambda, PagedShape sh) {
  __shared__ float m_s[2][kMaxSplits], w_s[2][kMaxSplits];
  const int64_t n = blockIdx.x, g = blockIdx.y, r_kv = sh.r_kv;
  const int splits = static_cast<int>(sh.splits);
  for (int c = 0; c < sh.comps; ++c)
    for (int k = threadIdx.x; k < splits; k += blockDim.x) {
      const float* p = partials + partial_offset(sh, n, g * sh.comps + c, k);
      m_s[c][k] = p[r_kv];
      w_s[c][k] = p[r_kv + 1];  // l_k until the weights replace it
    }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < sh.comps) {
    const int c = threadIdx.x;
    float m_max = -INFINITY;
    for (int k = 0; k < splits; ++k) m_max = fmaxf(m_max, m_s[c][k]);
    float l = 0.0f;
    for (int k = 0; k < splits; ++k) {
      const float e = w_s[c][k] > 0.0f ? expf(m_s[c][k] - m_max) : 0.0f;  // an empty split (l = 0) adds nothing
      l += w_s[c][k] * e;
      m_s[c][k] = e;
    }
    const float coef = c == 0 ? 1.0f : -lambda[0];  // the differential subtraction folded into the weights
    for (int k = 0; k < splits; ++k) w_s[c][k] = coef * (m_s[c][k] / l);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < r_kv; i += blockDim.x) {
    float v = 0.0f;
    for (int c = 0; c < sh.comps; ++c) {
      const float* p = partials + partial_offset(sh, n, g * sh.comps + c, 0) + i;
      for (int k = 0; k < splits; ++k)
        if (w_s[c][k] != 0.0f) v += w_s[c][k] * p[k * (r_kv + 2)];
    }
    out[(g * sh.rows + n) * r_kv + i] = v;
  }
}

__global__ void paged_cache_write_kernel(float* cache, const float* rows, const int32_t* slots, int64_t n_rows,
                                         int64_t width, int64_t capacity, DeviceIssue* issue) {
  for (int64_t n = blockIdx.x; n < n_rows; n += gridDim.x) {
    const int32_t slot = slots[n];
    if (!index_ok(issue, IssueSite::kPagedCacheWriteSlots, n, slot, capacity)) continue;  // uniform per block
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) cache[slot * width + i] = rows[n * width + i];
  }
}

}  // namespace

void CudaBackend::paged_cache_write(Context ctx, const PagedCacheWriteArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "paged_cache_write");
  constexpr std::string_view kOp = "paged_cache_write";
  const PagedCacheWriteDims d = validate_paged_cache_write(a, Device::kCUDA);
  require_f32(a.cache, kOp);
  if (d.rows == 0) return;
  paged_cache_write_kernel<<<grid_for(d.rows, 1), kThreads, 0, stream(ctx)>>>(
      f32(a.cache), f32(a.rows), i32(a.slots), d.rows, d.width, d.n_blocks * d.block_size, issue());
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::paged_latent_attention(Context ctx, const PagedLatentAttentionArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "paged_latent_attention");
  constexpr std::string_view kOp = "paged_latent_attention";
  const PagedLatentDims d = validate_paged_latent_attention(a, Device::kCUDA);
  require_f32(a.cache, kOp);
  if (d.rows == 0) return;
  DIFFMOE_CHECK(d.batch >= 1, "[{}] {} query rows but no sequence (block_table has 0 rows)", kOp, d.rows);
  const int64_t hb = std::min<int64_t>(kHeadsPerBlock, d.heads);
  const size_t bytes = paged_smem_floats(hb, d.row(), d.r_kv) * sizeof(float);
  DIFFMOE_CHECK(bytes <= max_shared_bytes(),
                "[{}] r_kv = {}, d_rope = {} need {} bytes of shared memory per block, the "
                "device allows {}",
                kOp, d.r_kv, d.d_rope, bytes, max_shared_bytes());
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(paged_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
  const int64_t chunks = (d.heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
  DIFFMOE_CHECK(d.rows <= INT32_MAX && chunks <= 65535, "[{}] grid too large: N = {}, head chunks = {}", kOp, d.rows,
                chunks);
  // Key splits (the file comment) where rows × head chunks blocks leave SMs idle: about two blocks per SM,
  // at least kSplitMinKeys keys of the block table's capacity per split.
  const int64_t capacity = d.max_blocks * d.block_size, base = d.rows * chunks;
  int64_t splits = 1;
  if (base < multiprocessors())
    splits = std::clamp<int64_t>(std::min((2 * multiprocessors() + base - 1) / base, capacity / kSplitMinKeys), 1,
                                 kMaxSplits);
  const PagedShape sh{.rows = d.rows,
                      .batch = d.batch,
                      .heads = d.heads,
                      .r_kv = d.r_kv,
                      .row_w = d.row(),
                      .q_rope_width = d.q_rope_width,
                      .q_rope_offset = a.q_rope_offset,
                      .n_blocks = d.n_blocks,
                      .block_size = d.block_size,
                      .max_blocks = d.max_blocks,
                      .comps = static_cast<int>(d.comps),
                      .splits = splits};
  float* partials = nullptr;
  if (splits > 1)
    partials =
        static_cast<float*>(scratch(static_cast<size_t>(d.rows * d.heads * splits * (d.r_kv + 2)) * sizeof(float)));
  const float* lambda = a.differential ? f32(a.lambda) : nullptr;
  const dim3 grid(static_cast<unsigned>(d.rows), static_cast<unsigned>(chunks), static_cast<unsigned>(splits));
  paged_attention_kernel<<<grid, kPagedThreads, bytes, stream(ctx)>>>(
      f32(a.out), f32(a.q_lat), f32(a.q_rope), f32(a.cache), lambda, i32(a.block_table), i32(a.kv_lens),
      i32(a.q_offsets), sh, static_cast<float>(a.scale), partials, issue());
  CUDA_CHECK_LAUNCH(kOp);
  if (splits > 1) {
    const dim3 groups(static_cast<unsigned>(d.rows), static_cast<unsigned>(d.heads / d.comps));
    paged_attention_combine_kernel<<<groups, kCombineThreads, 0, stream(ctx)>>>(f32(a.out), partials, lambda, sh);
    CUDA_CHECK_LAUNCH("paged_latent_attention (combine)");
  }
}

}  // namespace diffmoe
