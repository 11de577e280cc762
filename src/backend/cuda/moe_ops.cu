// MoE routing and token dispatch on the GPU (docs/model.md §5; docs/derivations.md §4.2 forward, §4.4 backward of the
// weights, §4.5 bias update, §4.6 aux loss), checked against the CPU reference.
//
// Design:
// - Router forward and backward: one warp per token. Selection is the CPU's rule exactly: k passes
//   of an arg-max over the candidates, ties to the lower index, so the same scores give the same
//   experts. A warp keeps its token's scores, selection scores and candidate states in shared
//   memory (E ≤ kMaxExperts = 256); group scores are computed one group per lane by the CPU's
//   sequential top-2 scan. Scores are computed with the CPU's arithmetic (sigmoid in f32, softmax
//   with a double denominator); sums over the K picks run on one lane in k order, like the CPU.
// - counts: integer atomicAdd (exact; the order does not matter for integers).
// - Aux loss: a grid of (sequence, chunk of 64 tokens) blocks. The plain top-K picks are counted
//   with global integer atomics (exact), then the per-token sums run one warp per token in double,
//   combined per chunk in a fixed order; the forward adds the chunk values in order on one thread.
//   Deterministic.
// - Permute: a stable sort of (expert, assignment) pairs (radix_sort.h) gives src_row and slot_pos
//   directly, stable in (token, slot) order; offsets[e] = the number of assignments to experts < e,
//   by binary search in the sorted experts. No atomics.
// - Gather, gather backward, combine and its backward: one warp per permuted row, per token or per
//   (token, slot), lanes over columns in float4 pieces where sizes and alignment allow
//   (elementwise.cuh); every sum over the K slots runs in k order per token in double
//   (deterministic, and the CPU's value rounded once). In the bf16 GEMM mode the rows they read
//   (x_norm's copy, y_perm, dx_perm) may be bf16, widened exactly (docs/model.md §7).
// - Index contents (topk_idx, src_row, slot_pos) are checked where they are used (device_issue.h).
#include <cuda_bf16.h>

#include <climits>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/radix_sort.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kMaxExperts = 256;  // router: experts per token held in one warp's shared memory
constexpr int kRouterWarps = 4;   // tokens per router block
constexpr int kAuxThreads = 256;  // aux loss: threads per sequence block
enum : uint8_t { kExcluded = 0, kCandidate = 1, kChosen = 2 };

// Index of the largest score[i] with state[i] == kCandidate, ties to the lower index; −1 if none.
// Called by a whole warp; every lane gets the answer.
__device__ int warp_argmax(const float* score, const uint8_t* state, int n) {
  const int lane = threadIdx.x % kWarp;
  float best = 0.0f;
  int best_i = -1;
  for (int i = lane; i < n; i += kWarp) {  // increasing i: a strict '>' keeps the lower index
    if (state[i] != kCandidate) continue;
    if (best_i < 0 || score[i] > best) {
      best = score[i];
      best_i = i;
    }
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, best, o);
    const int other_i = __shfl_xor_sync(kFullMask, best_i, o);
    if (other_i >= 0 && (best_i < 0 || other > best || (other == best && other_i < best_i))) {
      best = other;
      best_i = other_i;
    }
  }
  return best_i;
}

// Group score (docs/derivations.md §4.2): the sum of the two largest selection scores of the group when the
// balancing bias is on, the largest one when it is off. Sequential, exactly the CPU's scan.
__device__ float group_score(const float* sel, int group_size, bool top2_sum) {
  int first = 0;
  for (int j = 1; j < group_size; ++j)
    if (sel[j] > sel[first]) first = j;
  if (!top2_sum) return sel[first];
  int second = -1;
  for (int j = 0; j < group_size; ++j)
    if (j != first && (second < 0 || sel[j] > sel[second])) second = j;
  return sel[first] + sel[second];
}

struct RouterConsts {
  int64_t n_tokens;
  int n_experts, n_groups, n_limited, top_k;
  bool sigmoid, use_bias;
  double route_scale;
};

struct RouterWarpSmem {
  float s[kMaxExperts];
  float sel[kMaxExperts];
  float group_sel[kMaxExperts];
  uint8_t state[kMaxExperts];
  uint8_t group_state[kMaxExperts];
  int idx[kMaxExperts];
};

