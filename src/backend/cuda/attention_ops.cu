// DiffMLA attention core on the GPU (docs/model.md §2; docs/derivations.md §1.3-1.4, §2.3-2.5): the MLA key/value
// split, the differential λ and causal attention, forward and backward.
//
// Kernel choice (attention_fwd / attention_bwd): under GemmPrecision::kBF16 the tensor-core kernels
// (tc_attention.h: bf16 operands, f32 accumulation) where they cover the shape; else the f32 flash
// kernels (flash_attention.h) where they cover it; else the simple ones below. kSimple forces the
// simple ones in either precision. bf16 q, k, v (op_args.h: the bf16 mode saves them so for every
// shape) are read in place by the tensor-core kernels; for the f32 kernels they are widened exactly
// into the backend's operand buffer (gemm_bf16_scratch, grown to the largest call, then reused),
// and bf16 dq, dk, dv are computed there in f32 and rounded once (stage_f32 below): the f32 op on
// the widened values, as on the CPU.
//
// Design (the straightforward version, kept for the shapes the fused flash-style kernels of
// flash_attention_ops.cu do not cover: d_qk outside {32, 48, 96, 128} or comps·d_v outside
// {32, 64, 128}, and for CudaBackend::AttentionKernel::kSimple):
// - attention_fwd: one block per (query row t, value group g, batch b). A group is a differential
//   head (components 2g, 2g+1 sharing V_g = [v_2g ; v_2g+1], 2·d_v wide) or a plain head. For each
//   component the block runs the CPU's two-pass softmax: one warp per key computes the scaled
//   scores into shared memory (T floats) and their max, then exp and the sum, then each thread
//   forms one output column Σ_s p_s V_s[col] (coalesced over columns). lse = m + ln l is saved.
// - attention_bwd: the same grid; probabilities are recomputed from the saved lse (no scratch).
//   dq rows have one writer each; dk and dv rows receive a contribution from every later query row,
//   so they are zeroed and then accumulated with f32 atomicAdd: the sum order varies between runs,
//   which makes dk/dv reproducible only up to the last bits (documented in cuda_backend.h).
// - dλ = −Σ⟨dO, O2⟩ is one block's reduction in double, in a fixed order (deterministic).
// - λ (tiny vectors) is one block in double, like the CPU.
// Shared memory: O(T) floats per block; rows longer than the device's shared memory are rejected
// with a message (the flash kernels have no such limit, for the shapes they cover).
#include <array>
#include <type_traits>
#include <utility>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/flash_attention.h"
#include "backend/cuda/tc_attention.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kAttnThreads = 128;  // 4 warps per (row, group) block

// ================================================================ MLA key/value split

// The split is pure data movement: one thread per item of a token row (elementwise.cuh: 32-bit item
// numbers, no 64-bit division per element); an item is a float4 piece when every width, stride and
// offset is a multiple of 4 and the tensors are aligned (kVec4), else one value. With widths that
// are multiples of 4 a piece never straddles the k-nope / rope-key / value boundaries. The forward
// may write bf16 k, v (the bf16 GEMM mode): each value rounded to nearest even on the store.
struct KvSplitShape {
  int32_t n_heads, d_nope, d_rope, d_v;
  int64_t kr_stride, kr_offset;
};

// k[n, h] = [kv[n, h, :d_nope] ; kr[n]],  v[n, h] = kv[n, h, d_nope:]
// Items of token n: (head h, column c of [k ; v]) in pieces of kStep columns. Out = float, or bf16
// in the bf16 GEMM mode (each f32 value rounded once, the attention's operands: op_args.h). In = kv's
// type: float, or bf16 where W_kvb's GEMM wrote kv in bf16 (then its values move exactly).
template <class Out, class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    kv_split_fwd_kernel(Out* __restrict__ k, Out* __restrict__ v, const In* __restrict__ kv,
                        const float* __restrict__ kr, RowItems ri, KvSplitShape sh) {
  constexpr int kStep = kVec4 ? kVec : 1;
  const int32_t d_qk = sh.d_nope + sh.d_rope, per_head = (d_qk + sh.d_v) / kStep;
  for_each_row_item(ri, [&](int64_t n, int32_t item) {
    const int32_t h = item / per_head, c = (item - h * per_head) * kStep;
    const int64_t nh = n * sh.n_heads + h;
    // The rope key columns come from kr (f32), the rest from kv (In).
    if (c >= sh.d_nope && c < d_qk) {
      const float* src = kr + n * sh.kr_stride + sh.kr_offset + (c - sh.d_nope);
      Out* dst = k + nh * d_qk + c;
      if constexpr (kVec4) store4(dst, load4(src));
      else store1(dst, *src);
      return;
    }
    const In* src = kv + nh * (sh.d_nope + sh.d_v) + (c < sh.d_nope ? c : sh.d_nope + (c - d_qk));
    Out* dst = c < sh.d_nope ? k + nh * d_qk + c : v + nh * sh.d_v + (c - d_qk);
    if constexpr (kVec4) store4(dst, load4(src));
    else store1(dst, load1(src));
  });
}

