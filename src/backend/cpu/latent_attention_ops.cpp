// Decoding against the compressed (latent) KV cache on the CPU (docs/model.md §2; docs/derivations.md §2.4 "absorb",
// §3.3 absorbed inference for DiffMLA design A).
//
// Design: the naive reference, MQA with one shared key/value head. Every component head j scores
// the cached rows with key [ĉ_s ; k^R_s] (r_kv + d_rope wide) against its query [q̃_j ; q^R_j], and
// the value is the latent ĉ_s itself (r_kv wide). Each query row runs two passes over the keys in
// the op's float type, so no scratch is needed:
//   pass 1: online max and normaliser per component, m_c = max_s z_{c,s}, l_c = Σ_s exp(z_{c,s} − m_c)
//   pass 2: out = Σ_s (Σ_c coef_c · exp(z_{c,s} − m_c) / l_c) ĉ_s,  coef_0 = 1, coef_1 = −λ
// so the differential subtraction A_{h,0}ĉ − λ A_{h,1}ĉ happens in latent space (docs/derivations.md §3.3)
// without a second output buffer. Scores are recomputed in pass 2 (a reference, not a fast kernel).
// OpenMP runs over (batch, value group); a group (a differential head, or a plain head) owns its
// output rows, so threads never share an output and results do not depend on the thread count.
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace diffmoe {

namespace {

constexpr std::string_view kOp = "latent_attention";

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = T(0);
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
void latent_attention_impl(const LatentAttentionArgs& a, const LatentDims& d) {
  constexpr int64_t kMaxComps = 2;
  const T* q_lat = a.q_lat.ptr<T>();
  const T* q_rope = a.q_rope.ptr<T>();
  const T* cache = a.cache.ptr<T>();
  T* out = a.out.ptr<T>();
  const T scale = static_cast<T>(a.scale);
  // coef_c: +1 for component 0, −λ for component 1 (differential only).
  const T coef[kMaxComps] = {T(1), a.differential ? -a.lambda.ptr<T>()[0] : T(0)};
#pragma omp parallel for schedule(static)
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    const int64_t b = bg / d.groups, g = bg % d.groups;
    const T* cache_b = cache + b * d.capacity * d.row();
    for (int64_t t = 0; t < d.tq; ++t) {
      const int64_t last = a.kv_len - d.tq + t;  // absolute position p_t: keys s = 0 … p_t
      // The query of component c: [q̃_j ; q^R_j] with j = comps·g + c.
      const T* ql[kMaxComps] = {};
      const T* qr[kMaxComps] = {};
      for (int64_t c = 0; c < d.comps; ++c) {
        const int64_t j = d.comps * g + c;
        ql[c] = q_lat + ((b * d.tq + t) * d.heads + j) * d.r_kv;
        qr[c] = q_rope + ((b * d.tq + t) * d.heads + j) * d.q_rope_width + a.q_rope_offset;
      }
      // z_{c,s} = scale · (q̃_j·ĉ_s + q^R_j·k^R_s)
      auto score = [&](int64_t c, const T* row) {
        return scale * (dot(ql[c], row, d.r_kv) + dot(qr[c], row + d.r_kv, d.d_rope));
      };
      // Pass 1: online softmax statistics (max m_c, normaliser l_c relative to m_c).
      T m[kMaxComps], l[kMaxComps];
      for (int64_t c = 0; c < d.comps; ++c) {
        m[c] = -std::numeric_limits<T>::infinity();
        l[c] = T(0);
        for (int64_t s = 0; s <= last; ++s) {
          const T z = score(c, cache_b + s * d.row());
          if (z > m[c]) {
            l[c] = l[c] * std::exp(m[c] - z) + T(1);
            m[c] = z;
          } else {
            l[c] += std::exp(z - m[c]);
          }
        }
      }
      // Pass 2: out_g = Σ_s w_s ĉ_s with w_s = Σ_c coef_c · A_{c,s}.
      T* o = out + ((b * d.tq + t) * d.groups + g) * d.r_kv;
      std::fill(o, o + d.r_kv, T(0));
      for (int64_t s = 0; s <= last; ++s) {
        const T* row = cache_b + s * d.row();
        T w = T(0);
        for (int64_t c = 0; c < d.comps; ++c) w += coef[c] * std::exp(score(c, row) - m[c]) / l[c];
        for (int64_t i = 0; i < d.r_kv; ++i) o[i] += w * row[i];
      }
    }
  }
}

}  // namespace

void CpuBackend::latent_attention(Context, const LatentAttentionArgs& a) {
  const LatentDims d = validate_latent_attention(a, Device::kCPU);
  dispatch_float(a.q_lat.dtype, kOp, [&]<class T>() { latent_attention_impl<T>(a, d); });
}

}  // namespace diffmoe
