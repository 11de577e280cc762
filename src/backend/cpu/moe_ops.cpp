// MoE routing and token dispatch on the CPU: the reference every fast kernel is checked against
// (docs/model.md §5; docs/derivations.md §4.2 forward, §4.4 backward of the weights, §4.5 bias update, §4.6 aux loss).
//
// Design:
// - Everything is per token and written as plain loops. Selection (the kept groups, the top-k
//   experts, the aux loss's plain top-k) is one helper: k passes of an arg-max with a strict '>',
//   so ties go to the lower index and the output is ordered by descending score.
// - Scores s and selection scores s + b are computed in the op's float type T, as the reference
//   code does in FP32, so a kernel doing the same arithmetic picks the same experts. Sums
//   (softmax denominators, Σw, dot products, the aux loss) accumulate in double.
// - Independent rows run under OpenMP; every sum across rows (counts, the aux loss, the gather
//   backward) runs in a fixed order, so no result depends on the number of threads.
// - Index tensors are validated before any parallel region (an exception must not leave one).
// - The only allocations are small host scratch vectors (one set per thread per call); the CPU
//   reference has no device arena to take them from.
// - bf16 rows (f32 calls, the bf16 GEMM mode's expert activations: x, x_perm, dx_perm, y_perm, dy,
//   dy_perm) pass through the backend's f32 buffers (bf16_staging.h): inputs widened exactly,
//   outputs the f32 result rounded once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "backend/cpu/bf16_staging.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using Acc = double;  // accumulator type of every sum below

// Below this many elements touched, a call runs on one thread: starting the team costs more than
// the loop (finite-difference checks call these ops thousands of times on 7-token inputs). Rows
// are independent, so the result is the same either way.
constexpr int64_t kMinParallelWork = int64_t{1} << 14;

// ------------------------------------------------------------------ validation helpers

// Every entry of an i32 tensor lies in [0, limit).
// Every index in [0, limit), or -1 (an unused slot) where `unused_ok`.
void expect_indices(const Tensor& t, int64_t limit, std::string_view op, std::string_view name,
                    bool unused_ok = false) {
  const int32_t* v = t.ptr<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    DIFFMOE_CHECK((v[i] >= 0 && v[i] < limit) || (unused_ok && v[i] == -1), "[{}] {}[{}] = {} is outside [0, {}){}", op,
                  name, i, v[i], limit, unused_ok ? " and not -1" : "");
}

// ------------------------------------------------------------------ per-token building blocks

// Candidate states for top_k_by_argmax.
enum : uint8_t { kExcluded = 0, kCandidate = 1, kChosen = 2 };

// Picks the k largest `score[i]` among entries with state kCandidate, in descending order, ties to
// the lower index (strict '>' below keeps the first maximum). Marks them kChosen and, when `out`
// is given, writes their indices to out[0..k). The caller guarantees at least k candidates.
template <class T>
void top_k_by_argmax(const T* score, uint8_t* state, int64_t n, int64_t k, int32_t* out) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (state[i] != kCandidate) continue;
      if (best < 0 || score[i] > score[best]) best = i;
    }
    if (best < 0) return;  // fewer than k candidates: excluded by the callers' validation
    state[best] = kChosen;
    if (out != nullptr) out[j] = static_cast<int32_t>(best);
  }
}

// s = sigmoid(z) or softmax(z) over the E experts of one token (docs/derivations.md §4.2).
template <class T>
void score_row(const T* z, T* s, int64_t n_experts, ScoreFunc func) {
  if (func == ScoreFunc::kSigmoid) {
    for (int64_t e = 0; e < n_experts; ++e) s[e] = T(1) / (T(1) + std::exp(-z[e]));
    return;
  }
  T z_max = z[0];
  for (int64_t e = 1; e < n_experts; ++e) z_max = std::max(z_max, z[e]);
  Acc denom = 0;
  for (int64_t e = 0; e < n_experts; ++e) denom += std::exp(static_cast<Acc>(z[e] - z_max));
  for (int64_t e = 0; e < n_experts; ++e) s[e] = static_cast<T>(std::exp(static_cast<Acc>(z[e] - z_max)) / denom);
}