// One warp per token: scores, group limit, top-k, weights, counts (docs/model.md §5, docs/derivations.md §4.2).
__global__ void __launch_bounds__(kRouterWarps* kWarp)
    router_fwd_kernel(float* scores, int32_t* topk_idx, float* topk_w, int32_t* counts, const float* logits,
                      const float* bias, RouterConsts c) {
  __shared__ RouterWarpSmem smem_all[kRouterWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  RouterWarpSmem& w = smem_all[warp];
  const int E = c.n_experts;
  for (int64_t n = blockIdx.x * int64_t{kRouterWarps} + warp; n < c.n_tokens; n += int64_t{gridDim.x} * kRouterWarps) {
    const float* z = logits + n * E;
    float* s_out = scores + n * E;
    // s = sigmoid(z) in f32, or softmax(z) with a double denominator, as the CPU computes them.
    if (c.sigmoid) {
      for (int e = lane; e < E; e += kWarp) w.s[e] = 1.0f / (1.0f + expf(-z[e]));
    } else {
      float z_max = -INFINITY;
      for (int e = lane; e < E; e += kWarp) z_max = fmaxf(z_max, z[e]);
      z_max = warp_max(z_max);
      double denom = 0.0;
      for (int e = lane; e < E; e += kWarp) denom += exp(static_cast<double>(z[e] - z_max));
      denom = warp_sum(denom);
      for (int e = lane; e < E; e += kWarp) w.s[e] = static_cast<float>(exp(static_cast<double>(z[e] - z_max)) / denom);
    }
    // Selection scores s + b: the bias only ever takes part in the selection.
    for (int e = lane; e < E; e += kWarp) {
      s_out[e] = w.s[e];
      w.sel[e] = c.use_bias ? w.s[e] + bias[e] : w.s[e];
    }
    __syncwarp();
    // Group limit: keep the n_limited groups with the largest group score.
    if (c.n_groups > 1) {
      const int group_size = E / c.n_groups;
      for (int g = lane; g < c.n_groups; g += kWarp) {
        w.group_sel[g] = group_score(w.sel + g * group_size, group_size, c.use_bias);
        w.group_state[g] = kCandidate;
      }
      __syncwarp();
      for (int j = 0; j < c.n_limited; ++j) {
        const int best = warp_argmax(w.group_sel, w.group_state, c.n_groups);
        if (lane == 0 && best >= 0) w.group_state[best] = kChosen;
        __syncwarp();
      }
      for (int e = lane; e < E; e += kWarp)
        w.state[e] = w.group_state[e / group_size] == kChosen ? kCandidate : kExcluded;
    } else {
      for (int e = lane; e < E; e += kWarp) w.state[e] = kCandidate;
    }
    __syncwarp();
    for (int k = 0; k < c.top_k; ++k) {
      const int best = warp_argmax(w.sel, w.state, E);  // validation guarantees enough candidates
      if (lane == 0) {
        w.state[best] = kChosen;
        w.idx[k] = best;
        topk_idx[n * c.top_k + k] = best;
        atomicAdd(counts + best, 1);
      }
      __syncwarp();
    }
    // w = s[idx] (unbiased); sigmoid: w /= Σw (summed in k order); w *= route_scale.
    if (lane == 0) {
      double denom = 1.0;
      if (c.sigmoid) {
        denom = 0.0;
        for (int k = 0; k < c.top_k; ++k) denom += w.s[w.idx[k]];
      }
      for (int k = 0; k < c.top_k; ++k)
        topk_w[n * c.top_k + k] = static_cast<float>(c.route_scale * (w.s[w.idx[k]] / denom));
    }
    __syncwarp();  // w.* is reused by the warp's next token
  }
}

// Backward of the routing weights only (docs/derivations.md §4.4), one warp per token. The per-token scalars run
// on lane 0 in k order (K is small), the E-wide row on all lanes.
__global__ void router_bwd_kernel(float* dlogits, const float* dtopk_w, const float* scores, const int32_t* topk_idx,
                                  RouterConsts c, DeviceIssue* issue) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n_warps = int64_t{gridDim.x} * blockDim.x / kWarp;
  const int E = c.n_experts, K = c.top_k;
  const double scale = c.route_scale;
  for (int64_t n = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp; n < c.n_tokens; n += n_warps) {
    const float* s = scores + n * E;
    const float* dw = dtopk_w + n * K;
    const int32_t* idx = topk_idx + n * K;
    float* dz = dlogits + n * E;
    bool ok = true;
    for (int k = lane; k < K; k += kWarp)
      ok = index_ok(issue, IssueSite::kRouterBwdTopkIdx, n * K + k, idx[k], E) && ok;
    if (!__all_sync(kFullMask, ok)) continue;
    // sigmoid: S = Σ s_k, ŵ_k = s_k/S, ds_k = (route_scale·dw_k − Σ_j ŵ_j route_scale·dw_j)/S on idx,
    //          dz = ds ⊙ s ⊙ (1 − s);   softmax: dz = p ⊙ (dp − Σ_j p_j dp_j), dp_k = route_scale·dw_k.
    double sum_s = 0.0, dot = 0.0;
    if (lane == 0) {
      if (c.sigmoid) {
        for (int k = 0; k < K; ++k) sum_s += s[idx[k]];
        for (int k = 0; k < K; ++k) dot += (s[idx[k]] / sum_s) * (scale * dw[k]);
      } else {
        for (int k = 0; k < K; ++k) dot += s[idx[k]] * (scale * dw[k]);
      }
    }
    sum_s = __shfl_sync(kFullMask, sum_s, 0);
    dot = __shfl_sync(kFullMask, dot, 0);
    for (int e = lane; e < E; e += kWarp)
      dz[e] = c.sigmoid ? 0.0f : static_cast<float>(-static_cast<double>(s[e]) * dot);
    __syncwarp();
    if (lane == 0) {
      for (int k = 0; k < K; ++k) {
        const double s_k = s[idx[k]];
        dz[idx[k]] = c.sigmoid ? static_cast<float>((scale * dw[k] - dot) / sum_s * s_k * (1 - s_k))
                               : static_cast<float>(s_k * (scale * dw[k] - dot));
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- sequence-wise aux loss (§4.6)

struct AuxConsts {
  int64_t seq_len, n_seqs;
  int n_experts, top_k;
  bool sigmoid;
  double alpha, dloss;
};

// The aux loss runs on a grid of (sequence, token chunk) blocks so that a few long sequences still
// fill the GPU (one block per sequence took 3-4 ms per layer at the bench preset's 8 × 2048).
// Phase 1 counts each sequence's plain top-K picks (unbiased scores, no groups) with integer
// atomics into picks [n_seqs, E] (exact in any order); phase 2 reads the counts.
constexpr int kAuxChunk = 64;  // tokens per block: 8 warps × 8 tokens

// Grid: blockIdx.x = sequence b, blockIdx.y = chunk of kAuxChunk tokens.
__device__ __forceinline__ int64_t aux_chunk_begin() { return int64_t{blockIdx.y} * kAuxChunk; }
__device__ __forceinline__ int64_t aux_chunk_end(int64_t seq_len) {
  const int64_t end = aux_chunk_begin() + kAuxChunk;
  return end < seq_len ? end : seq_len;
}

// picks[b, i] += number of tokens of this chunk of sequence b whose plain top-K holds expert i.
// Shared memory: per-warp candidate states [warps][E].
__global__ void __launch_bounds__(kAuxThreads) aux_count_kernel(int* picks, const float* scores, AuxConsts c) {
  extern __shared__ __align__(16) unsigned char aux_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const int E = c.n_experts;
  const int64_t b = blockIdx.x, t_end = aux_chunk_end(c.seq_len);
  uint8_t* state = aux_smem + warp * E;
  int* cnt = picks + b * E;
  for (int64_t t = aux_chunk_begin() + warp; t < t_end; t += n_warps) {
    const float* s_t = scores + (b * c.seq_len + t) * E;
    for (int i = lane; i < E; i += kWarp) state[i] = kCandidate;
    __syncwarp();
    for (int k = 0; k < c.top_k; ++k) {
      const int best = warp_argmax(s_t, state, E);
      if (lane == 0) {
        state[best] = kChosen;
        atomicAdd(cnt + best, 1);  // integer: exact in any order
      }
      __syncwarp();
    }
  }
}

// Σ_i s_i / norm with norm = Σ_i s_i (sigmoid) or 1 (softmax scores already sum to one).
__device__ double aux_norm(const float* s_t, const AuxConsts& c) {
  if (!c.sigmoid) return 1.0;
  double sum = 0.0;
  for (int i = threadIdx.x % kWarp; i < c.n_experts; i += kWarp) sum += s_t[i];
  return warp_sum(sum);
}

// partial[b, chunk] = Σ_{t in chunk} Σ_i f_i s'_{i,t},  f_i = E/(K·T) · picks_i  (fixed order:
// each warp its tokens in t order, then the warps in order).
__global__ void __launch_bounds__(kAuxThreads)
    aux_loss_fwd_kernel(double* partial, const float* scores, const int* picks, AuxConsts c) {
  __shared__ double warp_part[kAuxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const int E = c.n_experts;
  const int64_t b = blockIdx.x, t_end = aux_chunk_end(c.seq_len);
  const int* cnt = picks + b * E;
  const double f_scale = static_cast<double>(E) / static_cast<double>(c.top_k * c.seq_len);
  double acc = 0.0;
  for (int64_t t = aux_chunk_begin() + warp; t < t_end; t += n_warps) {
    const float* s_t = scores + (b * c.seq_len + t) * E;
    const double norm = aux_norm(s_t, c);
    double part = 0.0;
    for (int i = lane; i < E; i += kWarp) part += (cnt[i] * f_scale) * (s_t[i] / norm);
    acc += warp_sum(part);
  }
  if (lane == 0) warp_part[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int w = 0; w < n_warps; ++w) sum += warp_part[w];
    partial[b * gridDim.y + blockIdx.y] = sum;
  }
}

// loss[0] += mean_b L_b,  L_b = α/T · Σ_chunk partial[b, chunk]  (one thread, in order).
__global__ void aux_loss_total_kernel(float* loss, const double* partial, int64_t n_chunks, AuxConsts c) {
  double total = 0.0;
  for (int64_t b = 0; b < c.n_seqs; ++b) {
    double l_b = 0.0;
    for (int64_t j = 0; j < n_chunks; ++j) l_b += partial[b * n_chunks + j];
    total += c.alpha * l_b / static_cast<double>(c.seq_len);
  }
  loss[0] = static_cast<float>(loss[0] + total / static_cast<double>(c.n_seqs));
}

// dlogits += dloss · ∂(mean_b L_b)/∂z, with g_i = dloss·α·f_i/(T·B) (the same for every t):
//   sigmoid: dz_k = (g_k − Σ_i s'_i g_i) / Σ_j s_j · s_k (1 − s_k);  softmax: dz_k = s_k (g_k − Σ_i s_i g_i)
// Shared memory: g [E] double.
__global__ void __launch_bounds__(kAuxThreads)
    aux_loss_bwd_kernel(float* dlogits, const float* scores, const int* picks, AuxConsts c) {
  extern __shared__ __align__(16) unsigned char aux_smem[];
  const int E = c.n_experts;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  auto* g = reinterpret_cast<double*>(aux_smem);
  const int64_t b = blockIdx.x, t_end = aux_chunk_end(c.seq_len);
  const int* cnt = picks + b * E;
  const double f_scale = static_cast<double>(E) / static_cast<double>(c.top_k * c.seq_len);
  for (int i = threadIdx.x; i < E; i += blockDim.x)
    g[i] = c.dloss * c.alpha * (cnt[i] * f_scale) / static_cast<double>(c.seq_len * c.n_seqs);
  __syncthreads();
  for (int64_t t = aux_chunk_begin() + warp; t < t_end; t += n_warps) {
    const float* s = scores + (b * c.seq_len + t) * E;
    float* dz = dlogits + (b * c.seq_len + t) * E;
    const double norm = aux_norm(s, c);
    double s_dot_g = 0.0;
    for (int i = lane; i < E; i += kWarp) s_dot_g += (s[i] / norm) * g[i];
    s_dot_g = warp_sum(s_dot_g);
    for (int k = lane; k < E; k += kWarp) {
      const double s_k = s[k];
      const double dz_k = c.sigmoid ? (g[k] - s_dot_g) / norm * s_k * (1 - s_k) : s_k * (g[k] - s_dot_g);
      dz[k] = static_cast<float>(dz[k] + dz_k);
    }
  }
}

// ---------------------------------------------------------------- dispatch plan and data movement

// vals[i] = i; keys[i] = the expert, or n_experts for an unused slot (-1), so that unused slots sort
// after every expert's rows; every expert index checked (the sort itself tolerates bad keys).
__global__ void permute_prepare_kernel(int32_t* vals, int32_t* keys, const int32_t* topk_idx, int64_t n_rows,
                                       int64_t n_experts, DeviceIssue* issue) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n_rows; i += int64_t{gridDim.x} * blockDim.x) {
    vals[i] = static_cast<int32_t>(i);
    const int32_t e = topk_idx[i];
    keys[i] = e == -1 ? static_cast<int32_t>(n_experts) : e;
    index_ok(issue, IssueSite::kPermuteTopkIdx, i, e, n_experts, /*allow_ignore=*/true);
  }
}

// Permuted row r holds assignment i = sorted_assign[r] = n·K + k:  src_row[r] = n, slot_pos[i] = r;
// the unused slots (sorted last, key n_experts) get slot_pos -1 and no row.
__global__ void permute_scatter_kernel(int32_t* src_row, int32_t* slot_pos, const int32_t* sorted_assign,
                                       const int32_t* sorted_key, int64_t n_rows, int64_t top_k, int64_t n_experts) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < n_rows; r += int64_t{gridDim.x} * blockDim.x) {
    const int32_t i = sorted_assign[r];
    if (sorted_key[r] >= n_experts) {
      slot_pos[i] = -1;
      continue;
    }
    src_row[r] = static_cast<int32_t>(i / top_k);
    slot_pos[i] = static_cast<int32_t>(r);
  }
}

