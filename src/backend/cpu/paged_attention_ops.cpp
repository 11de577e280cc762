// The paged latent cache on the CPU (op_args.h's paged section; docs/model.md §2, docs/derivations.md §2.4, §3.3).
//
// paged_cache_write scatters rows into the pool by slot. paged_latent_attention is the reference:
// latent_attention's two passes per query row (online max and normaliser per component, then
// out = Σ_s (Σ_c coef_c · exp(z_{c,s} − m_c) / l_c) ĉ_s with coef_0 = 1, coef_1 = −λ, so the
// differential subtraction happens in latent space), with each key row found through the sequence's
// block table. OpenMP runs over (query row, value group); each pair owns its output row, so results
// do not depend on the thread count. Index contents are checked on the host first
// (check_paged_indices, check_paged_slots).
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace diffmoe {

namespace {

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = T(0);
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
void paged_attention_impl(const PagedLatentAttentionArgs& a, const PagedLatentDims& d) {
  constexpr int64_t kMaxComps = 2;
  const T* q_lat = a.q_lat.ptr<T>();
  const T* q_rope = a.q_rope.ptr<T>();
  const T* cache = a.cache.ptr<T>();
  const int32_t* table = a.block_table.ptr<int32_t>();
  const int32_t* kv_lens = a.kv_lens.ptr<int32_t>();
  const int32_t* q_off = a.q_offsets.ptr<int32_t>();
  T* out = a.out.ptr<T>();
  const T scale = static_cast<T>(a.scale);
  const T coef[kMaxComps] = {T(1), a.differential ? -a.lambda.ptr<T>()[0] : T(0)};
  // The sequence of every query row (the offsets were checked: non-decreasing from 0 to N).
  std::vector<int64_t> seq_of(static_cast<size_t>(d.rows));
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t n = q_off[b]; n < q_off[b + 1]; ++n) seq_of[static_cast<size_t>(n)] = b;
#pragma omp parallel for schedule(static)
  for (int64_t ng = 0; ng < d.rows * d.groups; ++ng) {
    const int64_t n = ng / d.groups, g = ng % d.groups, b = seq_of[static_cast<size_t>(n)];
    const int64_t n_b = q_off[b + 1] - q_off[b];
    const int64_t last = kv_lens[b] - n_b + (n - q_off[b]);  // absolute position p: keys s = 0 … p
    const int32_t* blocks = table + b * d.max_blocks;
    const auto key_row = [&](int64_t s) {
      return cache + (blocks[s / d.block_size] * d.block_size + s % d.block_size) * d.row();
    };
    const T* ql[kMaxComps] = {};
    const T* qr[kMaxComps] = {};
    for (int64_t c = 0; c < d.comps; ++c) {
      const int64_t j = d.comps * g + c;
      ql[c] = q_lat + (j * d.rows + n) * d.r_kv;
      qr[c] = q_rope + (n * d.heads + j) * d.q_rope_width + a.q_rope_offset;
    }
    // z_{c,s} = scale · (q̃_j·ĉ_s + q^R_j·k^R_s)
    const auto score = [&](int64_t c, const T* row) {
      return scale * (dot(ql[c], row, d.r_kv) + dot(qr[c], row + d.r_kv, d.d_rope));
    };
    T m[kMaxComps], l[kMaxComps];
    for (int64_t c = 0; c < d.comps; ++c) {
      m[c] = -std::numeric_limits<T>::infinity();
      l[c] = T(0);
      for (int64_t s = 0; s <= last; ++s) {
        const T z = score(c, key_row(s));
        if (z > m[c]) {
          l[c] = l[c] * std::exp(m[c] - z) + T(1);
          m[c] = z;
        } else {
          l[c] += std::exp(z - m[c]);
        }
      }
    }
    T* o = out + (g * d.rows + n) * d.r_kv;
    std::fill(o, o + d.r_kv, T(0));
    for (int64_t s = 0; s <= last; ++s) {
      const T* row = key_row(s);
      T w = T(0);
      for (int64_t c = 0; c < d.comps; ++c) w += coef[c] * std::exp(score(c, row) - m[c]) / l[c];
      for (int64_t i = 0; i < d.r_kv; ++i) o[i] += w * row[i];
    }
  }
}

}  // namespace

void CpuBackend::paged_cache_write(Context, const PagedCacheWriteArgs& a) {
  constexpr std::string_view kOp = "paged_cache_write";
  const PagedCacheWriteDims d = validate_paged_cache_write(a, Device::kCPU);
  if (d.rows == 0) return;
  const int32_t* slots = a.slots.ptr<int32_t>();
  check_paged_slots(slots, d, kOp);
  const size_t row_bytes = static_cast<size_t>(d.width) * dtype_size(a.cache.dtype);
  char* pool = static_cast<char*>(a.cache.data);
  const char* rows = static_cast<const char*>(a.rows.data);
  for (int64_t n = 0; n < d.rows; ++n) std::memcpy(pool + slots[n] * row_bytes, rows + n * row_bytes, row_bytes);
}

void CpuBackend::paged_latent_attention(Context, const PagedLatentAttentionArgs& a) {
  constexpr std::string_view kOp = "paged_latent_attention";
  const PagedLatentDims d = validate_paged_latent_attention(a, Device::kCPU);
  check_paged_indices(a.block_table.ptr<int32_t>(), a.kv_lens.ptr<int32_t>(), a.q_offsets.ptr<int32_t>(), d, kOp);
  if (d.rows == 0) return;
  dispatch_float(a.cache.dtype, kOp, [&]<class T>() { paged_attention_impl<T>(a, d); });
}

}  // namespace diffmoe
