// DiffMLA attention core on the CPU (docs/model.md §2; docs/derivations.md §1.3-1.4, §2.3-2.5, §3.2 Design A).
//
// Design: the naive reference. Every query row runs a two-pass causal softmax in the op's float
// type (pass 1: max of the scaled scores over s ≤ t; pass 2: max-subtracted exp, sum and P·V), so
// no scratch is needed; the backward recomputes the probabilities from the saved lse.
//
// One kernel serves both modes through "value groups": a group is a differential head g with
// components j = 2g, 2g+1 sharing the value V_g = [v_2g ; v_2g+1] (2·d_v wide, which is simply
// heads 2g and 2g+1 of v side by side in memory), or a plain head h (one component, value v_h).
// OpenMP runs over (batch, group): a group owns its lse rows, its output columns, its dq rows and
// the dk/dv slices of its heads, so threads never share an output and results are deterministic.
//
// bf16 tensors (f32 calls, the bf16 GEMM mode's attention operands: op_args.h): the split's bf16 kv,
// k, v and dk, dv, dkv, and the attention's q, k, v and dq, dk, dv pass through f32 buffers
// (bf16_staging.h): inputs widened exactly, outputs the f32 result rounded once.
#include "backend/cpu/bf16_staging.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace diffmoe {

namespace {

// ================================================================ MLA key/value split (§2.3, §2.5)
// k[n, h] = [kv[n, h, :d_nope] ; kr[n]],  v[n, h] = kv[n, h, d_nope:]
template <class T>
void kv_split_fwd_impl(const MlaKvSplitFwdArgs& a, const KvSplitDims& d) {  // a: f32 or f64 tensors only
  T* k = a.k.ptr<T>();
  T* v = a.v.ptr<T>();
  const T* kv = a.kv.ptr<T>();
  const T* kr = a.kr.ptr<T>();
  const int64_t kv_head = a.d_nope + a.d_v;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < d.rows; ++n) {
    const T* kr_row = kr + n * d.kr_stride + a.kr_offset;
    for (int64_t h = 0; h < a.n_heads; ++h) {
      const T* src = kv + (n * a.n_heads + h) * kv_head;
      T* k_row = k + (n * a.n_heads + h) * d.d_qk;
      T* v_row = v + (n * a.n_heads + h) * a.d_v;
      std::copy(src, src + a.d_nope, k_row);
      std::copy(kr_row, kr_row + a.d_rope, k_row + a.d_nope);
      std::copy(src + a.d_nope, src + kv_head, v_row);
    }
  }
}

// dkv[n, h] = [dk[n, h, :d_nope] ; dv[n, h]];  dkr[n] = Σ_h dk[n, h, d_nope:] (docs/derivations.md §2.5)
template <class T>
void kv_split_bwd_impl(const MlaKvSplitBwdArgs& a, const KvSplitDims& d) {  // a: f32 or f64 tensors only
  T* dkv = a.dkv.ptr<T>();
  T* dkr = a.dkr.ptr<T>();
  const T* dk = a.dk.ptr<T>();
  const T* dv = a.dv.ptr<T>();
  const int64_t kv_head = a.d_nope + a.d_v;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < d.rows; ++n) {
    T* dkr_row = dkr + n * d.kr_stride + a.kr_offset;
    std::fill(dkr_row, dkr_row + a.d_rope, T(0));
    for (int64_t h = 0; h < a.n_heads; ++h) {
      T* dst = dkv + (n * a.n_heads + h) * kv_head;
      const T* dk_row = dk + (n * a.n_heads + h) * d.d_qk;
      const T* dv_row = dv + (n * a.n_heads + h) * a.d_v;
      std::copy(dk_row, dk_row + a.d_nope, dst);
      std::copy(dv_row, dv_row + a.d_v, dst + a.d_nope);
      for (int64_t i = 0; i < a.d_rope; ++i) dkr_row[i] += dk_row[a.d_nope + i];
    }
  }
}

// ================================================================ differential λ (§1.2, §1.4)
// The two dot products of λ, accumulated in double (short sums; λ is FP32 or better, docs/model.md §9).
template <class T>
double dot_vec(const Tensor& a, const Tensor& b) {
  double s = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i) s += static_cast<double>(a.ptr<T>()[i]) * static_cast<double>(b.ptr<T>()[i]);
  return s;
}