// dkv[n, h] = [dk[n, h, :d_nope] ; dv[n, h]]; items of token n: (head h, column c of dkv's head).
// Out: float, or bf16 in the bf16 GEMM mode (dkv only feeds W_kvb's backward GEMMs; rounded here).
// In: dk's and dv's type, float or bf16 (the tensor-core attention's gradients in the bf16 mode).
template <class Out, class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    kv_split_bwd_kv_kernel(Out* __restrict__ dkv, const In* __restrict__ dk, const In* __restrict__ dv, RowItems ri,
                           KvSplitShape sh) {
  constexpr int kStep = kVec4 ? kVec : 1;
  const int32_t d_qk = sh.d_nope + sh.d_rope, per_head = (sh.d_nope + sh.d_v) / kStep;
  for_each_row_item(ri, [&](int64_t n, int32_t item) {
    const int32_t h = item / per_head, c = (item - h * per_head) * kStep;
    const int64_t nh = n * sh.n_heads + h;
    const In* src = c < sh.d_nope ? dk + nh * d_qk + c : dv + nh * sh.d_v + (c - sh.d_nope);
    Out* dst = dkv + nh * (sh.d_nope + sh.d_v) + c;
    if constexpr (kVec4) store4(dst, load4(src));
    else store1(dst, load1(src));
  });
}

// dkr[n, i] = Σ_h dk[n, h, d_nope + i], summed over heads in order in f32 (docs/derivations.md §2.5, the CPU's
// order); items of token n: pieces of the d_rope columns.
template <class In, bool kVec4>
__global__ void __launch_bounds__(kThreads)
    kv_split_bwd_kr_kernel(float* __restrict__ dkr, const In* __restrict__ dk, RowItems ri, KvSplitShape sh) {
  constexpr int kStep = kVec4 ? kVec : 1;
  const int32_t d_qk = sh.d_nope + sh.d_rope;
  for_each_row_item(ri, [&](int64_t n, int32_t item) {
    const int32_t i = item * kStep;
    const In* src = dk + n * sh.n_heads * d_qk + sh.d_nope + i;
    float* dst = dkr + n * sh.kr_stride + sh.kr_offset + i;
    if constexpr (kVec4) {
      float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int32_t h = 0; h < sh.n_heads; ++h) {
        const float4 g = load4(src + int64_t{h} * d_qk);
        sum = make_float4(sum.x + g.x, sum.y + g.y, sum.z + g.z, sum.w + g.w);
      }
      store4(dst, sum);
    } else {
      float sum = 0.0f;
      for (int32_t h = 0; h < sh.n_heads; ++h) sum += load1(src + int64_t{h} * d_qk);
      *dst = sum;
    }
  });
}

// ================================================================ differential λ

// Both dot products λ_q1·λ_k1 and λ_q2·λ_k2 in double (one block).
__device__ void lambda_dots(const float* lq1, const float* lk1, const float* lq2, const float* lk2, int64_t n,
                            double* d1, double* d2) {
  __shared__ double red[kWarp];
  double s1 = 0.0, s2 = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    s1 += static_cast<double>(lq1[i]) * lk1[i];
    s2 += static_cast<double>(lq2[i]) * lk2[i];
  }
  *d1 = block_sum(s1, red);
  *d2 = block_sum(s2, red);
}