// offsets[e] = #{sorted experts < e} for e = 0 … E (binary search).
__global__ void permute_offsets_kernel(int32_t* offsets, const int32_t* sorted_expert, int64_t n_rows,
                                       int64_t n_experts) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e <= n_experts;
       e += int64_t{gridDim.x} * blockDim.x) {
    int64_t lo = 0, hi = n_rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted_expert[mid] < e) lo = mid + 1;
      else hi = mid;
    }
    offsets[e] = static_cast<int32_t>(lo);
  }
}

// The four data-movement kernels run one warp per row (a permuted row, or a token with its K slots),
// lanes over columns: the row's index is read and checked once, not once per element, and the
// column loop has no division. Vec4 = columns in float4 pieces (dim % 4 == 0 and every tensor's
// rows aligned, elementwise.cuh), kUnroll pieces in flight per lane; otherwise one column per lane
// access. Sums over the K slots run in k order in double, as on the CPU: a product or sum of two
// floats is exact in double, so each output is the CPU's value rounded once, bitwise, on either path.
constexpr int kUnroll = 4;        // float4 pieces per lane in flight (gather)
constexpr int kUnrollReduce = 2;  // the same for combine_bwd (two rows read per piece)

__device__ __forceinline__ int64_t warp_index() { return (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp; }
__device__ __forceinline__ int64_t warp_count() { return int64_t{gridDim.x} * blockDim.x / kWarp; }

// x_perm[r] = x[src_row[r]]
// Out: float, or bf16 when the rows only feed bf16 expert GEMMs (rounded to nearest even here).
// In: float, or bf16 (the FFN's bf16 x_norm copy: then the rows are copied exactly).
template <class Out, class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(Out* __restrict__ x_perm, const In* __restrict__ x, const int32_t* __restrict__ src_row,
                  int64_t n_rows, int64_t n_tokens, int64_t dim, DeviceIssue* issue) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = warp_index(); r < n_rows; r += warp_count()) {
    const int32_t src = src_row[r];
    if (!index_ok(issue, IssueSite::kGatherSrcRow, r, src, n_tokens)) continue;  // uniform over the warp
    const In* in = x + src * dim;
    Out* out = x_perm + r * dim;
    if constexpr (kVec4) {
      for (int64_t c0 = lane * kVec; c0 < dim; c0 += kWarp * kVec * kUnroll) {
        float4 v[kUnroll];  // all loads first: kUnroll requests in flight per lane
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t c = c0 + u * kWarp * kVec;
          if (c < dim) v[u] = load4(in + c);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t c = c0 + u * kWarp * kVec;
          if (c < dim) store4(out + c, v[u]);
        }
      }
    } else {
      for (int64_t c = lane; c < dim; c += kWarp) store1(out + c, load1(in + c));
    }
  }
}