// Group score (docs/derivations.md §4.2): sum of the two largest selection scores of the group when the
// balancing bias is on (V3 "noaux_tc"), the largest one when it is off (V2 "group_limited_greedy").
template <class T>
T group_score(const T* sel, int64_t group_size, bool top2_sum) {
  int64_t first = 0;
  for (int64_t j = 1; j < group_size; ++j)
    if (sel[j] > sel[first]) first = j;
  if (!top2_sum) return sel[first];
  int64_t second = -1;
  for (int64_t j = 0; j < group_size; ++j)
    if (j != first && (second < 0 || sel[j] > sel[second])) second = j;
  return sel[first] + sel[second];
}

// Host scratch for routing one token at a time; one per thread.
template <class T>
struct RouteScratch {
  RouteScratch(int64_t n_experts, int64_t n_groups)
      : sel(n_experts), state(n_experts), group_sel(n_groups), group_state(n_groups) {}
  std::vector<T> sel;                // [E] s + b
  std::vector<uint8_t> state;        // [E] candidate / excluded / chosen
  std::vector<T> group_sel;          // [G] group scores
  std::vector<uint8_t> group_state;  // [G] kept groups end up kChosen
};

// Routes one token (docs/model.md §5, docs/derivations.md §4.2): idx [K] and w [K] from scores s [E] and bias b [E].
template <class T>
void route_token(const T* s, const T* bias, const RouterOptions& opt, int64_t n_experts, RouteScratch<T>& scratch,
                 int32_t* idx, T* w) {
  T* sel = scratch.sel.data();
  uint8_t* state = scratch.state.data();
  // s_sel = s + b: the bias only ever takes part in the selection.
  for (int64_t e = 0; e < n_experts; ++e) sel[e] = opt.use_bias ? s[e] + bias[e] : s[e];

  // Group limit: keep the n_limited groups with the largest group score; the experts of the other
  // groups are excluded (the −inf mask of the reference).
  if (opt.n_groups > 1) {
    const int64_t group_size = n_experts / opt.n_groups;
    for (int64_t g = 0; g < opt.n_groups; ++g) {
      scratch.group_sel[g] = group_score(sel + g * group_size, group_size, opt.use_bias);
      scratch.group_state[g] = kCandidate;
    }
    top_k_by_argmax(scratch.group_sel.data(), scratch.group_state.data(), opt.n_groups, opt.n_limited_groups, nullptr);
    for (int64_t e = 0; e < n_experts; ++e)
      state[e] = scratch.group_state[e / group_size] == kChosen ? kCandidate : kExcluded;
  } else {
    for (int64_t e = 0; e < n_experts; ++e) state[e] = kCandidate;
  }
  top_k_by_argmax(sel, state, n_experts, opt.top_k, idx);

  // w = s[idx] (unbiased); sigmoid: w /= Σw; w *= route_scale.
  Acc denom = 1;
  if (opt.score_func == ScoreFunc::kSigmoid) {
    denom = 0;
    for (int64_t k = 0; k < opt.top_k; ++k) denom += s[idx[k]];
  }
  for (int64_t k = 0; k < opt.top_k; ++k) w[k] = static_cast<T>(opt.route_scale * (s[idx[k]] / denom));
}

// ------------------------------------------------------------------ router

template <class T>
void router_fwd_impl(const RouterFwdArgs& a) {
  const int64_t n_tokens = a.logits.dim(0), n_experts = a.logits.dim(1);
  const RouterOptions& opt = a.opt;
  const T* z = a.logits.ptr<T>();
  const T* bias = opt.use_bias ? a.bias.ptr<T>() : nullptr;
  T* s = a.scores.ptr<T>();
  int32_t* idx = a.topk_idx.ptr<int32_t>();
  T* w = a.topk_w.ptr<T>();

#pragma omp parallel if (n_tokens * n_experts >= kMinParallelWork)
  {
    RouteScratch<T> scratch(n_experts, opt.n_groups);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < n_tokens; ++n) {
      score_row(z + n * n_experts, s + n * n_experts, n_experts, opt.score_func);
      route_token(s + n * n_experts, bias, opt, n_experts, scratch, idx + n * opt.top_k, w + n * opt.top_k);
    }
  }
  // counts[e] += number of (token, slot) assignments to e; serial, so exact and ordered.
  int32_t* counts = a.counts.ptr<int32_t>();
  for (int64_t i = 0; i < n_tokens * opt.top_k; ++i) ++counts[idx[i]];
}