__global__ void diff_lambda_fwd_kernel(float* lambda, const float* lq1, const float* lk1, const float* lq2,
                                       const float* lk2, int64_t n, double lambda_init) {
  double d1, d2;
  lambda_dots(lq1, lk1, lq2, lk2, n, &d1, &d2);
  if (threadIdx.x == 0) lambda[0] = static_cast<float>(exp(d1) - exp(d2) + lambda_init);
}

// dλ_q1 += dλ·e1·λ_k1, dλ_k1 += dλ·e1·λ_q1, dλ_q2 += −dλ·e2·λ_k2, dλ_k2 += −dλ·e2·λ_q2 (docs/derivations.md §1.4)
__global__ void diff_lambda_bwd_kernel(float* dlq1, float* dlk1, float* dlq2, float* dlk2, const float* dlambda,
                                       const float* lq1, const float* lk1, const float* lq2, const float* lk2,
                                       int64_t n) {
  double d1, d2;
  lambda_dots(lq1, lk1, lq2, lk2, n, &d1, &d2);
  const double dl = dlambda[0];
  const double g1 = dl * exp(d1), g2 = -dl * exp(d2);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    dlq1[i] += static_cast<float>(g1 * lk1[i]);
    dlk1[i] += static_cast<float>(g1 * lq1[i]);
    dlq2[i] += static_cast<float>(g2 * lk2[i]);
    dlk2[i] += static_cast<float>(g2 * lq2[i]);
  }
}

// ================================================================ causal attention

struct AttnShape {
  int64_t seq, heads, d_qk, d_v, comps;
  // Element offset of row (b, t, head h) in a [B, T, H, width] tensor.
  __device__ int64_t at(int64_t b, int64_t t, int64_t h, int64_t width) const {
    return ((b * seq + t) * heads + h) * width;
  }
};

AttnShape shape_of(const AttnDims& d) { return {d.seq, d.heads, d.d_qk, d.d_v, d.comps}; }

// Scores z_s = scale·q·k_s for s ≤ t into z[] (one warp per key); returns the block-wide max.
__device__ float causal_scores(float* z, const float* q_s, const float* k, int64_t k_stride, int64_t d_qk, int64_t t,
                               float scale, float* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  float m = -INFINITY;
  for (int64_t s = warp; s <= t; s += n_warps) {
    const float* k_s = k + s * k_stride;
    float dot = 0.0f;
    for (int64_t i = lane; i < d_qk; i += kWarp) dot += q_s[i] * k_s[i];
    const float zs = scale * warp_sum(dot);
    if (lane == 0) z[s] = zs;
    m = fmaxf(m, zs);
  }
  return block_max(m, red);  // its barriers also publish z[]
}

// Shared memory: q [d_qk] then p [T].
__global__ void __launch_bounds__(kAttnThreads)
    attention_fwd_kernel(float* out, float* o2, float* lse, const float* q, const float* k, const float* v,
                         const float* lambda, AttnShape sh, float scale) {
  extern __shared__ float smem[];
  __shared__ float red[kWarp];
  float* q_s = smem;
  float* p = smem + sh.d_qk;
  const int64_t t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t first = sh.comps * g;  // first component head of the group; also V_g's first v head
  const int64_t width = sh.comps * sh.d_v;
  const int64_t k_stride = sh.heads * sh.d_qk, v_stride = sh.heads * sh.d_v;
  const float lam = sh.comps == 2 ? lambda[0] : 0.0f;
  const float* v_g = v + sh.at(b, 0, first, sh.d_v);
  float* out_row = out + sh.at(b, t, first, sh.d_v);
  for (int64_t c = 0; c < sh.comps; ++c) {
    const int64_t j = first + c;
    for (int64_t i = threadIdx.x; i < sh.d_qk; i += blockDim.x) q_s[i] = q[sh.at(b, t, j, sh.d_qk) + i];
    __syncthreads();
    const float m = causal_scores(p, q_s, k + sh.at(b, 0, j, sh.d_qk), k_stride, sh.d_qk, t, scale, red);
    float l = 0.0f;
    for (int64_t s = threadIdx.x; s <= t; s += blockDim.x) {
      const float e = expf(p[s] - m);
      p[s] = e;
      l += e;
    }
    l = block_sum(l, red);  // its barriers also publish p[]
    const float inv_l = 1.0f / l;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
      float acc = 0.0f;
      for (int64_t s = 0; s <= t; ++s) acc += p[s] * v_g[s * v_stride + i];
      const float o = acc * inv_l;
      if (c == 0) {
        out_row[i] = o;  // A_{g,0}V_g (the final output when plain)
      } else {
        // O_g = A_{g,0}V_g − λ·A_{g,1}V_g; this thread wrote out_row[i] itself for c = 0.
        o2[sh.at(b, t, first, sh.d_v) + i] = o;
        out_row[i] -= lam * o;
      }
    }
    if (threadIdx.x == 0) lse[(b * sh.heads + j) * sh.seq + t] = m + logf(l);
    __syncthreads();  // q_s and p are reused by the next component
  }
}