// y[n] += Σ_k w_k · rows[slot_pos[n,k]] (k order, double): the body of gather_bwd (kWeighted =
// false: every w_k = 1) and of combine_fwd, one warp per token. The token's slot positions are
// checked once (lanes over k); a bad one is reported and then skipped. Slots go in groups of
// kSlotGroup: their positions and weights (one cached word for the whole warp, re-read per column
// piece), then all their rows' loads, then the sums in k order, so a group's loads are in flight
// together. A skipped slot adds +0.0, which leaves the sum unchanged (it is never −0.0).
constexpr int kSlotGroup = 4;

template <bool kVec4, bool kWeighted, class In>  // In: the rows' type, float or bf16 (widened exactly)
__device__ __forceinline__ void add_weighted_slots(float* __restrict__ y, const In* __restrict__ rows,
                                                   const float* __restrict__ topk_w,
                                                   const int32_t* __restrict__ slot_pos, int64_t n_tokens,
                                                   int64_t top_k, int64_t dim, int64_t n_rows, IssueSite site,
                                                   DeviceIssue* issue) {
  constexpr int kStep = kVec4 ? kVec : 1;  // columns per lane access
  const int lane = threadIdx.x % kWarp;
  for (int64_t n = warp_index(); n < n_tokens; n += warp_count()) {
    const int32_t* slots = slot_pos + n * top_k;
    const float* w = topk_w + n * top_k;  // read only when kWeighted
    for (int64_t k = lane; k < top_k; k += kWarp)
      index_ok(issue, site, n * top_k + k, slots[k], n_rows, /*allow_ignore=*/true);
    float* y_n = y + n * dim;
    for (int64_t c = lane * kStep; c < dim; c += kWarp * kStep) {
      double acc[kStep] = {};
      for (int64_t k0 = 0; k0 < top_k; k0 += kSlotGroup) {
        int64_t r[kSlotGroup];
        double w_k[kSlotGroup];
        float v[kSlotGroup][kStep];
#pragma unroll
        for (int j = 0; j < kSlotGroup; ++j) {
          const int32_t rj = k0 + j < top_k ? slots[k0 + j] : -1;
          r[j] = rj >= 0 && rj < n_rows ? rj : -1;
          w_k[j] = kWeighted && r[j] >= 0 ? static_cast<double>(w[k0 + j]) : 1.0;
        }
#pragma unroll
        for (int j = 0; j < kSlotGroup; ++j) {
          const In* src = rows + (r[j] >= 0 ? r[j] : 0) * dim + c;  // read only for a valid slot
          if constexpr (kVec4) {
            const float4 x = r[j] >= 0 ? load4(src) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
            for (int i = 0; i < kVec; ++i) v[j][i] = at(x, i);
          } else {
            v[j][0] = r[j] >= 0 ? load1(src) : 0.0f;
          }
        }
#pragma unroll
        for (int j = 0; j < kSlotGroup; ++j)
#pragma unroll
          for (int i = 0; i < kStep; ++i) acc[i] += w_k[j] * v[j][i];
      }
      if constexpr (kVec4) {
        float4 out = load4(y_n + c);
#pragma unroll
        for (int i = 0; i < kVec; ++i) at(out, i) = static_cast<float>(at(out, i) + acc[i]);
        store4(y_n + c, out);
      } else {
        y_n[c] = static_cast<float>(y_n[c] + acc[0]);
      }
    }
  }
}

