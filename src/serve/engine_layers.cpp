// The engine's own part of the decode layers (model/decode_layers.h has the shared op sequence; engine.h the math;
// docs/derivations.md §2.4, §3.3 for the absorbed attention). Against model/generator.cpp's part: RoPE reads each
// row's position (DecodeRows::positions), the cache rows go to their pool slots (paged_cache_write) and the
// attention reads keys through block tables (paged_latent_attention); and the per-(token, head) absorption GEMMs
// become one grouped GEMM per projection over head-major rows (moe_gather as the row permutation), which only
// reorders sums.
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "serve/engine.h"
#include "serve/engine_plan.h"

namespace diffmoe::serve {

// W_kvb [H·(d_nope + d_v), r_kv] holds per component j the rows [W^UK_j (d_nope) ; W^UV_j (d_v)]. The
// absorption multiplies the full query [q^C_j ; q^R_j] (d_qk wide) by [W^UK_j ; 0]: the zero rows
// add exact zeros, so q̃_j = q^C_j W^UK_j without copying q^C out of q. The up-projection of value
// group h stacks its components' W^UV: [W^UV_2h ; W^UV_2h+1] (differential) or W^UV_h (plain).
// Elements are moved as they are (any compute dtype), on the host, once.
void Engine::refresh_weights() {
  const ModelConfig& c = cfg_;
  const int64_t H = c.n_heads, dn = c.qk_nope_head_dim, dqk = c.d_qk(), dv = c.v_head_dim, rkv = c.kv_lora_rank;
  const int64_t comps = c.differential ? 2 : 1;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const Tensor wkv_b = param(attn_param(l, "wkv_b.weight"));
    const Tensor w_uk = arena_.get(fmt::format("w_uk.{}", l)), w_uv = arena_.get(fmt::format("w_uv.{}", l));
    DIFFMOE_CHECK(wkv_b.dtype == w_uk.dtype, "[engine] layer {} wkv_b is {}, layer 0's is {}", l,
                  dtype_name(wkv_b.dtype), dtype_name(w_uk.dtype));
    const size_t es = dtype_size(wkv_b.dtype), row = static_cast<size_t>(rkv) * es;
    std::vector<char> src(wkv_b.nbytes()), uk(w_uk.nbytes(), 0), uv(w_uv.nbytes(), 0);
    be_.download(src.data(), wkv_b);
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t i = 0; i < dn; ++i)
        std::copy_n(src.data() + (j * (dn + dv) + i) * row, row, uk.data() + (j * dqk + i) * row);
      for (int64_t i = 0; i < dv; ++i)  // group j / comps, rows (j % comps)·d_v + i
        std::copy_n(src.data() + (j * (dn + dv) + dn + i) * row, row,
                    uv.data() + ((j / comps) * comps * dv + (j % comps) * dv + i) * row);
    }
    be_.upload(w_uk, uk.data());
    be_.upload(w_uv, uv.data());
  }
  quantize_weights();
}

void Engine::write_cache(Context ctx, int64_t l, const DecodeRows&, const Tensor& kv_rows) {
  be_.paged_cache_write(ctx, {.cache = cache_.layer(l), .rows = kv_rows, .slots = plan_.slots});
}

// Rows 0 … L − 1 take the latent path, the expanded prefill's runs the rest (engine.h); the two write disjoint rows
// of s.att.
void Engine::attend(Context ctx, int64_t l, const DecodeRows& rows, const LatentAttentionStep& s) {
  DIFFMOE_CHECK(rows.n == plan_.N, "[engine] layer {} attends {} rows, the step planned {}", l, rows.n, plan_.N);
  if (plan_.L > 0) attend_latent(ctx, l, s);
  for (const PrefillRun& run : prefill_runs_) attend_expanded(ctx, l, run, s);
}

void Engine::attend_latent(Context ctx, int64_t l, const LatentAttentionStep& s) {
  const ModelConfig& c = cfg_;
  const StepPlan& p = plan_;
  const int64_t N = p.L, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim;
  const int64_t rkv = c.kv_lora_rank, comps = c.differential ? 2 : 1, h_out = H / comps;
  const Tensor q = s.q.rows(0, N), att = s.att.rows(0, N);
  // Absorb W^UK into the query (docs/derivations.md §2.4): head-major rows, one grouped GEMM over the heads.
  const Tensor q_hm = scratch("q_hm", Shape{H * N, dqk}), q_lat = scratch("q_lat", Shape{H * N, rkv});
  be_.moe_gather(ctx, {.x_perm = q_hm, .x = q.reshape(Shape{N * H, dqk}), .src_row = p.perm_q});
  be_.grouped_gemm(ctx, {.c = q_lat,
                         .a = q_hm,
                         .b = arena_.get(fmt::format("w_uk.{}", l)),
                         .offsets = p.offsets_h,
                         .trans_b = false,
                         .max_group_rows = N});  // a head's rows: one per token
  // MQA over the paged cache; differential: L_h = A_{h,0}ĉ − λ A_{h,1}ĉ (docs/derivations.md §3.3).
  const Tensor lat = scratch("lat", Shape{h_out, N, rkv});
  be_.paged_latent_attention(ctx, {.out = lat,
                                   .q_lat = q_lat.reshape(Shape{H, N, rkv}),
                                   .q_rope = q.reshape(Shape{N, H, dqk}),
                                   .cache = cache_.layer(l),
                                   .lambda = s.lambda,
                                   .block_table = p.block_table,
                                   .kv_lens = p.kv_lens,
                                   .q_offsets = p.q_offsets,
                                   .q_rope_offset = dn,
                                   .scale = c.softmax_scale(),
                                   .differential = c.differential});
  // Up-project with W^UV (docs/derivations.md §3.3): O_h = [L_h W^UVᵀ_2h ; L_h W^UVᵀ_2h+1], one grouped GEMM over
  // the value groups, then back to token-major [N, H/2, 2·d_v] (the training layout).
  const Tensor att_hm = scratch("att_hm", Shape{h_out * N, comps * dv});
  be_.grouped_gemm(ctx, {.c = att_hm,
                         .a = lat.reshape(Shape{h_out * N, rkv}),
                         .b = arena_.get(fmt::format("w_uv.{}", l)),
                         .offsets = p.offsets_o,
                         .trans_b = true,
                         .max_group_rows = N});
  be_.moe_gather(ctx, {.x_perm = att.reshape(Shape{N * h_out, comps * dv}), .x = att_hm, .src_row = p.perm_o});
}

}  // namespace diffmoe::serve