// Backward of one query row t for each component (docs/derivations.md §1.4), with dO_c = coef·dO:
//   p_s = exp(z_s − lse),  dS_s = p_s·(dO_c·V_s − D_c),  D_c = rowsum(dO_c ⊙ O_c),
//   dq_t = scale·Σ_s dS_s k_s (written),  dk_s += scale·dS_s q_t,  dV_s += p_s dO_c (atomics).
// Shared memory: q [d_qk], dout row [width], p [T], dS [T].
__global__ void __launch_bounds__(kAttnThreads)
    attention_bwd_kernel(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                         const float* v, const float* out, const float* o2, const float* lse, const float* lambda,
                         AttnShape sh, float scale) {
  extern __shared__ float smem[];
  __shared__ float red[kWarp];
  const int64_t width = sh.comps * sh.d_v;
  float* q_s = smem;
  float* do_s = q_s + sh.d_qk;
  float* p = do_s + width;
  float* ds = p + sh.seq;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const int64_t t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t first = sh.comps * g;
  const int64_t k_stride = sh.heads * sh.d_qk, v_stride = sh.heads * sh.d_v;
  const bool differential = sh.comps == 2;
  const float lam = differential ? lambda[0] : 0.0f;
  const int64_t row = sh.at(b, t, first, sh.d_v);  // dout/out/o2 row of the group (width values)
  const float* v_g = v + sh.at(b, 0, first, sh.d_v);
  float* dv_g = dv + sh.at(b, 0, first, sh.d_v);
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) do_s[i] = dout[row + i];
  for (int64_t c = 0; c < sh.comps; ++c) {
    const int64_t j = first + c;
    // dO_0 = dO, dO_1 = −λ·dO; a plain head is component 0 with O = out.
    const float coef = c == 0 ? 1.0f : -lam;
    for (int64_t i = threadIdx.x; i < sh.d_qk; i += blockDim.x) q_s[i] = q[sh.at(b, t, j, sh.d_qk) + i];
    // D_c = coef·Σ dO ⊙ O_c, with O_0 = out + λ·o2 (differential) or out (plain), O_1 = o2.
    float d_part = 0.0f;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
      const float o_c = c == 1 ? o2[row + i] : (differential ? out[row + i] + lam * o2[row + i] : out[row + i]);
      d_part += dout[row + i] * o_c;
    }
    const float d_c = coef * block_sum(d_part, red);  // its barriers also publish q_s, do_s
    const float lse_t = lse[(b * sh.heads + j) * sh.seq + t];
    const float* k_j = k + sh.at(b, 0, j, sh.d_qk);
    for (int64_t s = warp; s <= t; s += n_warps) {
      const float* k_s = k_j + s * k_stride;
      const float* v_s = v_g + s * v_stride;
      float qk = 0.0f, dov = 0.0f;
      for (int64_t i = lane; i < sh.d_qk; i += kWarp) qk += q_s[i] * k_s[i];
      for (int64_t i = lane; i < width; i += kWarp) dov += do_s[i] * v_s[i];
      qk = warp_sum(qk);
      dov = warp_sum(dov);
      if (lane == 0) {
        const float ps = expf(scale * qk - lse_t);
        p[s] = ps;
        ds[s] = ps * (coef * dov - d_c);
      }
    }
    __syncthreads();
    float* dq_t = dq + sh.at(b, t, j, sh.d_qk);
    for (int64_t i = threadIdx.x; i < sh.d_qk; i += blockDim.x) {
      float acc = 0.0f;
      for (int64_t s = 0; s <= t; ++s) acc += scale * ds[s] * k_j[s * k_stride + i];
      dq_t[i] = acc;
    }
    float* dk_j = dk + sh.at(b, 0, j, sh.d_qk);
    for (int64_t idx = threadIdx.x; idx < (t + 1) * sh.d_qk; idx += blockDim.x) {
      const int64_t s = idx / sh.d_qk, i = idx % sh.d_qk;
      atomicAdd(dk_j + s * k_stride + i, scale * ds[s] * q_s[i]);
    }
    for (int64_t idx = threadIdx.x; idx < (t + 1) * width; idx += blockDim.x) {
      const int64_t s = idx / width, i = idx % width;
      atomicAdd(dv_g + s * v_stride + i, p[s] * coef * do_s[i]);
    }
    __syncthreads();  // q_s, p, ds are reused by the next component
  }
}