// ================================================================ causal attention (§1.3, §3.2)
template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = T(0);
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Element offset of row (b, t, head h) in a [B, T, H, width] tensor.
inline int64_t at(const AttnDims& d, int64_t b, int64_t t, int64_t h, int64_t width) {
  return ((b * d.seq + t) * d.heads + h) * width;
}

// One query row t of one component: o[0, W) = Σ_{s≤t} softmax_s(z)·V_s with z_s = scale·q_t·k_s.
// k points at key s = 0 of the head (rows k_stride apart), vv at value row s = 0 (v_stride apart).
// Returns lse = m + ln Σ_s exp(z_s − m).
template <class T>
T attend_row(T* o, const T* q_t, const T* k, int64_t k_stride, const T* vv, int64_t v_stride, int64_t width, int64_t t,
             int64_t d_qk, T scale) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t s = 0; s <= t; ++s) m = std::max(m, scale * dot(q_t, k + s * k_stride, d_qk));
  std::fill(o, o + width, T(0));
  T l = T(0);
  for (int64_t s = 0; s <= t; ++s) {
    const T p = std::exp(scale * dot(q_t, k + s * k_stride, d_qk) - m);
    l += p;
    const T* v_s = vv + s * v_stride;
    for (int64_t i = 0; i < width; ++i) o[i] += p * v_s[i];
  }
  const T inv_l = T(1) / l;
  for (int64_t i = 0; i < width; ++i) o[i] *= inv_l;
  return m + std::log(l);
}

// Backward of one query row t of one component (docs/derivations.md §1.4), with dO_c = coef·dO:
//   p_s = exp(z_s − lse),  dS_s = p_s·(dO_c·V_s − D_c),
//   dq_t += scale·Σ_s dS_s k_s,  dk_s += scale·dS_s q_t,  dV_s += p_s dO_c.
template <class T>
void attend_row_bwd(T* dq_t, T* dk, T* dvv, const T* q_t, const T* k, int64_t k_stride, const T* vv, int64_t v_stride,
                    int64_t width, const T* dout_t, T coef, T d_c, T lse, int64_t t, int64_t d_qk, T scale) {
  for (int64_t s = 0; s <= t; ++s) {
    const T* k_s = k + s * k_stride;
    const T* v_s = vv + s * v_stride;
    const T p = std::exp(scale * dot(q_t, k_s, d_qk) - lse);
    const T ds = p * (coef * dot(dout_t, v_s, width) - d_c);
    T* dk_s = dk + s * k_stride;
    for (int64_t i = 0; i < d_qk; ++i) {
      dq_t[i] += scale * ds * k_s[i];
      dk_s[i] += scale * ds * q_t[i];
    }
    T* dv_s = dvv + s * v_stride;
    const T pc = p * coef;
    for (int64_t i = 0; i < width; ++i) dv_s[i] += pc * dout_t[i];
  }
}

template <class T>
void attention_fwd_impl(const AttentionFwdArgs& a, const AttnDims& d) {
  const T* q = a.q.ptr<T>();
  const T* k = a.k.ptr<T>();
  const T* v = a.v.ptr<T>();
  T* out = a.out.ptr<T>();
  T* o2 = a.differential ? a.o2.ptr<T>() : nullptr;
  T* lse = a.lse.ptr<T>();
  const T lambda = a.differential ? a.lambda.ptr<T>()[0] : T(0);
  const T scale = static_cast<T>(a.scale);
  const int64_t width = d.comps * d.d_v;  // value width of a group: 2·d_v (differential) or d_v
  const int64_t k_stride = d.heads * d.d_qk, v_stride = d.heads * d.d_v;
#pragma omp parallel for schedule(static)
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    const int64_t b = bg / d.groups, g = bg % d.groups;
    const int64_t first = d.comps * g;  // first component head of the group; also V_g's first v head
    for (int64_t c = 0; c < d.comps; ++c) {
      const int64_t j = first + c;
      T* dst = c == 0 ? out : o2;  // component 0 → out (A_{g,0}V_g for now), component 1 → o2
      for (int64_t t = 0; t < d.seq; ++t) {
        lse[(b * d.heads + j) * d.seq + t] =
            attend_row(dst + at(d, b, t, first, d.d_v), q + at(d, b, t, j, d.d_qk), k + at(d, b, 0, j, d.d_qk),
                       k_stride, v + at(d, b, 0, first, d.d_v), v_stride, width, t, d.d_qk, scale);
      }
    }
    if (a.differential) {
      // O_g = A_{g,0}V_g − λ·A_{g,1}V_g (docs/derivations.md §1.3 step 6, on the outputs: identical by linearity)
      for (int64_t t = 0; t < d.seq; ++t) {
        T* o_row = out + at(d, b, t, first, d.d_v);
        const T* o2_row = o2 + at(d, b, t, first, d.d_v);
        for (int64_t i = 0; i < width; ++i) o_row[i] -= lambda * o2_row[i];
      }
    }
  }
}