// dx[n] += Σ_k dx_perm[slot_pos[n,k]]   (double sum in k order, as on the CPU); dx_perm f32 or bf16
template <class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    gather_bwd_kernel(float* __restrict__ dx, const In* __restrict__ dx_perm, const int32_t* __restrict__ slot_pos,
                      int64_t n_tokens, int64_t top_k, int64_t dim, int64_t n_rows, DeviceIssue* issue) {
  add_weighted_slots<kVec4, false>(dx, dx_perm, nullptr, slot_pos, n_tokens, top_k, dim, n_rows,
                                   IssueSite::kGatherBwdSlotPos, issue);
}

// y[n] += Σ_k w[n,k] · y_perm[slot_pos[n,k]]   (double sum in k order, as on the CPU); y_perm f32 or bf16
template <class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    combine_fwd_kernel(float* __restrict__ y, const In* __restrict__ y_perm, const float* __restrict__ topk_w,
                       const int32_t* __restrict__ slot_pos, int64_t n_tokens, int64_t top_k, int64_t dim,
                       int64_t n_rows, DeviceIssue* issue) {
  add_weighted_slots<kVec4, true>(y, y_perm, topk_w, slot_pos, n_tokens, top_k, dim, n_rows,
                                  IssueSite::kCombineFwdSlotPos, issue);
}

// One warp per (n, k): dy_perm[slot_pos[n,k]] = w[n,k]·dy[n] (one f32 product, as on the CPU);
// dtopk_w[n,k] = ⟨dy[n], y_perm[slot_pos[n,k]]⟩ (double; lane partial sums, then the warp's tree).
// The K warps of a token read the same dy row: from the cache after the first.
// Out: float, or bf16 in the bf16 GEMM mode (dy_perm only feeds the expert GEMMs); In: y_perm's
// type, float or bf16 (the expert GEMMs' output in the bf16 GEMM mode); G: dy's, float or bf16 (the
// residual gradient's bf16 copy in that mode: half the bytes of the row every slot reads).
template <class Out, class In, class G, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    combine_bwd_kernel(Out* __restrict__ dy_perm, float* __restrict__ dtopk_w, const G* __restrict__ dy,
                       const In* __restrict__ y_perm, const float* __restrict__ topk_w,
                       const int32_t* __restrict__ slot_pos, int64_t n_tokens, int64_t top_k, int64_t dim,
                       int64_t n_rows, DeviceIssue* issue) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t nk = warp_index(); nk < n_tokens * top_k; nk += warp_count()) {
    const int64_t n = nk / top_k;
    const int32_t r = slot_pos[nk];
    if (!index_ok(issue, IssueSite::kCombineBwdSlotPos, nk, r, n_rows, /*allow_ignore=*/true))
      continue;     // uniform over the warp
    if (r == -1) {  // an unused slot: no row, no weight gradient
      if (lane == 0) dtopk_w[nk] = 0.0f;
      continue;
    }
    const float w = topk_w[nk];
    const G* g_row = dy + n * dim;
    const In* y_row = y_perm + r * dim;
    Out* out = dy_perm + r * dim;
    double dot = 0.0;
    if constexpr (kVec4) {
      for (int64_t c0 = lane * kVec; c0 < dim; c0 += kWarp * kVec * kUnrollReduce) {
        float4 g[kUnrollReduce], yv[kUnrollReduce];
#pragma unroll
        for (int u = 0; u < kUnrollReduce; ++u) {
          const int64_t c = c0 + u * kWarp * kVec;
          if (c < dim) {
            g[u] = load4(g_row + c);
            yv[u] = load4(y_row + c);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnrollReduce; ++u) {
          const int64_t c = c0 + u * kWarp * kVec;
          if (c >= dim) continue;
          store4(out + c, make_float4(w * g[u].x, w * g[u].y, w * g[u].z, w * g[u].w));
#pragma unroll
          for (int i = 0; i < kVec; ++i) dot += static_cast<double>(at(g[u], i)) * at(yv[u], i);
        }
      }
    } else {
      for (int64_t c = lane; c < dim; c += kWarp) {
        const float g = load1(g_row + c);
        store1(out + c, w * g);
        dot += static_cast<double>(g) * load1(y_row + c);
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) dtopk_w[nk] = static_cast<float>(dot);
  }
}

// b_i += rate · sign(mean(c) − c_i), sign(0) = 0 (docs/derivations.md §4.5). One block; the total is a fixed-
// order block reduction in double.
__global__ void bias_update_kernel(float* bias, const void* counts, bool counts_i32, int64_t n_experts, double rate) {
  __shared__ double red[kWarp];
  auto count = [&](int64_t i) {
    return counts_i32 ? static_cast<double>(static_cast<const int32_t*>(counts)[i])
                      : static_cast<double>(static_cast<const float*>(counts)[i]);
  };
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < n_experts; i += blockDim.x) total += count(i);
  const double mean = block_sum(total, red) / static_cast<double>(n_experts);
  for (int64_t i = threadIdx.x; i < n_experts; i += blockDim.x) {
    const double gap = mean - count(i);
    const int sign = (gap > 0) - (gap < 0);
    bias[i] = bias[i] + static_cast<float>(rate) * static_cast<float>(sign);
  }
}

