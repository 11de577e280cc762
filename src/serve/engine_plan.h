// The i32 index buffer of one engine step: what the ops of a step read besides activations and
// weights, planned as views of one device buffer so that the host builds it in one vector and
// uploads it with one copy. With N rows of which the first L take the paged latent attention (the
// rows of its B sequences; rows L … N − 1 are the expanded prefill's, engine.h), H component heads,
// H_out value groups and M logit rows:
//   tokens [N], positions [N], slots [N]        token id, absolute position and pool slot of each row
//   q_offsets [B+1], kv_lens [B], block_table [B, max_blocks]      paged_latent_attention's indices
//   perm_q [H·L]      q [L·H, d_qk] → head-major [H·L, d_qk]:   perm_q[j·L + n] = n·H + j
//   offsets_h [H+1]   the absorption GEMM's groups (head j = rows j·L …)
//   offsets_o [H_out+1]  the up-projection's groups
//   perm_o [L·H_out]  head-major [H_out·L, ·] → token-major:    perm_o[n·H_out + h] = h·L + n
//   logit_rows [M]    the rows the head reads
// Without expanded rows (L = N; every pure decode step) the layout is a function of N, B and M alone.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace diffmoe::serve {

struct StepPlan {
  int64_t N = 0, L = 0, B = 0, M = 0, max_blocks = 0, H = 0, h_out = 0;
  int64_t used = 0;               // i32 values of the buffer this step uses (from its start)
  const int32_t* base = nullptr;  // the buffer's device address (offsets of the views below)
  Tensor tokens = {}, positions = {}, slots = {}, q_offsets = {}, kv_lens = {}, block_table = {};
  Tensor perm_q = {}, offsets_h = {}, offsets_o = {}, perm_o = {}, logit_rows = {};
};

// A run of the expanded prefill (engine.h): `count` sequences of `len` positions each with nothing cached before the
// step, on rows row … row + count·len − 1, one sequence after another. Host side only: its ops take no indices.
struct PrefillRun {
  int64_t row = 0, len = 0, count = 0;
};

// Values the buffer needs for the largest step (R rows, B sequences, M logit rows).
inline int64_t index_capacity(int64_t R, int64_t B, int64_t max_blocks, int64_t H, int64_t h_out, int64_t M) {
  return 3 * R + (B + 1) + B + B * max_blocks + H * R + (H + 1) + (h_out + 1) + R * h_out + M;
}

inline StepPlan make_plan(const Tensor& index, int64_t N, int64_t L, int64_t B, int64_t max_blocks, int64_t H,
                          int64_t h_out, int64_t M) {
  DIFFMOE_CHECK(L >= 0 && L <= N, "[engine] {} latent rows of a step of {} rows", L, N);
  StepPlan p{.N = N, .L = L, .B = B, .M = M, .max_blocks = max_blocks, .H = H, .h_out = h_out};
  p.base = static_cast<const int32_t*>(index.data);
  const auto take = [&](Shape s) {
    DIFFMOE_CHECK(p.used + s.numel() <= index.numel(), "[engine] the step's index buffer is too small");
    Tensor t{
        .data = static_cast<int32_t*>(index.data) + p.used, .dtype = DType::kI32, .device = index.device, .shape = s};
    p.used += s.numel();
    return t;
  };
  p.tokens = take(Shape{N});
  p.positions = take(Shape{N});
  p.slots = take(Shape{N});
  p.q_offsets = take(Shape{B + 1});
  p.kv_lens = take(Shape{B});
  p.block_table = take(Shape{B, max_blocks});
  p.perm_q = take(Shape{H * L});
  p.offsets_h = take(Shape{H + 1});
  p.offsets_o = take(Shape{h_out + 1});
  p.perm_o = take(Shape{L * h_out});
  p.logit_rows = take(Shape{M});
  return p;
}

// Writes values into the host copy of the buffer at the place of a view.
class IndexWriter {
 public:
  IndexWriter(std::vector<int32_t>& host, const StepPlan& p) : host_(host), p_(p) {}
  void set(const Tensor& view, int64_t i, int64_t value) {
    const int64_t at = static_cast<const int32_t*>(view.data) - p_.base + i;
    host_[static_cast<size_t>(at)] = static_cast<int32_t>(value);
  }
  // The permutations and group offsets of the latent rows, which depend only on L, H and H_out.
  void fill_permutations() {
    for (int64_t j = 0; j < p_.H; ++j)
      for (int64_t n = 0; n < p_.L; ++n) set(p_.perm_q, j * p_.L + n, n * p_.H + j);
    for (int64_t j = 0; j <= p_.H; ++j) set(p_.offsets_h, j, j * p_.L);
    for (int64_t h = 0; h <= p_.h_out; ++h) set(p_.offsets_o, h, h * p_.L);
    for (int64_t n = 0; n < p_.L; ++n)
      for (int64_t h = 0; h < p_.h_out; ++h) set(p_.perm_o, n * p_.h_out + h, h * p_.L + n);
  }

 private:
  std::vector<int32_t>& host_;
  const StepPlan& p_;
};

}  // namespace diffmoe::serve