template <class T>
void attention_bwd_impl(const AttentionBwdArgs& a, const AttnDims& d) {
  const T* q = a.q.ptr<T>();
  const T* k = a.k.ptr<T>();
  const T* v = a.v.ptr<T>();
  const T* out = a.out.ptr<T>();
  const T* o2 = a.differential ? a.o2.ptr<T>() : nullptr;
  const T* lse = a.lse.ptr<T>();
  const T* dout = a.dout.ptr<T>();
  T* dq = a.dq.ptr<T>();
  T* dk = a.dk.ptr<T>();
  T* dv = a.dv.ptr<T>();
  const T lambda = a.differential ? a.lambda.ptr<T>()[0] : T(0);
  const T scale = static_cast<T>(a.scale);
  const int64_t width = d.comps * d.d_v;
  const int64_t k_stride = d.heads * d.d_qk, v_stride = d.heads * d.d_v;
#pragma omp parallel for schedule(static)
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    const int64_t b = bg / d.groups, g = bg % d.groups;
    const int64_t first = d.comps * g;
    // This group owns dk, dv of heads first … first+comps−1 for batch b: zero them, then accumulate.
    for (int64_t s = 0; s < d.seq; ++s) {
      std::fill_n(dk + at(d, b, s, first, d.d_qk), d.comps * d.d_qk, T(0));
      std::fill_n(dv + at(d, b, s, first, d.d_v), width, T(0));
    }
    for (int64_t c = 0; c < d.comps; ++c) {
      const int64_t j = first + c;
      // dO_0 = dO, dO_1 = −λ·dO (docs/derivations.md §1.4); a plain head is component 0 with O = out.
      const T coef = c == 0 ? T(1) : -lambda;
      for (int64_t t = 0; t < d.seq; ++t) {
        const int64_t row = at(d, b, t, first, d.d_v);
        const T* dout_t = dout + row;
        // D_c = rowsum(dO_c ⊙ O_c) with O_0 = out + λ·o2 (differential) or out (plain), O_1 = o2.
        T d_c = T(0);
        for (int64_t i = 0; i < width; ++i) {
          const T o_c = c == 1 ? o2[row + i] : (a.differential ? out[row + i] + lambda * o2[row + i] : out[row + i]);
          d_c += dout_t[i] * o_c;
        }
        d_c *= coef;
        T* dq_t = dq + at(d, b, t, j, d.d_qk);
        std::fill_n(dq_t, d.d_qk, T(0));
        attend_row_bwd(dq_t, dk + at(d, b, 0, j, d.d_qk), dv + at(d, b, 0, first, d.d_v), q + at(d, b, t, j, d.d_qk),
                       k + at(d, b, 0, j, d.d_qk), k_stride, v + at(d, b, 0, first, d.d_v), v_stride, width, dout_t,
                       coef, d_c, lse[(b * d.heads + j) * d.seq + t], t, d.d_qk, scale);
      }
    }
  }
  if (a.differential) {
    // dλ = −Σ⟨dO, O_2⟩ over batch, tokens and heads: a serial sum in double (deterministic; the sum
    // cancels, docs/model.md §9), overwritten.
    double acc = 0.0;
    for (int64_t i = 0; i < a.dout.numel(); ++i) acc += static_cast<double>(dout[i]) * static_cast<double>(o2[i]);
    a.dlambda.ptr<T>()[0] = static_cast<T>(-acc);
  }
}

}  // namespace

void CpuBackend::mla_kv_split_fwd(Context, const MlaKvSplitFwdArgs& a) {
  constexpr std::string_view op = "mla_kv_split_fwd";
  const KvSplitDims d = validate_mla_kv_split_fwd(a, Device::kCPU);
  Bf16Staging staged(scratch_);
  MlaKvSplitFwdArgs f = a;
  f.kv = staged.input(a.kv);
  f.k = staged.output(a.k);
  f.v = staged.output(a.v);
  dispatch_float(a.kr.dtype, op, [&]<class T>() { kv_split_fwd_impl<T>(f, d); });
  staged.finish();
}