RouterConsts router_consts(const RouterOptions& o, int64_t n_tokens, int64_t n_experts) {
  return RouterConsts{.n_tokens = n_tokens,
                      .n_experts = static_cast<int>(n_experts),
                      .n_groups = static_cast<int>(o.n_groups),
                      .n_limited = static_cast<int>(o.n_limited_groups),
                      .top_k = static_cast<int>(o.top_k),
                      .sigmoid = o.score_func == ScoreFunc::kSigmoid,
                      .use_bias = o.use_bias,
                      .route_scale = o.route_scale};
}

// Dynamic shared memory of the aux-loss kernels: candidate states [warps][E] (counting) or g [E].
size_t aux_count_smem_bytes(int64_t n_experts) { return (kAuxThreads / kWarp) * static_cast<size_t>(n_experts); }

// Phase 1 of both aux-loss ops: picks [n_seqs, E] i32 (zeroed, then counted) at the start of
// `scratch`; returns the grid of (chunk, sequence) blocks.
template <class Kernel>
void set_smem_limit(Kernel kernel, size_t bytes, size_t max_bytes, std::string_view op, int64_t n_experts) {
  DIFFMOE_CHECK(bytes <= max_bytes, "[{}] {} experts need {} bytes of shared memory per block, the device allows {}",
                op, n_experts, bytes, max_bytes);
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// What both aux-loss ops share: the constants, the (sequence, chunk) grid, and phase 1, which
// zeroes picks [n_seqs, E] (at the start of the backend's scratch, followed by `extra_bytes`) and
// counts the picks into it.
struct AuxPlan {
  AuxConsts c;
  dim3 grid;
  int* picks;
  void* extra;  // extra_bytes of scratch after picks
};

AuxPlan aux_plan(CudaBackend& be, cudaStream_t s, const Tensor& scores, int64_t seq_len, int64_t top_k, double alpha,
                 double dloss, ScoreFunc score_func, size_t extra_bytes, std::string_view op) {
  const int64_t n_tokens = scores.dim(0), n_experts = scores.dim(1), n_seqs = n_tokens / seq_len;
  const int64_t n_chunks = (seq_len + kAuxChunk - 1) / kAuxChunk;
  DIFFMOE_CHECK(n_seqs <= INT32_MAX && n_experts <= INT32_MAX && n_chunks <= 65535,
                "[{}] too many sequences, experts or tokens per sequence ({}, {}, {})", op, n_seqs, n_experts, seq_len);
  AuxPlan p{.c = AuxConsts{.seq_len = seq_len,
                           .n_seqs = n_seqs,
                           .n_experts = static_cast<int>(n_experts),
                           .top_k = static_cast<int>(top_k),
                           .sigmoid = score_func == ScoreFunc::kSigmoid,
                           .alpha = alpha,
                           .dloss = dloss},
            .grid = dim3(static_cast<unsigned>(n_seqs), static_cast<unsigned>(n_chunks)),
            .picks = nullptr,
            .extra = nullptr};
  const size_t picks_bytes = align256(static_cast<size_t>(n_seqs * n_experts) * sizeof(int));
  char* base = static_cast<char*>(be.scratch(picks_bytes + extra_bytes));
  p.picks = reinterpret_cast<int*>(base);
  p.extra = base + picks_bytes;
  const size_t smem = aux_count_smem_bytes(n_experts);
  set_smem_limit(aux_count_kernel, smem, be.max_shared_bytes(), op, n_experts);
  CUDA_CHECK(cudaMemsetAsync(p.picks, 0, picks_bytes, s));
  aux_count_kernel<<<p.grid, kAuxThreads, smem, s>>>(p.picks, f32(scores), p.c);
  CUDA_CHECK_LAUNCH(op);
  return p;
}

// Calls f(p) with t's data as `const float*` or `const __nv_bfloat16*` (an input the bf16 GEMM mode
// may hold in bf16; validation allows only these two).
template <class F>
void with_input(const Tensor& t, F&& f) {
  if (t.dtype == DType::kBF16) f(static_cast<const __nv_bfloat16*>(t.data));
  else f(static_cast<const float*>(t.data));
}

}  // namespace