// dlambda[0] = −Σ dout ⊙ o2 (overwritten): one block, double, fixed order.
__global__ void dlambda_kernel(float* dlambda, const float* dout, const float* o2, int64_t n) {
  __shared__ double red[kWarp];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(dout[i]) * o2[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) dlambda[0] = static_cast<float>(-s);
}

// Dynamic shared memory for one block, raising the kernel's limit above the 48 KB default when needed.
template <class Kernel>
size_t attention_smem(CudaBackend& be, Kernel kernel, size_t floats, std::string_view op, const AttnDims& d) {
  const size_t bytes = floats * sizeof(float);
  DIFFMOE_CHECK(bytes <= be.max_shared_bytes(),
                "[{}] T = {} needs {} bytes of shared memory per block, the device allows {} (the flash kernels "
                "have no such limit: d_qk in {{32, 48, 96, 128}}, comps·d_v in {{32, 64, 128}})",
                op, d.seq, bytes, be.max_shared_bytes());
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

dim3 attention_grid(const AttnDims& d, std::string_view op) {
  DIFFMOE_CHECK(d.groups <= 65535 && d.batch <= 65535 && d.seq <= INT32_MAX,
                "[{}] grid too large: B = {}, groups = {}, T = {}", op, d.batch, d.groups, d.seq);
  return dim3(static_cast<unsigned>(d.seq), static_cast<unsigned>(d.groups), static_cast<unsigned>(d.batch));
}

// Whether the tensor-core kernels run this call: the bf16 GEMM mode, the flash kernel choice, a shape
// and device they cover.
bool tc_selected(const CudaBackend& be, const AttnDims& d) {
  return be.gemm_precision() == GemmPrecision::kBF16 && be.attention_kernel() == CudaBackend::AttentionKernel::kFlash &&
         tc_attention_covers(d);
}

// The f32 kernels' stand-ins for a call's bf16 tensors: f32 buffers carved out of the backend's
// operand buffer, one per bf16 tensor of `tensors` (others, and undefined ones, as they are);
// inputs[i] says whether tensor i is read (widened into its buffer) or only written (finish()
// rounds its buffer into it once). Ops on one stream run in order, so the buffer is free again
// for the next op once this call's kernels are queued.
template <size_t N>
class F32Stand {
 public:
  F32Stand(CudaBackend& be, cudaStream_t s, const std::array<const Tensor*, N>& tensors,
           const std::array<bool, N>& inputs, std::string_view op)
      : s_(s), op_(op) {
    size_t bytes = 0;
    std::array<size_t, N> at{};
    for (size_t i = 0; i < N; ++i) {
      at[i] = bytes;
      if (is_bf16(*tensors[i])) bytes += align256(static_cast<size_t>(tensors[i]->numel()) * sizeof(float));
    }
    char* base = bytes == 0 ? nullptr : static_cast<char*>(be.gemm_bf16_scratch(bytes));
    for (size_t i = 0; i < N; ++i) {
      const Tensor& t = *tensors[i];
      views_[i] = t;
      if (!is_bf16(t)) continue;
      views_[i].dtype = DType::kF32;
      views_[i].data = base + at[i];
      if (inputs[i]) bf16_to_f32(f32(views_[i]), t.data, t.numel(), s, op);
      else outputs_[n_outputs_++] = {&t, i};
    }
  }
  const Tensor& operator[](size_t i) const { return views_[i]; }
  void finish() const {
    for (size_t j = 0; j < n_outputs_; ++j) {
      const auto [t, i] = outputs_[j];
      f32_to_bf16(t->data, f32(views_[i]), t->numel(), s_, op_);
    }
  }

 private:
  static bool is_bf16(const Tensor& t) { return t.dtype == DType::kBF16 && t.numel() > 0; }
  cudaStream_t s_;
  std::string_view op_;
  std::array<Tensor, N> views_{};
  std::array<std::pair<const Tensor*, size_t>, N> outputs_{};
  size_t n_outputs_ = 0;
};

// The split's sizes as the kernels take them, and whether they allow float4 pieces.
KvSplitShape kv_split_shape(int64_t n_heads, int64_t d_nope, int64_t d_rope, int64_t d_v, int64_t kr_stride,
                            int64_t kr_offset, std::string_view op) {
  DIFFMOE_CHECK(n_heads <= INT32_MAX / 4 && d_nope + d_rope + d_v <= INT32_MAX / 4,
                "[{}] {} heads of {} + {} + {} columns exceed the kernels' 32-bit item numbers", op, n_heads, d_nope,
                d_rope, d_v);
  return KvSplitShape{.n_heads = static_cast<int32_t>(n_heads),
                      .d_nope = static_cast<int32_t>(d_nope),
                      .d_rope = static_cast<int32_t>(d_rope),
                      .d_v = static_cast<int32_t>(d_v),
                      .kr_stride = kr_stride,
                      .kr_offset = kr_offset};
}
bool kv_split_vec4(const KvSplitShape& sh, std::initializer_list<const float*> ptrs) {
  if (!vec_sizes({sh.d_nope, sh.d_rope, sh.d_v, sh.kr_stride, sh.kr_offset})) return false;
  for (const float* p : ptrs)
    if (!vec_aligned(p)) return false;
  return true;
}

// The simple backward kernels (f32 tensors only).
void simple_attention_bwd(CudaBackend& be, cudaStream_t s, const AttentionBwdArgs& a, const AttnDims& d) {
  constexpr std::string_view kOp = "attention_bwd";
  // dk and dv are overwritten: zero them, then every query row adds its contribution.
  CUDA_CHECK(cudaMemsetAsync(a.dk.data, 0, a.dk.nbytes(), s));
  CUDA_CHECK(cudaMemsetAsync(a.dv.data, 0, a.dv.nbytes(), s));
  const size_t floats = static_cast<size_t>(d.d_qk + d.comps * d.d_v + 2 * d.seq);
  const size_t smem = attention_smem(be, attention_bwd_kernel, floats, kOp, d);
  attention_bwd_kernel<<<attention_grid(d, kOp), kAttnThreads, smem, s>>>(
      f32(a.dq), f32(a.dk), f32(a.dv), f32(a.dout), f32(a.q), f32(a.k), f32(a.v), f32(a.out),
      a.differential ? f32(a.o2) : nullptr, f32(a.lse), a.differential ? f32(a.lambda) : nullptr, shape_of(d),
      static_cast<float>(a.scale));
  CUDA_CHECK_LAUNCH(kOp);
  if (a.differential) {
    dlambda_kernel<<<1, 1024, 0, s>>>(f32(a.dlambda), f32(a.dout), f32(a.o2), a.dout.numel());
    CUDA_CHECK_LAUNCH(kOp);
  }
}

}  // namespace

