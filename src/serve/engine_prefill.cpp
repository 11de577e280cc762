// The expanded prefill of the engine (engine.h; docs/serving.md "Expanded prefill"): a prompt chunk with nothing
// cached before it attends only to its own rows, so its keys and values can be expanded per head as the training
// forward does (model/attention_layer.cpp) and the training attention op run on them, instead of absorbing W^UK into
// every query and attending in the r_kv + d_rope wide latent space. The two are one function (docs/derivations.md
// §2.4, §3.3: the absorption only reorders the sums); per run of `count` chunks of `len` rows:
//   ĉ = RMSNorm_kv(c)                 the cache rows' latent part, contiguous (the GEMM reads dense rows)
//   [k^C_j ; v_j] = ĉ W_kvb,jᵀ        one GEMM over the run's rows (W_kvb as stored: per head [W^UK_j ; W^UV_j])
//   k_j = [k^C_j ; k^R]               mla_kv_split_fwd, k^R the rotated rope key shared by all heads
//   O = attention_fwd(q, k, v)        [count, len, H_out, comps·d_v], straight into the step's token-major O rows
// In the bf16 GEMM mode the GEMM rounds ĉ and W_kvb to bf16 as training does; q, k, v stay in the compute dtype
// (op_args.h AttentionFwdArgs: the tensor-core kernels round them to bf16 themselves, the CPU computes in f32).
#include <algorithm>
#include <cstdio>

#include "model/attention_layer.h"
#include "serve/engine.h"

namespace diffmoe::serve {

void Engine::plan_expanded_prefill(int64_t rows) {
  const ModelConfig& c = cfg_;
  const DType t = model_.dtype();
  const int64_t R = rows, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim;
  arena_.add("prefill.ckv", Shape{R * c.kv_lora_rank}, t);             // ĉ [N, r_kv]
  arena_.add("prefill.kv", Shape{R * H * (dn + dv)}, t);               // ĉ W_kvbᵀ [N, H·(d_nope + d_v)]
  arena_.add("prefill.k", Shape{R * H * dqk}, t);                      // [N, H, d_qk]
  arena_.add("prefill.v", Shape{R * H * dv}, t);                       // [N, H, d_v]
  arena_.add("prefill.lse", Shape{H * R}, t);                          // [count, H, len]
  if (c.differential) arena_.add("prefill.o2", Shape{R * H * dv}, t);  // A_{g,1} V_g [count, len, H/2, 2·d_v]
}

void Engine::attend_expanded(Context ctx, int64_t l, const PrefillRun& run, const LatentAttentionStep& s) {
  const ModelConfig& c = cfg_;
  const int64_t H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim, dn = c.qk_nope_head_dim;
  const int64_t rkv = c.kv_lora_rank, dr = c.qk_rope_head_dim, comps = c.differential ? 2 : 1, h_out = H / comps;
  const int64_t B = run.count, T = run.len, n = B * T, end = run.row + n;
  DIFFMOE_CHECK(B >= 1 && T >= 1 && run.row >= plan_.L && end <= plan_.N,
                "[engine] expanded prefill run of {} × {} rows at row {} is outside the step's rows [{}, {})", B, T,
                run.row, plan_.L, plan_.N);
  DIFFMOE_CHECK(s.kva.defined() && s.kva.dim(0) >= end && s.kva.dim(1) == rkv + dr,
                "[engine] layer {}: the expanded prefill needs the step's [c ; k^R] rows [N, r_kv + d_rope = {}]", l,
                rkv + dr);
  const Tensor kva = s.kva.rows(run.row, end);
  const Tensor ckv = scratch("prefill.ckv", Shape{n, rkv}), kv = scratch("prefill.kv", Shape{n, H * (dn + dv)});
  const Tensor k = scratch("prefill.k", Shape{n, H, dqk}), v = scratch("prefill.v", Shape{n, H, dv});
  // ĉ as the cache rows hold it: the same norm of the same c, here into dense rows.
  be_.rmsnorm_fwd(ctx, {.y = ckv,
                        .rstd = scratch("rstd", Shape{n}),
                        .x = kva,
                        .w = param(attn_param(l, "kv_norm.weight")),
                        .rows = n,
                        .width = rkv,
                        .x_stride = rkv + dr,
                        .y_stride = rkv,
                        .eps = c.norm_eps});
  be_.gemm(ctx, {.c = kv, .a = ckv, .b = param(attn_param(l, "wkv_b.weight")), .trans_b = true});
  be_.mla_kv_split_fwd(ctx, mla_kv_split_args(c, k, v, kv, kva));
  // Causal over each chunk's own rows: query t sees keys 0 … t, which are positions 0 … t (nothing cached before).
  const Shape out_shape{B, T, h_out, comps * dv};
  be_.attention_fwd(ctx, {.out = s.att.rows(run.row, end).reshape(out_shape),
                          .o2 = c.differential ? scratch("prefill.o2", out_shape) : Tensor{},
                          .lse = scratch("prefill.lse", Shape{B, H, T}),
                          .q = s.q.rows(run.row, end).reshape(Shape{B, T, H, dqk}),
                          .k = k.reshape(Shape{B, T, H, dqk}),
                          .v = v.reshape(Shape{B, T, H, dv}),
                          .lambda = s.lambda,
                          .scale = c.softmax_scale(),
                          .differential = c.differential});
}

// The attention op's limits are its own (op_args.h; a backend may bound T or cover only some head dims): the
// expanded path runs once here, on zeros, for the longest chunk a step can hold (one sequence of min(max_step_tokens,
// max_context) rows), in the model's GEMM mode. If any of its ops refuses, prompts take the latent path on this
// engine, with the op's message kept and printed.
void Engine::check_expanded_prefill() {
  const ModelConfig& c = cfg_;
  const int64_t T = std::min(opt_.max_step_tokens, opt_.max_context), H = c.n_heads, dv = c.v_head_dim;
  const GemmPrecision before = be_.gemm_precision();
  expanded_ = true;
  try {
    model_.use_gemm_precision();
    const Tensor kva = scratch("kva", Shape{T, c.kv_lora_rank + c.qk_rope_head_dim});
    const Tensor q = scratch("q", Shape{T, H * c.d_qk()});
    for (const Tensor& x : {kva, q}) be_.fill({}, {.out = x, .value = 0.0});
    Tensor lambda;
    if (c.differential) {
      lambda = arena_.get("lambda");
      be_.fill({}, {.out = lambda, .value = 0.0});
    }
    plan_ = StepPlan{.N = T, .L = 0};
    attend_expanded({}, 0, {.row = 0, .len = T, .count = 1},
                    {.att = scratch("att", Shape{T, H * dv}), .q = q, .lambda = lambda, .kva = kva});
    be_.synchronize({});
  } catch (const Error& e) {
    expanded_ = false;
    expanded_error_ = e.what();
    std::fprintf(stderr, "[engine] the expanded prefill is off (prompts take the latent attention): %s\n", e.what());
  }
  plan_ = StepPlan{};
  be_.set_gemm_precision(before);
}

}  // namespace diffmoe::serve