void CudaBackend::router_fwd(Context ctx, const RouterFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "router_fwd");
  constexpr std::string_view kOp = "router_fwd";
  validate_router_fwd(a, Device::kCUDA);
  require_f32(a.logits, kOp);
  const int64_t n_tokens = a.logits.dim(0), n_experts = a.logits.dim(1);
  DIFFMOE_CHECK(n_experts <= kMaxExperts, "[{}] the CUDA router handles at most {} experts, got {}", kOp, kMaxExperts,
                n_experts);
  if (n_tokens == 0) return;
  router_fwd_kernel<<<grid_for(n_tokens, kRouterWarps), kRouterWarps * kWarp, 0, stream(ctx)>>>(
      f32(a.scores), i32(a.topk_idx), f32(a.topk_w), i32(a.counts), f32(a.logits),
      a.opt.use_bias ? f32(a.bias) : nullptr, router_consts(a.opt, n_tokens, n_experts));
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::router_bwd(Context ctx, const RouterBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "router_bwd");
  constexpr std::string_view kOp = "router_bwd";
  validate_router_bwd(a, Device::kCUDA);
  require_f32(a.scores, kOp);
  const int64_t n_tokens = a.scores.dim(0), n_experts = a.scores.dim(1);
  DIFFMOE_CHECK(n_experts <= INT_MAX, "[{}] {} experts exceed the int range", kOp, n_experts);
  if (n_tokens == 0) return;
  router_bwd_kernel<<<grid_for(n_tokens * kWarp), kThreads, 0, stream(ctx)>>>(
      f32(a.dlogits), f32(a.dtopk_w), f32(a.scores), i32(a.topk_idx), router_consts(a.opt, n_tokens, n_experts),
      issue());
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::aux_loss_fwd(Context ctx, const AuxLossFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "aux_loss_fwd");
  constexpr std::string_view kOp = "aux_loss_fwd";
  validate_aux_loss_fwd(a, Device::kCUDA);
  require_f32(a.scores, kOp);
  if (a.scores.dim(0) == 0) return;  // no sequences: nothing to add (the CPU would add 0/0)
  const cudaStream_t s = stream(ctx);
  const int64_t n_chunks = (a.seq_len + kAuxChunk - 1) / kAuxChunk, n_seqs = a.scores.dim(0) / a.seq_len;
  const AuxPlan p = aux_plan(*this, s, a.scores, a.seq_len, a.top_k, a.alpha, 1.0, a.score_func,
                             static_cast<size_t>(n_seqs * n_chunks) * sizeof(double), kOp);
  auto* partial = static_cast<double*>(p.extra);
  aux_loss_fwd_kernel<<<p.grid, kAuxThreads, 0, s>>>(partial, f32(a.scores), p.picks, p.c);
  CUDA_CHECK_LAUNCH(kOp);
  aux_loss_total_kernel<<<1, 1, 0, s>>>(f32(a.loss), partial, n_chunks, p.c);
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::aux_loss_bwd(Context ctx, const AuxLossBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "aux_loss_bwd");
  constexpr std::string_view kOp = "aux_loss_bwd";
  validate_aux_loss_bwd(a, Device::kCUDA);
  require_f32(a.scores, kOp);
  if (a.scores.dim(0) == 0) return;
  const cudaStream_t s = stream(ctx);
  const AuxPlan p = aux_plan(*this, s, a.scores, a.seq_len, a.top_k, a.alpha, a.dloss, a.score_func, 0, kOp);
  const size_t smem = sizeof(double) * static_cast<size_t>(p.c.n_experts);
  set_smem_limit(aux_loss_bwd_kernel, smem, max_shared_bytes(), kOp, p.c.n_experts);
  aux_loss_bwd_kernel<<<p.grid, kAuxThreads, smem, s>>>(f32(a.dlogits), f32(a.scores), p.picks, p.c);
  CUDA_CHECK_LAUNCH(kOp);
}

// Stable sort of the N·K (token, slot) assignments by expert (radix_sort.h).
void CudaBackend::moe_permute(Context ctx, const MoePermuteArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "moe_permute");
  constexpr std::string_view kOp = "moe_permute";
  validate_moe_permute(a, Device::kCUDA);
  const int64_t n_tokens = a.topk_idx.dim(0), top_k = a.topk_idx.dim(1), n_rows = n_tokens * top_k;
  const cudaStream_t s = stream(ctx);
  if (n_rows == 0) {
    CUDA_CHECK(cudaMemsetAsync(a.offsets.data, 0, a.offsets.nbytes(), s));
    return;
  }
  // Scratch: assignment ids, keys, sorted keys, sorted assignment ids, CUB's temporaries. src_row may
  // be shorter than N·K when slots are unused (-1): those sort last and get no row.
  const size_t ids_bytes = align256(static_cast<size_t>(n_rows) * sizeof(int32_t));
  const size_t temp_bytes = sort_pairs_temp_bytes(n_rows);
  char* base = static_cast<char*>(scratch(4 * ids_bytes + temp_bytes));
  auto* assign = reinterpret_cast<int32_t*>(base);
  auto* keys = reinterpret_cast<int32_t*>(base + ids_bytes);
  auto* sorted_expert = reinterpret_cast<int32_t*>(base + 2 * ids_bytes);
  auto* sorted_assign = reinterpret_cast<int32_t*>(base + 3 * ids_bytes);
  permute_prepare_kernel<<<grid_for(n_rows), kThreads, 0, s>>>(assign, keys, i32(a.topk_idx), n_rows, a.n_experts,
                                                               issue());
  CUDA_CHECK_LAUNCH(kOp);
  sort_pairs(base + 4 * ids_bytes, temp_bytes, keys, sorted_expert, assign, sorted_assign, n_rows, s);
  permute_scatter_kernel<<<grid_for(n_rows), kThreads, 0, s>>>(i32(a.src_row), i32(a.slot_pos), sorted_assign,
                                                               sorted_expert, n_rows, top_k, a.n_experts);
  CUDA_CHECK_LAUNCH(kOp);
  permute_offsets_kernel<<<grid_for(a.n_experts + 1), kThreads, 0, s>>>(i32(a.offsets), sorted_expert, n_rows,
                                                                        a.n_experts);
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::moe_gather(Context ctx, const MoeGatherArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "moe_gather");
  constexpr std::string_view kOp = "moe_gather";
  validate_moe_gather(a, Device::kCUDA);
  require_f32_or_bf16(a.x, kOp, "x");
  const int64_t n_tokens = a.x.dim(0), dim = a.x.dim(1), n_rows = a.src_row.numel();
  if (n_rows * dim == 0) return;
  const auto launch = [&](auto* x_perm, const auto* x) {
    using Out = std::remove_pointer_t<decltype(x_perm)>;
    using In = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
    const unsigned grid = grid_for(n_rows * kWarp);
    if (vec_sizes({dim}) && vec_aligned(x_perm) && vec_aligned(x))
      gather_kernel<Out, In, true>
          <<<grid, kThreads, 0, stream(ctx)>>>(x_perm, x, i32(a.src_row), n_rows, n_tokens, dim, issue());
    else
      gather_kernel<Out, In, false>
          <<<grid, kThreads, 0, stream(ctx)>>>(x_perm, x, i32(a.src_row), n_rows, n_tokens, dim, issue());
    CUDA_CHECK_LAUNCH(kOp);
  };
  with_input(a.x, [&](const auto* x) {
    if (a.x_perm.dtype == DType::kBF16) launch(static_cast<__nv_bfloat16*>(a.x_perm.data), x);
    else launch(f32(a.x_perm), x);
  });
}