// Backward of the routing weights only (docs/derivations.md §4.4); selection and bias are constants.
template <class T>
void router_bwd_impl(const RouterBwdArgs& a) {
  const int64_t n_tokens = a.scores.dim(0), n_experts = a.scores.dim(1), top_k = a.opt.top_k;
  const Acc scale = a.opt.route_scale;
  const T* s_all = a.scores.ptr<T>();
  const T* dw_all = a.dtopk_w.ptr<T>();
  const int32_t* idx_all = a.topk_idx.ptr<int32_t>();
  T* dz_all = a.dlogits.ptr<T>();

#pragma omp parallel for schedule(static) if (n_tokens * n_experts >= kMinParallelWork)
  for (int64_t n = 0; n < n_tokens; ++n) {
    const T* s = s_all + n * n_experts;
    const T* dw = dw_all + n * top_k;
    const int32_t* idx = idx_all + n * top_k;
    T* dz = dz_all + n * n_experts;
    if (a.opt.score_func == ScoreFunc::kSigmoid) {
      // S = Σ_{k∈idx} s_k, ŵ_k = s_k/S, dŵ_k = route_scale·dw_k,
      // ds_k = (dŵ_k − Σ_j ŵ_j dŵ_j)/S on idx (0 elsewhere), dz = ds ⊙ s ⊙ (1 − s).
      Acc sum_s = 0;
      for (int64_t k = 0; k < top_k; ++k) sum_s += s[idx[k]];
      Acc w_dot_dw = 0;
      for (int64_t k = 0; k < top_k; ++k) w_dot_dw += (s[idx[k]] / sum_s) * (scale * dw[k]);
      for (int64_t e = 0; e < n_experts; ++e) dz[e] = T(0);
      for (int64_t k = 0; k < top_k; ++k) {
        const Acc s_k = s[idx[k]];
        const Acc ds_k = (scale * dw[k] - w_dot_dw) / sum_s;
        dz[idx[k]] = static_cast<T>(ds_k * s_k * (1 - s_k));
      }
    } else {
      // Softmax, no renormalisation: dp_k = route_scale·dw_k on idx (0 elsewhere),
      // dz = p ⊙ (dp − Σ_j p_j dp_j).
      Acc p_dot_dp = 0;
      for (int64_t k = 0; k < top_k; ++k) p_dot_dp += s[idx[k]] * (scale * dw[k]);
      for (int64_t e = 0; e < n_experts; ++e) dz[e] = static_cast<T>(-static_cast<Acc>(s[e]) * p_dot_dp);
      for (int64_t k = 0; k < top_k; ++k) {
        const Acc p_k = s[idx[k]];
        dz[idx[k]] = static_cast<T>(p_k * (scale * dw[k] - p_dot_dp));
      }
    }
  }
}

// ------------------------------------------------------------------ sequence-wise aux loss

// Per-sequence quantities of docs/derivations.md §4.6 for tokens [t0, t0 + T) of `s` [N, E]:
//   f_i = E/(K·T) · Σ_t 1[i ∈ plain top-K of s_t]   (unbiased scores, no groups, no gradient)
// and the normaliser of s'_{i,t} = s_{i,t} / Σ_j s_{j,t} per token (1 for softmax scores, which
// already sum to one, so s' = s there).
template <class T>
struct AuxSequence {
  explicit AuxSequence(int64_t n_experts) : f(n_experts), state(n_experts), picks(0) {}
  std::vector<Acc> f;
  std::vector<uint8_t> state;
  std::vector<int32_t> picks;

  void compute_f(const T* s, int64_t seq_len, int64_t n_experts, int64_t top_k) {
    picks.resize(top_k);
    for (int64_t i = 0; i < n_experts; ++i) f[i] = 0;
    for (int64_t t = 0; t < seq_len; ++t) {
      for (int64_t i = 0; i < n_experts; ++i) state[i] = kCandidate;
      top_k_by_argmax(s + t * n_experts, state.data(), n_experts, top_k, picks.data());
      for (int64_t k = 0; k < top_k; ++k) f[picks[k]] += 1;
    }
    const Acc f_scale = static_cast<Acc>(n_experts) / static_cast<Acc>(top_k * seq_len);
    for (int64_t i = 0; i < n_experts; ++i) f[i] *= f_scale;
  }
};

