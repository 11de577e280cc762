// The i32 index buffer of one engine step: what the ops of a step read besides activations and
// weights, planned as views of one device buffer so that the host builds it in one vector and
// uploads it with one copy. With N rows, B sequences, H component heads, H_out value groups and M
// logit rows:
//   tokens [N], positions [N], slots [N]        token id, absolute position and pool slot of each row
//   q_offsets [B+1], kv_lens [B], block_table [B, max_blocks]      paged_latent_attention's indices
//   perm_q [H·N]      q [N·H, d_qk] → head-major [H·N, d_qk]:   perm_q[j·N + n] = n·H + j
//   offsets_h [H+1]   the absorption GEMM's groups (head j = rows j·N …)
//   offsets_o [H_out+1]  the up-projection's groups
//   perm_o [N·H_out]  head-major [H_out·N, ·] → token-major:    perm_o[n·H_out + h] = h·N + n
//   logit_rows [M]    the rows the head reads
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace diffmoe::serve {

struct StepPlan {
  int64_t N = 0, B = 0, M = 0, max_blocks = 0, H = 0, h_out = 0;
  int64_t used = 0;               // i32 values of the buffer this step uses (from its start)
  const int32_t* base = nullptr;  // the buffer's device address (offsets of the views below)
  Tensor tokens = {}, positions = {}, slots = {}, q_offsets = {}, kv_lens = {}, block_table = {};
  Tensor perm_q = {}, offsets_h = {}, offsets_o = {}, perm_o = {}, logit_rows = {};
};

// Values the buffer needs for the largest step (R rows, B sequences, M logit rows).
inline int64_t index_capacity(int64_t R, int64_t B, int64_t max_blocks, int64_t H, int64_t h_out, int64_t M) {
  return 3 * R + (B + 1) + B + B * max_blocks + H * R + (H + 1) + (h_out + 1) + R * h_out + M;
}

inline StepPlan make_plan(const Tensor& index, int64_t N, int64_t B, int64_t max_blocks, int64_t H, int64_t h_out,
                          int64_t M) {
  StepPlan p{.N = N, .B = B, .M = M, .max_blocks = max_blocks, .H = H, .h_out = h_out};
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
  p.perm_q = take(Shape{H * N});
  p.offsets_h = take(Shape{H + 1});
  p.offsets_o = take(Shape{h_out + 1});
  p.perm_o = take(Shape{N * h_out});
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
  // The permutations and group offsets, which depend only on N, H and H_out.
  void fill_permutations() {
    for (int64_t j = 0; j < p_.H; ++j)
      for (int64_t n = 0; n < p_.N; ++n) set(p_.perm_q, j * p_.N + n, n * p_.H + j);
    for (int64_t j = 0; j <= p_.H; ++j) set(p_.offsets_h, j, j * p_.N);
    for (int64_t h = 0; h <= p_.h_out; ++h) set(p_.offsets_o, h, h * p_.N);
    for (int64_t n = 0; n < p_.N; ++n)
      for (int64_t h = 0; h < p_.h_out; ++h) set(p_.perm_o, n * p_.h_out + h, h * p_.N + n);
  }

 private:
  std::vector<int32_t>& host_;
  const StepPlan& p_;
};

}  // namespace diffmoe::serve