void CudaBackend::mla_kv_split_fwd(Context ctx, const MlaKvSplitFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "mla_kv_split_fwd");
  constexpr std::string_view kOp = "mla_kv_split_fwd";
  const KvSplitDims d = validate_mla_kv_split_fwd(a, Device::kCUDA);
  require_f32(a.kr, kOp);
  if (d.rows * a.n_heads * (d.d_qk + a.d_v) == 0) return;
  const KvSplitShape sh = kv_split_shape(a.n_heads, a.d_nope, a.d_rope, a.d_v, d.kr_stride, a.kr_offset, kOp);
  const auto launch = [&](auto* k, auto* v, const auto* kv) {
    using Out = std::remove_pointer_t<decltype(k)>;
    using In = std::remove_const_t<std::remove_pointer_t<decltype(kv)>>;
    const bool vec4 = kv_split_vec4(sh, {f32(a.kr)}) && vec_aligned(kv) && vec_aligned(k) && vec_aligned(v);
    const int64_t step = vec4 ? kVec : 1;
    const RowItems ri = row_items(d.rows, a.n_heads * (d.d_qk + a.d_v) / step, kOp);
    if (vec4)
      kv_split_fwd_kernel<Out, In, true><<<row_items_grid(ri), kThreads, 0, stream(ctx)>>>(k, v, kv, f32(a.kr), ri, sh);
    else
      kv_split_fwd_kernel<Out, In, false>
          <<<row_items_grid(ri), kThreads, 0, stream(ctx)>>>(k, v, kv, f32(a.kr), ri, sh);
    CUDA_CHECK_LAUNCH(kOp);
  };
  const auto with_kv = [&](auto* k, auto* v) {
    if (a.kv.dtype == DType::kBF16) launch(k, v, static_cast<const __nv_bfloat16*>(a.kv.data));
    else launch(k, v, static_cast<const float*>(a.kv.data));
  };
  if (a.k.dtype == DType::kBF16) with_kv(static_cast<__nv_bfloat16*>(a.k.data), static_cast<__nv_bfloat16*>(a.v.data));
  else with_kv(f32(a.k), f32(a.v));
}