template <class T>
Acc score_normaliser(const T* s, int64_t n_experts, ScoreFunc func) {
  if (func == ScoreFunc::kSoftmax) return 1;
  Acc sum = 0;
  for (int64_t e = 0; e < n_experts; ++e) sum += s[e];
  return sum;
}

// loss[0] += (1/B) Σ_b α Σ_i f_i P_i,  P_i = (1/T) Σ_t s'_{i,t}.
template <class T>
void aux_loss_fwd_impl(const AuxLossFwdArgs& a) {
  const int64_t n_tokens = a.scores.dim(0), n_experts = a.scores.dim(1), seq_len = a.seq_len;
  const int64_t n_seqs = n_tokens / seq_len;
  const T* s_all = a.scores.ptr<T>();
  AuxSequence<T> seq(n_experts);
  Acc total = 0;
  for (int64_t b = 0; b < n_seqs; ++b) {
    const T* s = s_all + b * seq_len * n_experts;
    seq.compute_f(s, seq_len, n_experts, a.top_k);
    Acc l_b = 0;  // Σ_i f_i Σ_t s'_{i,t}, summed token by token
    for (int64_t t = 0; t < seq_len; ++t) {
      const T* s_t = s + t * n_experts;
      const Acc norm = score_normaliser(s_t, n_experts, a.score_func);
      for (int64_t i = 0; i < n_experts; ++i) l_b += seq.f[i] * (s_t[i] / norm);
    }
    total += a.alpha * l_b / static_cast<Acc>(seq_len);
  }
  T* loss = a.loss.ptr<T>();
  loss[0] = static_cast<T>(loss[0] + total / static_cast<Acc>(n_seqs));
}

// dlogits += dloss · ∂(mean_b L_b)/∂z (docs/derivations.md §4.6, with the 1/B of the mean):
//   g_i = dloss · α f_i / (T·B)                      (= ∂L/∂s'_{i,t}, the same for every t)
//   sigmoid: ∂L/∂s_k = (g_k − Σ_i s'_i g_i) / Σ_j s_j,  dz_k = ∂L/∂s_k · s_k (1 − s_k)
//   softmax: s' = s,  dz_k = s_k (g_k − Σ_i s_i g_i)
template <class T>
void aux_loss_bwd_impl(const AuxLossBwdArgs& a) {
  const int64_t n_tokens = a.scores.dim(0), n_experts = a.scores.dim(1), seq_len = a.seq_len;
  const int64_t n_seqs = n_tokens / seq_len;
  const T* s_all = a.scores.ptr<T>();
  T* dz_all = a.dlogits.ptr<T>();
  AuxSequence<T> seq(n_experts);
  std::vector<Acc> g(n_experts);
  for (int64_t b = 0; b < n_seqs; ++b) {
    const int64_t t0 = b * seq_len;
    seq.compute_f(s_all + t0 * n_experts, seq_len, n_experts, a.top_k);
    for (int64_t i = 0; i < n_experts; ++i) g[i] = a.dloss * a.alpha * seq.f[i] / static_cast<Acc>(seq_len * n_seqs);
    for (int64_t t = t0; t < t0 + seq_len; ++t) {
      const T* s = s_all + t * n_experts;
      T* dz = dz_all + t * n_experts;
      const Acc norm = score_normaliser(s, n_experts, a.score_func);
      Acc s_dot_g = 0;  // Σ_i s'_i g_i
      for (int64_t i = 0; i < n_experts; ++i) s_dot_g += (s[i] / norm) * g[i];
      for (int64_t k = 0; k < n_experts; ++k) {
        const Acc s_k = s[k];
        const Acc dz_k =
            a.score_func == ScoreFunc::kSigmoid ? (g[k] - s_dot_g) / norm * s_k * (1 - s_k) : s_k * (g[k] - s_dot_g);
        dz[k] = static_cast<T>(dz[k] + dz_k);
      }
    }
  }
}

// ------------------------------------------------------------------ dispatch plan and data movement