void CudaBackend::moe_gather_bwd(Context ctx, const MoeGatherBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "moe_gather_bwd");
  constexpr std::string_view kOp = "moe_gather_bwd";
  validate_moe_gather_bwd(a, Device::kCUDA);
  require_f32(a.dx, kOp);
  const int64_t n_tokens = a.dx.dim(0), dim = a.dx.dim(1), top_k = a.slot_pos.dim(1);
  if (n_tokens * dim == 0) return;
  const unsigned grid = grid_for(n_tokens * kWarp);
  with_input(a.dx_perm, [&](const auto* dx_perm) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(dx_perm)>>;
    if (vec_sizes({dim}) && vec_aligned(f32(a.dx)) && vec_aligned(dx_perm))
      gather_bwd_kernel<In, true><<<grid, kThreads, 0, stream(ctx)>>>(f32(a.dx), dx_perm, i32(a.slot_pos), n_tokens,
                                                                      top_k, dim, a.dx_perm.dim(0), issue());
    else
      gather_bwd_kernel<In, false><<<grid, kThreads, 0, stream(ctx)>>>(f32(a.dx), dx_perm, i32(a.slot_pos), n_tokens,
                                                                       top_k, dim, a.dx_perm.dim(0), issue());
    CUDA_CHECK_LAUNCH(kOp);
  });
}

void CudaBackend::moe_combine_fwd(Context ctx, const MoeCombineFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "moe_combine_fwd");
  constexpr std::string_view kOp = "moe_combine_fwd";
  validate_moe_combine_fwd(a, Device::kCUDA);
  require_f32(a.y, kOp);
  const int64_t n_tokens = a.y.dim(0), dim = a.y.dim(1), top_k = a.slot_pos.dim(1);
  if (n_tokens * dim == 0) return;
  const unsigned grid = grid_for(n_tokens * kWarp);
  with_input(a.y_perm, [&](const auto* y_perm) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(y_perm)>>;
    if (vec_sizes({dim}) && vec_aligned(f32(a.y)) && vec_aligned(y_perm))
      combine_fwd_kernel<In, true><<<grid, kThreads, 0, stream(ctx)>>>(f32(a.y), y_perm, f32(a.topk_w), i32(a.slot_pos),
                                                                       n_tokens, top_k, dim, a.y_perm.dim(0), issue());
    else
      combine_fwd_kernel<In, false><<<grid, kThreads, 0, stream(ctx)>>>(
          f32(a.y), y_perm, f32(a.topk_w), i32(a.slot_pos), n_tokens, top_k, dim, a.y_perm.dim(0), issue());
    CUDA_CHECK_LAUNCH(kOp);
  });
}

void CudaBackend::moe_combine_bwd(Context ctx, const MoeCombineBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "moe_combine_bwd");
  constexpr std::string_view kOp = "moe_combine_bwd";
  validate_moe_combine_bwd(a, Device::kCUDA);
  require_f32_or_bf16(a.dy, kOp, "dy");
  const int64_t n_tokens = a.dy.dim(0), dim = a.dy.dim(1), top_k = a.slot_pos.dim(1);
  if (n_tokens * top_k == 0) return;
  const auto launch = [&](auto* dy_perm, const auto* y_perm, const auto* dy) {
    using Out = std::remove_pointer_t<decltype(dy_perm)>;
    using In = std::remove_const_t<std::remove_pointer_t<decltype(y_perm)>>;
    using G = std::remove_const_t<std::remove_pointer_t<decltype(dy)>>;
    const unsigned grid = grid_for(n_tokens * top_k * kWarp);
    if (vec_sizes({dim}) && vec_aligned(dy_perm) && vec_aligned(dy) && vec_aligned(y_perm))
      combine_bwd_kernel<Out, In, G, true><<<grid, kThreads, 0, stream(ctx)>>>(dy_perm, f32(a.dtopk_w), dy, y_perm,
                                                                               f32(a.topk_w), i32(a.slot_pos), n_tokens,
                                                                               top_k, dim, a.y_perm.dim(0), issue());
    else
      combine_bwd_kernel<Out, In, G, false>
          <<<grid, kThreads, 0, stream(ctx)>>>(dy_perm, f32(a.dtopk_w), dy, y_perm, f32(a.topk_w), i32(a.slot_pos),
                                               n_tokens, top_k, dim, a.y_perm.dim(0), issue());
    CUDA_CHECK_LAUNCH(kOp);
  };
  with_input(a.dy, [&](const auto* dy) {
    with_input(a.y_perm, [&](const auto* y_perm) {
      if (a.dy_perm.dtype == DType::kBF16) launch(static_cast<__nv_bfloat16*>(a.dy_perm.data), y_perm, dy);
      else launch(f32(a.dy_perm), y_perm, dy);
    });
  });
}

void CudaBackend::moe_bias_update(Context ctx, const MoeBiasUpdateArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "moe_bias_update");
  constexpr std::string_view kOp = "moe_bias_update";
  validate_moe_bias_update(a, Device::kCUDA);
  require_f32(a.bias, kOp);
  if (a.bias.numel() == 0) return;
  bias_update_kernel<<<1, kThreads, 0, stream(ctx)>>>(f32(a.bias), a.counts.data, a.counts.dtype == DType::kI32,
                                                      a.bias.numel(), a.rate);
  CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace diffmoe