void CpuBackend::mla_kv_split_bwd(Context, const MlaKvSplitBwdArgs& a) {
  constexpr std::string_view op = "mla_kv_split_bwd";
  const KvSplitDims d = validate_mla_kv_split_bwd(a, Device::kCPU);
  Bf16Staging staged(scratch_);
  MlaKvSplitBwdArgs f = a;
  f.dk = staged.input(a.dk);
  f.dv = staged.input(a.dv);
  f.dkv = staged.output(a.dkv);
  dispatch_float(a.dkr.dtype, op, [&]<class T>() { kv_split_bwd_impl<T>(f, d); });
  staged.finish();
}

// λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init   (docs/model.md §2, docs/derivations.md §1.2)
void CpuBackend::diff_lambda_fwd(Context, const DiffLambdaFwdArgs& a) {
  constexpr std::string_view op = "diff_lambda_fwd";
  validate_diff_lambda_fwd(a, Device::kCPU);
  dispatch_float(a.lq1.dtype, op, [&]<class T>() {
    const double lambda = std::exp(dot_vec<T>(a.lq1, a.lk1)) - std::exp(dot_vec<T>(a.lq2, a.lk2)) + a.lambda_init;
    a.lambda.ptr<T>()[0] = static_cast<T>(lambda);
  });
}

// e1 = exp(λ_q1·λ_k1), e2 = exp(λ_q2·λ_k2):
// dλ_q1 += dλ·e1·λ_k1, dλ_k1 += dλ·e1·λ_q1, dλ_q2 += −dλ·e2·λ_k2, dλ_k2 += −dλ·e2·λ_q2 (docs/derivations.md §1.4)
void CpuBackend::diff_lambda_bwd(Context, const DiffLambdaBwdArgs& a) {
  constexpr std::string_view op = "diff_lambda_bwd";
  validate_diff_lambda_bwd(a, Device::kCPU);
  dispatch_float(a.lq1.dtype, op, [&]<class T>() {
    const double dlambda = static_cast<double>(a.dlambda.ptr<T>()[0]);
    const double g1 = dlambda * std::exp(dot_vec<T>(a.lq1, a.lk1));   // dλ·e1
    const double g2 = -dlambda * std::exp(dot_vec<T>(a.lq2, a.lk2));  // −dλ·e2
    const T* lq1 = a.lq1.ptr<T>();
    const T* lk1 = a.lk1.ptr<T>();
    const T* lq2 = a.lq2.ptr<T>();
    const T* lk2 = a.lk2.ptr<T>();
    for (int64_t i = 0; i < a.lq1.numel(); ++i) {
      a.dlq1.ptr<T>()[i] += static_cast<T>(g1 * static_cast<double>(lk1[i]));
      a.dlk1.ptr<T>()[i] += static_cast<T>(g1 * static_cast<double>(lq1[i]));
      a.dlq2.ptr<T>()[i] += static_cast<T>(g2 * static_cast<double>(lk2[i]));
      a.dlk2.ptr<T>()[i] += static_cast<T>(g2 * static_cast<double>(lq2[i]));
    }
  });
}

void CpuBackend::attention_fwd(Context, const AttentionFwdArgs& a) {
  constexpr std::string_view op = "attention_fwd";
  const AttnDims d = validate_attention_fwd(a, Device::kCPU);
  Bf16Staging staged(scratch_);
  AttentionFwdArgs f = a;
  f.q = staged.input(a.q);
  f.k = staged.input(a.k);
  f.v = staged.input(a.v);
  dispatch_float(a.out.dtype, op, [&]<class T>() { attention_fwd_impl<T>(f, d); });
}

void CpuBackend::attention_bwd(Context, const AttentionBwdArgs& a) {
  constexpr std::string_view op = "attention_bwd";
  const AttnDims d = validate_attention_bwd(a, Device::kCPU);
  Bf16Staging staged(scratch_);
  AttentionBwdArgs f = a;
  f.q = staged.input(a.q);
  f.k = staged.input(a.k);
  f.v = staged.input(a.v);
  f.dq = staged.output(a.dq);
  f.dk = staged.output(a.dk);
  f.dv = staged.output(a.dv);
  dispatch_float(a.out.dtype, op, [&]<class T>() { attention_bwd_impl<T>(f, d); });
  staged.finish();
}

}  // namespace diffmoe