// y[n] += Σ_k w[n,k] · y_perm[slot_pos[n,k]]
template <class T>
void combine_fwd_impl(const MoeCombineFwdArgs& a) {
  const int64_t n_tokens = a.y.dim(0), dim = a.y.dim(1), top_k = a.slot_pos.dim(1);
  const T* y_perm = a.y_perm.ptr<T>();
  const T* w = a.topk_w.ptr<T>();
  const int32_t* slot = a.slot_pos.ptr<int32_t>();
  T* y = a.y.ptr<T>();
#pragma omp parallel for schedule(static) if (n_tokens * top_k * dim >= kMinParallelWork)
  for (int64_t n = 0; n < n_tokens; ++n) {
    for (int64_t d = 0; d < dim; ++d) {
      Acc acc = 0;
      for (int64_t k = 0; k < top_k; ++k)
        if (slot[n * top_k + k] >= 0) acc += static_cast<Acc>(w[n * top_k + k]) * y_perm[slot[n * top_k + k] * dim + d];
      y[n * dim + d] = static_cast<T>(y[n * dim + d] + acc);
    }
  }
}

// dy_perm[slot_pos[n,k]] = w[n,k]·dy[n];  dtopk_w[n,k] = ⟨dy[n], y_perm[slot_pos[n,k]]⟩
template <class T>
void combine_bwd_impl(const MoeCombineBwdArgs& a) {
  const int64_t n_tokens = a.dy.dim(0), dim = a.dy.dim(1), top_k = a.slot_pos.dim(1);
  const T* dy = a.dy.ptr<T>();
  const T* y_perm = a.y_perm.ptr<T>();
  const T* w = a.topk_w.ptr<T>();
  const int32_t* slot = a.slot_pos.ptr<int32_t>();
  T* dy_perm = a.dy_perm.ptr<T>();
  T* dw = a.dtopk_w.ptr<T>();
#pragma omp parallel for schedule(static) if (n_tokens * top_k * dim >= kMinParallelWork)
  for (int64_t n = 0; n < n_tokens; ++n) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t r = slot[n * top_k + k];
      if (r < 0) {  // an unused slot: no row, no weight gradient
        dw[n * top_k + k] = 0;
        continue;
      }
      const T w_nk = w[n * top_k + k];
      Acc dot = 0;
      for (int64_t d = 0; d < dim; ++d) {
        dy_perm[r * dim + d] = w_nk * dy[n * dim + d];
        dot += static_cast<Acc>(dy[n * dim + d]) * y_perm[r * dim + d];
      }
      dw[n * top_k + k] = static_cast<T>(dot);
    }
  }
}

// b_i += rate · sign(mean(c) − c_i), sign(0) = 0 (docs/derivations.md §4.5).
template <class T, class C>
void bias_update_impl(const MoeBiasUpdateArgs& a) {
  const int64_t n_experts = a.bias.numel();
  const C* c = a.counts.ptr<C>();
  T* bias = a.bias.ptr<T>();
  Acc total = 0;
  for (int64_t i = 0; i < n_experts; ++i) total += static_cast<Acc>(c[i]);
  const Acc mean = total / static_cast<Acc>(n_experts);
  for (int64_t i = 0; i < n_experts; ++i) {
    const Acc gap = mean - static_cast<Acc>(c[i]);
    const int sign = (gap > 0) - (gap < 0);
    bias[i] = bias[i] + static_cast<T>(a.rate) * static_cast<T>(sign);
  }
}

}  // namespace

// ------------------------------------------------------------------ backend entry points

void CpuBackend::router_fwd(Context, const RouterFwdArgs& a) {
  constexpr std::string_view op = "router_fwd";
  validate_router_fwd(a, Device::kCPU);
  dispatch_float(a.logits.dtype, op, [&]<class T>() { router_fwd_impl<T>(a); });
}

void CpuBackend::router_bwd(Context, const RouterBwdArgs& a) {
  constexpr std::string_view op = "router_bwd";
  validate_router_bwd(a, Device::kCPU);
  expect_indices(a.topk_idx, a.scores.dim(1), op, "topk_idx");
  dispatch_float(a.scores.dtype, op, [&]<class T>() { router_bwd_impl<T>(a); });
}

void CpuBackend::aux_loss_fwd(Context, const AuxLossFwdArgs& a) {
  constexpr std::string_view op = "aux_loss_fwd";
  validate_aux_loss_fwd(a, Device::kCPU);
  dispatch_float(a.scores.dtype, op, [&]<class T>() { aux_loss_fwd_impl<T>(a); });
}

void CpuBackend::aux_loss_bwd(Context, const AuxLossBwdArgs& a) {
  constexpr std::string_view op = "aux_loss_bwd";
  validate_aux_loss_bwd(a, Device::kCPU);
  dispatch_float(a.scores.dtype, op, [&]<class T>() { aux_loss_bwd_impl<T>(a); });
}