void CudaBackend::mla_kv_split_bwd(Context ctx, const MlaKvSplitBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "mla_kv_split_bwd");
  constexpr std::string_view kOp = "mla_kv_split_bwd";
  const KvSplitDims d = validate_mla_kv_split_bwd(a, Device::kCUDA);
  require_f32(a.dkr, kOp);
  const cudaStream_t s = stream(ctx);
  if (d.rows == 0) return;
  const KvSplitShape sh = kv_split_shape(a.n_heads, a.d_nope, a.d_rope, a.d_v, d.kr_stride, a.kr_offset, kOp);
  // dk, dv: f32 or bf16 (one dtype, validate_mla_kv_split_bwd); dkv: f32 or bf16 (the bf16 GEMM mode).
  const auto run = [&](const auto* dk, const auto* dv, auto* dkv) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(dk)>>;
    using Out = std::remove_pointer_t<decltype(dkv)>;
    const bool vec4 = kv_split_vec4(sh, {f32(a.dkr)}) && vec_aligned(dk) && vec_aligned(dv) && vec_aligned(dkv);
    const int64_t step = vec4 ? kVec : 1;
    if (a.n_heads * (a.d_nope + a.d_v) > 0) {
      const RowItems ri = row_items(d.rows, a.n_heads * (a.d_nope + a.d_v) / step, kOp);
      if (vec4) kv_split_bwd_kv_kernel<Out, In, true><<<row_items_grid(ri), kThreads, 0, s>>>(dkv, dk, dv, ri, sh);
      else kv_split_bwd_kv_kernel<Out, In, false><<<row_items_grid(ri), kThreads, 0, s>>>(dkv, dk, dv, ri, sh);
      CUDA_CHECK_LAUNCH(kOp);
    }
    if (a.d_rope > 0) {
      const RowItems ri = row_items(d.rows, a.d_rope / step, kOp);
      if (vec4) kv_split_bwd_kr_kernel<In, true><<<row_items_grid(ri), kThreads, 0, s>>>(f32(a.dkr), dk, ri, sh);
      else kv_split_bwd_kr_kernel<In, false><<<row_items_grid(ri), kThreads, 0, s>>>(f32(a.dkr), dk, ri, sh);
      CUDA_CHECK_LAUNCH(kOp);
    }
  };
  const auto with_out = [&](const auto* dk, const auto* dv) {
    if (a.dkv.dtype == DType::kBF16) run(dk, dv, static_cast<__nv_bfloat16*>(a.dkv.data));
    else run(dk, dv, f32(a.dkv));
  };
  if (a.dk.dtype == DType::kBF16)
    with_out(static_cast<const __nv_bfloat16*>(a.dk.data), static_cast<const __nv_bfloat16*>(a.dv.data));
  else with_out(static_cast<const float*>(a.dk.data), static_cast<const float*>(a.dv.data));
}