// Stable counting sort of the N·K (token, slot) assignments by expert (row-major order of
// topk_idx is the tie order): histogram, exclusive prefix sum, then one ordered scatter.
void CpuBackend::moe_permute(Context, const MoePermuteArgs& a) {
  constexpr std::string_view op = "moe_permute";
  validate_moe_permute(a, Device::kCPU);
  const int64_t n_tokens = a.topk_idx.dim(0), top_k = a.topk_idx.dim(1), n_rows = n_tokens * top_k;
  const int64_t n_experts = a.n_experts;
  expect_indices(a.topk_idx, n_experts, op, "topk_idx", /*unused_ok=*/true);

  const int32_t* idx = a.topk_idx.ptr<int32_t>();
  int32_t* offsets = a.offsets.ptr<int32_t>();
  int32_t* src_row = a.src_row.ptr<int32_t>();
  int32_t* slot_pos = a.slot_pos.ptr<int32_t>();
  // offsets[e + 1] = number of assignments to e, then the prefix sum: offsets[e] = first row of e.
  for (int64_t e = 0; e <= n_experts; ++e) offsets[e] = 0;
  for (int64_t i = 0; i < n_rows; ++i)
    if (idx[i] >= 0) ++offsets[idx[i] + 1];
  for (int64_t e = 0; e < n_experts; ++e) offsets[e + 1] += offsets[e];
  DIFFMOE_CHECK(offsets[n_experts] <= a.src_row.numel(), "[{}] {} assignments but src_row has room for {}", op,
                offsets[n_experts], a.src_row.numel());
  // Scatter in (token, slot) order; `cursor` is the next free row of each expert.
  std::vector<int32_t> cursor(offsets, offsets + n_experts);
  for (int64_t n = 0; n < n_tokens; ++n) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t e = idx[n * top_k + k];
      if (e < 0) {  // an unused slot (expert parallelism: its expert is on another rank)
        slot_pos[n * top_k + k] = -1;
        continue;
      }
      const int32_t r = cursor[e]++;
      src_row[r] = static_cast<int32_t>(n);
      slot_pos[n * top_k + k] = r;
    }
  }
}

// x_perm[r] = x[src_row[r]]
void CpuBackend::moe_gather(Context, const MoeGatherArgs& a) {
  constexpr std::string_view op = "moe_gather";
  validate_moe_gather(a, Device::kCPU);
  const int64_t n_tokens = a.x.dim(0), dim = a.x.dim(1), n_rows = a.src_row.numel();
  expect_indices(a.src_row, n_tokens, op, "src_row");
  Bf16Staging staged(scratch_);
  const Tensor tx = staged.input(a.x), tx_perm = staged.output(a.x_perm);
  dispatch_float(tx.dtype, op, [&]<class T>() {
    const T* x = tx.ptr<T>();
    const int32_t* src = a.src_row.ptr<int32_t>();
    T* x_perm = tx_perm.ptr<T>();
#pragma omp parallel for schedule(static) if (n_rows * dim >= kMinParallelWork)
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t d = 0; d < dim; ++d) x_perm[r * dim + d] = x[src[r] * dim + d];
  });
  staged.finish();
}

// dx[n] += Σ_k dx_perm[slot_pos[n,k]]: a per-token gather in slot order (deterministic, no atomics).
void CpuBackend::moe_gather_bwd(Context, const MoeGatherBwdArgs& a) {
  constexpr std::string_view op = "moe_gather_bwd";
  validate_moe_gather_bwd(a, Device::kCPU);
  expect_indices(a.slot_pos, a.dx_perm.dim(0), op, "slot_pos", /*unused_ok=*/true);
  const int64_t n_tokens = a.dx.dim(0), dim = a.dx.dim(1);
  const int64_t top_k = a.slot_pos.dim(1);
  Bf16Staging staged(scratch_);
  const Tensor tdx_perm = staged.input(a.dx_perm);
  dispatch_float(a.dx.dtype, op, [&]<class T>() {
    const T* dx_perm = tdx_perm.ptr<T>();
    const int32_t* slot = a.slot_pos.ptr<int32_t>();
    T* dx = a.dx.ptr<T>();
#pragma omp parallel for schedule(static) if (n_tokens * top_k * dim >= kMinParallelWork)
    for (int64_t n = 0; n < n_tokens; ++n) {
      for (int64_t d = 0; d < dim; ++d) {
        Acc acc = 0;
        for (int64_t k = 0; k < top_k; ++k)
          if (slot[n * top_k + k] >= 0) acc += dx_perm[slot[n * top_k + k] * dim + d];
        dx[n * dim + d] = static_cast<T>(dx[n * dim + d] + acc);
      }
    }
  });
}

void CpuBackend::moe_combine_fwd(Context, const MoeCombineFwdArgs& a) {
  constexpr std::string_view op = "moe_combine_fwd";
  validate_moe_combine_fwd(a, Device::kCPU);
  expect_indices(a.slot_pos, a.y_perm.dim(0), op, "slot_pos", /*unused_ok=*/true);
  Bf16Staging staged(scratch_);
  MoeCombineFwdArgs f = a;
  f.y_perm = staged.input(a.y_perm);
  dispatch_float(a.y.dtype, op, [&]<class T>() { combine_fwd_impl<T>(f); });
}

void CpuBackend::moe_combine_bwd(Context, const MoeCombineBwdArgs& a) {
  constexpr std::string_view op = "moe_combine_bwd";
  validate_moe_combine_bwd(a, Device::kCPU);
  expect_indices(a.slot_pos, a.y_perm.dim(0), op, "slot_pos", /*unused_ok=*/true);
  Bf16Staging staged(scratch_);
  MoeCombineBwdArgs f = a;
  f.dy = staged.input(a.dy);
  f.y_perm = staged.input(a.y_perm);
  f.dy_perm = staged.output(a.dy_perm);
  dispatch_float(a.topk_w.dtype, op, [&]<class T>() { combine_bwd_impl<T>(f); });
  staged.finish();
}

// counts: i32 (the router's) or the bias's float type (e.g. counts already all-reduced as floats).
// Pairs (token, destination rank) in (rank, token) order (op_args.h EpDispatchPlanArgs).
void CpuBackend::ep_dispatch_plan(Context, const EpDispatchPlanArgs& a) {
  constexpr std::string_view op = "ep_dispatch_plan";
  const EpPlanDims d = validate_ep_dispatch_plan(a, Device::kCPU);
  expect_indices(a.topk_idx, d.ranks * d.local_experts, op, "topk_idx");
  const int32_t* idx = a.topk_idx.ptr<int32_t>();
  int32_t* counts = a.counts.ptr<int32_t>();
  int32_t* pair_token = a.pair_token.ptr<int32_t>();
  int32_t* pair_of = a.pair_of.ptr<int32_t>();
  int32_t* pair_idx = a.pair_idx.ptr<int32_t>();
  const int64_t N = d.tokens, K = d.top_k, P = d.ranks, El = d.local_experts, stride = 1 + El;
  for (int64_t i = 0; i < P * stride; ++i) counts[i] = 0;
  int64_t next = 0;
  dispatch_float(a.topk_w.dtype, op, [&]<class T>() {
    const T* w = a.topk_w.ptr<T>();
    T* pair_w = a.pair_w.ptr<T>();
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t n = 0; n < N; ++n) {
        bool any = false;
        for (int64_t k = 0; k < K; ++k) any = any || idx[n * K + k] / El == r;
        if (!any) {
          pair_of[n * P + r] = -1;
          continue;
        }
        const int64_t i = next++;
        pair_token[i] = static_cast<int32_t>(n);
        pair_of[n * P + r] = static_cast<int32_t>(i);
        ++counts[r * stride];
        for (int64_t k = 0; k < K; ++k) {
          const int32_t e = idx[n * K + k];
          const bool here = e / El == r;
          pair_idx[i * K + k] = here ? static_cast<int32_t>(e - r * El) : -1;
          pair_w[i * K + k] = here ? w[n * K + k] : T(0);
          if (here) ++counts[r * stride + 1 + (e - r * El)];
        }
      }
    }
  });
}

void CpuBackend::moe_bias_update(Context, const MoeBiasUpdateArgs& a) {
  constexpr std::string_view op = "moe_bias_update";
  validate_moe_bias_update(a, Device::kCPU);
  dispatch_float(a.bias.dtype, op, [&]<class T>() {
    if (a.counts.dtype == DType::kI32) bias_update_impl<T, int32_t>(a);
    else bias_update_impl<T, T>(a);
  });
}

}  // namespace diffmoe