void CudaBackend::diff_lambda_fwd(Context ctx, const DiffLambdaFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "diff_lambda_fwd");
  validate_diff_lambda_fwd(a, Device::kCUDA);
  require_f32(a.lq1, "diff_lambda_fwd");
  diff_lambda_fwd_kernel<<<1, kThreads, 0, stream(ctx)>>>(f32(a.lambda), f32(a.lq1), f32(a.lk1), f32(a.lq2), f32(a.lk2),
                                                          a.lq1.numel(), a.lambda_init);
  CUDA_CHECK_LAUNCH("diff_lambda_fwd");
}

void CudaBackend::diff_lambda_bwd(Context ctx, const DiffLambdaBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "diff_lambda_bwd");
  validate_diff_lambda_bwd(a, Device::kCUDA);
  require_f32(a.lq1, "diff_lambda_bwd");
  diff_lambda_bwd_kernel<<<1, kThreads, 0, stream(ctx)>>>(f32(a.dlq1), f32(a.dlk1), f32(a.dlq2), f32(a.dlk2),
                                                          f32(a.dlambda), f32(a.lq1), f32(a.lk1), f32(a.lq2),
                                                          f32(a.lk2), a.lq1.numel());
  CUDA_CHECK_LAUNCH("diff_lambda_bwd");
}

void CudaBackend::attention_fwd(Context ctx, const AttentionFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "attention_fwd");
  constexpr std::string_view kOp = "attention_fwd";
  const AttnDims d = validate_attention_fwd(a, Device::kCUDA);
  require_f32(a.out, kOp);
  if (d.batch == 0 || d.seq == 0) return;
  if (tc_selected(*this, d)) {
    tc_attention_fwd(*this, stream(ctx), a, d);
    return;
  }
  // The f32 kernels: bf16 q, k, v widened (F32Stand).
  const F32Stand<3> in(*this, stream(ctx), {&a.q, &a.k, &a.v}, {true, true, true}, kOp);
  AttentionFwdArgs f = a;
  f.q = in[0];
  f.k = in[1];
  f.v = in[2];
  if (attention_kernel_ == AttentionKernel::kFlash && flash_attention_covers(d)) {
    flash_attention_fwd(*this, stream(ctx), f, d);
    return;
  }
  const size_t smem = attention_smem(*this, attention_fwd_kernel, static_cast<size_t>(d.d_qk + d.seq), kOp, d);
  attention_fwd_kernel<<<attention_grid(d, kOp), kAttnThreads, smem, stream(ctx)>>>(
      f32(f.out), f.differential ? f32(f.o2) : nullptr, f32(f.lse), f32(f.q), f32(f.k), f32(f.v),
      f.differential ? f32(f.lambda) : nullptr, shape_of(d), static_cast<float>(f.scale));
  CUDA_CHECK_LAUNCH(kOp);
}

void CudaBackend::attention_bwd(Context ctx, const AttentionBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "attention_bwd");
  constexpr std::string_view kOp = "attention_bwd";
  const AttnDims d = validate_attention_bwd(a, Device::kCUDA);
  require_f32(a.out, kOp);
  const cudaStream_t s = stream(ctx);
  if (d.batch == 0 || d.seq == 0) {
    if (a.differential) CUDA_CHECK(cudaMemsetAsync(a.dlambda.data, 0, sizeof(float), s));
    return;
  }
  if (tc_selected(*this, d)) {
    tc_attention_bwd(*this, s, a, d);
    return;
  }
  // The f32 kernels: bf16 q, k, v widened, bf16 dq, dk, dv computed in f32 and rounded once (F32Stand).
  const F32Stand<6> st(*this, s, {&a.q, &a.k, &a.v, &a.dq, &a.dk, &a.dv}, {true, true, true, false, false, false}, kOp);
  AttentionBwdArgs f = a;
  f.q = st[0];
  f.k = st[1];
  f.v = st[2];
  f.dq = st[3];
  f.dk = st[4];
  f.dv = st[5];
  if (attention_kernel_ == AttentionKernel::kFlash && flash_attention_covers(d)) {
    flash_attention_bwd(*this, s, f, d);
    st.finish();
    return;
  }
  simple_attention_bwd(*this, s, f, d);
  st.finish();
}

}  // namespace diffmoe
