// Generation with the latent KV cache (docs/model.md §2; docs/derivations.md §2.4, §3.3) and the sampler:
//  (a) the CPU latent_attention op equals the naive path (attention_fwd on explicitly up-projected
//      keys and values) for differential and plain heads, f64;
//  (b) prefill + step logits equal the training forward's logits row by row on the micro configs;
//  (c) the sampler: greedy, top-k, top-p, temperature frequencies, reproducibility;
// plus the cache size per token of the presets.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "micro_config.h"
#include "model/generator.h"
#include "model/sampler.h"

namespace diffmoe {
namespace {

using test::Owned;

// ================================================================ (a) the latent_attention op
// Every value is O(1) and every sum has ≤ 7·12 terms, so f64 rounding differences between the two
// orders of summation (P·(ĉ W^UVᵀ) vs (P·ĉ) W^UVᵀ) are ~1e-15; 1e-10 leaves five orders of margin
// while any wrong term (a missed key, a wrong head pairing, λ on the wrong side) is O(1e-1).
constexpr double kOpTol = 1e-10;

struct OpCase {
  int64_t kv_len, tq;  // cached positions after the call, new query positions
};

void check_latent_vs_naive(bool differential, int64_t H, uint64_t seed) {
  CpuBackend be;
  const DType f64 = DType::kF64;
  const int64_t B = 2, T = 7, S = T + 2, dn = 3, dr = 4, dv = 5, rkv = 6, dqk = dn + dr, kvh = dn + dv;
  const int64_t comps = differential ? 2 : 1, h_out = H / comps;
  const double scale = 0.45;
  Owned ckv(Shape{B, T, rkv}, f64), kr(Shape{B, T, dr}, f64), q(Shape{B, T, H, dqk}, f64),
      wkvb(Shape{H * kvh, rkv}, f64);
  Owned lambda(Shape{1}, f64);
  test::fill_normal(ckv, seed);
  test::fill_normal(kr, seed + 1);
  test::fill_normal(q, seed + 2);
  test::fill_normal(wkvb, seed + 3, 0.5);
  lambda.at<double>(0) = 0.63;

  // Naive (MHA mode, docs/derivations.md §2.3): [k^C_j ; v_j] = ĉ W_kvb,jᵀ, k_j = [k^C_j ; k^R], causal attention.
  Owned kv(Shape{B * T, H * kvh}, f64), k(Shape{B, T, H, dqk}, f64), v(Shape{B, T, H, dv}, f64);
  Owned out(Shape{B, T, h_out, comps * dv}, f64), o2(Shape{B, T, h_out, comps * dv}, f64), lse(Shape{B, H, T}, f64);
  be.gemm({}, {.c = kv, .a = ckv.t().reshape(Shape{B * T, rkv}), .b = wkvb, .trans_b = true});
  be.mla_kv_split_fwd({}, {.k = k,
                           .v = v,
                           .kv = kv,
                           .kr = kr.t().reshape(Shape{B * T, dr}),
                           .n_heads = H,
                           .d_nope = dn,
                           .d_rope = dr,
                           .d_v = dv,
                           .kr_stride = dr,
                           .kr_offset = 0});
  be.attention_fwd({}, {.out = out,
                        .o2 = differential ? o2.t() : Tensor{},
                        .lse = lse,
                        .q = q,
                        .k = k,
                        .v = v,
                        .lambda = differential ? lambda.t() : Tensor{},
                        .scale = scale,
                        .differential = differential});

  double max_err = 0.0;
  for (const OpCase c : {OpCase{T, T}, OpCase{T, 1}, OpCase{5, 2}}) {
    // The cache holds [ĉ_s ; k^R_s] for s < kv_len; rows beyond are NaN and must never be read.
    Owned cache(Shape{B, S, rkv + dr}, f64);
    for (int64_t i = 0; i < cache.numel(); ++i) cache.at<double>(i) = std::numeric_limits<double>::quiet_NaN();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < c.kv_len; ++s) {
        for (int64_t i = 0; i < rkv; ++i)
          cache.at<double>((b * S + s) * (rkv + dr) + i) = ckv.at<double>((b * T + s) * rkv + i);
        for (int64_t i = 0; i < dr; ++i)
          cache.at<double>((b * S + s) * (rkv + dr) + rkv + i) = kr.at<double>((b * T + s) * dr + i);
      }
    // Queries of the last tq positions p = kv_len − tq + t: q̃_j = q^C_j W^UK_j (host loops), and the
    // full query [q^C ; q^R] as q_rope with offset d_nope.
    Owned q_lat(Shape{B, c.tq, H, rkv}, f64), q_full(Shape{B, c.tq, H, dqk}, f64), lat(Shape{B, c.tq, h_out, rkv}, f64);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < c.tq; ++t) {
        const int64_t p = c.kv_len - c.tq + t;
        for (int64_t j = 0; j < H; ++j) {
          const double* qj = q.ptr<double>() + ((b * T + p) * H + j) * dqk;
          for (int64_t i = 0; i < dqk; ++i) q_full.at<double>(((b * c.tq + t) * H + j) * dqk + i) = qj[i];
          for (int64_t r = 0; r < rkv; ++r) {
            double s = 0.0;
            for (int64_t i = 0; i < dn; ++i) s += qj[i] * wkvb.at<double>((j * kvh + i) * rkv + r);
            q_lat.at<double>(((b * c.tq + t) * H + j) * rkv + r) = s;
          }
        }
      }
    be.latent_attention({}, {.out = lat,
                             .q_lat = q_lat,
                             .q_rope = q_full,
                             .cache = cache,
                             .lambda = lambda,
                             .kv_len = c.kv_len,
                             .q_rope_offset = dn,
                             .scale = scale,
                             .differential = differential});
    // o_j = L_{h(j)} W^UVᵀ_j must equal the naive output's component j at position p.
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < c.tq; ++t) {
        const int64_t p = c.kv_len - c.tq + t;
        for (int64_t j = 0; j < H; ++j)
          for (int64_t i = 0; i < dv; ++i) {
            double o = 0.0;
            for (int64_t r = 0; r < rkv; ++r)
              o += lat.at<double>(((b * c.tq + t) * h_out + j / comps) * rkv + r) *
                   wkvb.at<double>((j * kvh + dn + i) * rkv + r);
            const double ref = out.at<double>(((b * T + p) * H + j) * dv + i);
            ASSERT_TRUE(std::isfinite(o)) << "a NaN cache row beyond kv_len was read";
            max_err = std::max(max_err, std::abs(o - ref));
          }
      }
  }
  std::printf("[latent] %-12s H=%lld max |latent - naive| = %.3e\n", differential ? "differential" : "plain",
              static_cast<long long>(H), max_err);
  EXPECT_LE(max_err, kOpTol);
}

TEST(LatentAttention, DifferentialMatchesNaiveAttention) { check_latent_vs_naive(true, 4, 101); }
TEST(LatentAttention, PlainMatchesNaiveAttention) { check_latent_vs_naive(false, 3, 202); }

TEST(LatentAttention, RejectsBadShapes) {
  CpuBackend be;
  const DType f64 = DType::kF64;
  Owned out(Shape{1, 1, 2, 6}, f64), q_lat(Shape{1, 1, 4, 6}, f64), q_rope(Shape{1, 1, 4, 4}, f64);
  Owned cache(Shape{1, 3, 10}, f64), lambda(Shape{1}, f64);
  const LatentAttentionArgs ok{
      .out = out, .q_lat = q_lat, .q_rope = q_rope, .cache = cache, .lambda = lambda, .kv_len = 3};
  EXPECT_NO_THROW(be.latent_attention({}, ok));
  LatentAttentionArgs bad = ok;
  bad.kv_len = 4;  // beyond the capacity S = 3
  EXPECT_THROW(be.latent_attention({}, bad), Error);
  bad = ok;
  bad.q_rope_offset = 1;  // rope columns [1, 5) do not fit W = 4
  EXPECT_THROW(be.latent_attention({}, bad), Error);
  bad = ok;
  bad.differential = false;  // plain needs out [1, 1, 4, 6]
  EXPECT_THROW(be.latent_attention({}, bad), Error);
}

// ================================================================ (b) generator vs training forward
// Both paths run the same ops in f64 except the attention core (latent vs up-projected, see (a)) and
// GEMMs with different row counts; measured differences are ~1e-15 relative. 1e-9 relative per row
// (norm-wise over the vocabulary) leaves six orders of margin and still catches a wrong position,
// a stale cache row or a missing bias (all O(1e-2) or more).
constexpr double kLogitTol = 1e-9;

struct Reference {
  int64_t B, T, V;
  std::vector<double> logits;  // [B·T, V] of Model::forward
  Owned tokens;                // [B, T]
};

Reference reference_logits(Model& m, int64_t B, int64_t T, uint64_t seed) {
  Reference r{B, T, m.config().vocab_size, {}, Owned(Shape{B, T}, DType::kI32)};
  test::fill_int(r.tokens, seed, 0, static_cast<int32_t>(r.V));
  m.set_batch_shape(B, T);
  m.forward({}, r.tokens, Tensor{});
  r.logits = test::to_vector(m.logits());
  return r;
}

// Tokens [B, t1 − t0] = columns t0 … t1 − 1 of the reference tokens.
Owned columns(const Reference& r, int64_t t0, int64_t t1) {
  Owned t(Shape{r.B, t1 - t0}, DType::kI32);
  for (int64_t b = 0; b < r.B; ++b)
    for (int64_t s = t0; s < t1; ++s) t.at<int32_t>(b * (t1 - t0) + s - t0) = r.tokens.at<int32_t>(b * r.T + s);
  return t;
}

// Largest norm-wise relative error over the sequences between generator logits [B, V] for position t
// and the reference rows b·T + t.
double row_error(const Reference& r, const Tensor& logits, int64_t t) {
  EXPECT_EQ(logits.shape, (Shape{r.B, r.V}));
  const std::vector<double> got = test::to_vector(logits);
  double worst = 0.0;
  for (int64_t b = 0; b < r.B; ++b) {
    const auto g0 = got.begin() + b * r.V, r0 = r.logits.begin() + (b * r.T + t) * r.V;
    worst = std::max(worst, test::rel_error(std::vector<double>(g0, g0 + r.V), std::vector<double>(r0, r0 + r.V)));
  }
  return worst;
}

void check_generator_matches_forward(const ModelConfig& cfg, uint64_t seed) {
  CpuBackend be;
  Model m(cfg, be, DType::kF64);
  test::randomize_for_test(m, seed);
  const int64_t B = 2, T = cfg.max_seq_len;  // the whole RoPE range, YaRN included
  const Reference r = reference_logits(m, B, T, seed + 7);
  double worst_prefill = 0.0, worst_steps = 0.0, worst_chunked = 0.0;

  // A 3-token prompt, then one token at a time.
  Generator gen(m, {.batch = B, .max_len = T});
  const int64_t T0 = 3;
  worst_prefill = std::max(worst_prefill, row_error(r, gen.prefill({}, columns(r, 0, T0)), T0 - 1));
  for (int64_t t = T0; t < T; ++t)
    worst_prefill = std::max(worst_prefill, row_error(r, gen.step({}, columns(r, t, t + 1)), t));
  EXPECT_EQ(gen.length(), T);

  // One-token steps from an empty cache.
  gen.reset();
  for (int64_t t = 0; t < T; ++t)
    worst_steps = std::max(worst_steps, row_error(r, gen.step({}, columns(r, t, t + 1)), t));
  // The cache holds exactly the training path's ĉ (post-norm) and rotated k^R of every position.
  const int64_t rkv = cfg.kv_lora_rank, dr = cfg.qk_rope_head_dim;
  double worst_cache = 0.0;
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const std::vector<double> c = test::to_vector(gen.cache(l));
    const std::vector<double> ckv = test::to_vector(m.acts().get(fmt::format("act.{}.attn.ckv", l)));
    const std::vector<double> kva = test::to_vector(m.acts().get(fmt::format("act.{}.attn.kva", l)));
    for (int64_t n = 0; n < B * T; ++n) {
      for (int64_t i = 0; i < rkv; ++i)
        worst_cache = std::max(
            worst_cache, std::abs(c[static_cast<size_t>(n * (rkv + dr) + i)] - ckv[static_cast<size_t>(n * rkv + i)]));
      for (int64_t i = rkv; i < rkv + dr; ++i)
        worst_cache = std::max(worst_cache, std::abs(c[static_cast<size_t>(n * (rkv + dr) + i)] -
                                                     kva[static_cast<size_t>(n * (rkv + dr) + i)]));
    }
  }

  // Prefill of 7 tokens in chunks of 3 (3 + 3 + 1) from the generator's own token buffer, then a step.
  Generator chunked(m, {.batch = B, .max_len = T, .prefill_chunk = 3});
  const Owned prompt = columns(r, 0, T - 1);
  const std::vector<int32_t> ids(prompt.ptr<int32_t>(), prompt.ptr<int32_t>() + prompt.numel());
  worst_chunked = std::max(worst_chunked, row_error(r, chunked.prefill({}, chunked.upload_tokens(ids, T - 1)), T - 2));
  worst_chunked = std::max(worst_chunked, row_error(r, chunked.step({}, columns(r, T - 1, T)), T - 1));

  std::printf(
      "[generator] %s: max rel error prefill+steps %.3e, steps only %.3e, chunked prefill %.3e; cache vs acts %.3e\n",
      cfg.differential ? "micro_diff" : "micro_plain", worst_prefill, worst_steps, worst_chunked, worst_cache);
  EXPECT_LE(worst_prefill, kLogitTol);
  EXPECT_LE(worst_steps, kLogitTol);
  EXPECT_LE(worst_chunked, kLogitTol);
  EXPECT_LE(worst_cache, 1e-12);  // O(1) values from the same ops: rounding only
  // The cache is full: one more position is an error naming the generator.
  EXPECT_THROW(chunked.step({}, columns(r, 0, 1)), Error);
}

TEST(Generator, MicroDiffMatchesTrainingForward) { check_generator_matches_forward(test::micro_diff_config(), 31); }
TEST(Generator, MicroPlainMatchesTrainingForward) { check_generator_matches_forward(test::micro_plain_config(), 47); }

// The f32 path (the CPU backend's working precision): same check at the FP32 tolerance of the
// numerics policy. Three layers of O(1) activations accumulate ~1e-6 relative rounding; 1e-4 keeps
// two orders of margin below the O(1e-2) of any real mistake.
TEST(Generator, MicroDiffF32MatchesTrainingForward) {
  CpuBackend be;
  const ModelConfig cfg = test::micro_diff_config();
  Model m(cfg, be, DType::kF32);
  test::randomize_for_test(m, 59);
  const int64_t B = 2, T = cfg.max_seq_len;
  const Reference r = reference_logits(m, B, T, 61);
  Generator gen(m, {.batch = B, .prefill_chunk = 4});
  double worst = row_error(r, gen.prefill({}, columns(r, 0, 5)), 4);
  for (int64_t t = 5; t < T; ++t) worst = std::max(worst, row_error(r, gen.step({}, columns(r, t, t + 1)), t));
  std::printf("[generator] micro_diff f32: max rel error %.3e\n", worst);
  EXPECT_LE(worst, 1e-4);
}

// A bf16-GEMM model decodes before any training step, and after another model set the backend's
// (per-process) GEMM precision to f32: the generator sets its model's mode itself (without it the
// first GEMM on the bf16 weight copies throws "bf16 GEMM operands ... need the bf16 GEMM mode"), and
// the logits are those of the same decode after a training forward.
TEST(Generator, Bf16GemmModelDecodesWhateverTheBackendsModeWas) {
  CpuBackend be;
  const ModelConfig cfg = test::micro_diff_config();
  Model m(cfg, be, DType::kF32, ModelOptions{.precision = Precision::kBF16});
  test::randomize_for_test(m, 23);
  be.set_gemm_precision(GemmPrecision::kF32);  // as a fresh backend, or an f32 model's pass, leaves it
  const std::vector<int32_t> prompt = {3, 17, 9, 0, 5, 2};
  Generator gen(m, {.batch = 2});
  const std::vector<double> first = test::to_vector(gen.prefill({}, gen.upload_tokens(prompt, 3)));
  m.set_batch_shape(2, 3);
  Owned tokens(Shape{2, 3}, DType::kI32);
  for (size_t i = 0; i < prompt.size(); ++i) tokens.at<int32_t>(static_cast<int64_t>(i)) = prompt[i];
  m.forward({}, tokens, Tensor{});
  be.set_gemm_precision(GemmPrecision::kF32);
  EXPECT_EQ(test::to_vector(gen.prefill({}, gen.upload_tokens(prompt, 3))), first);
}

// Greedy generation through the cache equals greedy generation by re-running the full training
// forward on the growing sequence (the glue: sample_rows, upload_tokens, step).
TEST(Generator, GreedyLoopMatchesFullRecompute) {
  CpuBackend be;
  const ModelConfig cfg = test::micro_diff_config();
  Model m(cfg, be, DType::kF64);
  test::randomize_for_test(m, 5);
  const int64_t B = 2, T0 = 2, T = cfg.max_seq_len, V = cfg.vocab_size;
  const Sampler greedy({.temperature = 0.0});
  std::vector<int32_t> seq = {3, 17, 9, 0};  // [B, T0] prompts
  Generator gen(m, {.batch = B});
  Tensor logits = gen.prefill({}, gen.upload_tokens(seq, T0));
  std::vector<std::vector<int32_t>> cached(B);
  for (int64_t b = 0; b < B; ++b) cached[b] = {seq[b * T0], seq[b * T0 + 1]};
  for (int64_t t = T0; t < T; ++t) {
    const std::vector<int32_t> next = greedy.sample_rows(be, logits, static_cast<uint64_t>(t));
    for (int64_t b = 0; b < B; ++b) cached[b].push_back(next[b]);
    if (t + 1 < T) logits = gen.step({}, gen.upload_tokens(next, 1));
  }
  // Recompute: forward on the prefix of length t, argmax of the last row.
  std::vector<std::vector<int32_t>> full(B);
  for (int64_t b = 0; b < B; ++b) full[b] = {seq[b * T0], seq[b * T0 + 1]};
  for (int64_t t = T0; t < T; ++t) {
    m.set_batch_shape(B, t);
    Owned tokens(Shape{B, t}, DType::kI32);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < t; ++s) tokens.at<int32_t>(b * t + s) = full[b][s];
    m.forward({}, tokens, Tensor{});
    const std::vector<double> all = test::to_vector(m.logits());
    for (int64_t b = 0; b < B; ++b) {
      const auto row = all.begin() + (b * t + t - 1) * V;
      full[b].push_back(static_cast<int32_t>(std::max_element(row, row + V) - row));
    }
  }
  EXPECT_EQ(cached, full);
}

// ================================================================ (c) the sampler
const std::vector<double> kLogits = {0.3, 2.0, -1.0, 1.2, 1.9, 0.5, 2.0};  // ties at ids 1 and 6

TEST(Sampler, GreedyIsArgmaxWithLowestIdOnTies) {
  for (uint64_t s = 0; s < 20; ++s) {
    EXPECT_EQ(Sampler({.temperature = 0.0, .seed = s}).sample(std::span(kLogits), s), 1);
    EXPECT_EQ(Sampler({.temperature = 0.9, .top_k = 1, .seed = s}).sample(std::span(kLogits), s), 1);  // top-k = 1
    EXPECT_EQ(Sampler({.temperature = 1.5, .top_p = 1e-6, .seed = s}).sample(std::span(kLogits), s),
              1);  // tiny nucleus
  }
  const std::vector<float> f(kLogits.begin(), kLogits.end());
  EXPECT_EQ(Sampler({.temperature = 0.0}).sample(std::span(f), 0), 1);
}

// Frequencies over n seeds vs the target distribution: each id within 5 standard deviations
// sqrt(p(1−p)/n) (a wrong temperature or a dropped candidate moves some id by > 20σ at n = 40000;
// the draws are seeded, so the test is deterministic, and 5σ keeps a correct sampler far inside).
void check_frequencies(const SamplerOptions& base, const std::vector<double>& want) {
  const int n = 40000;
  std::vector<int> count(kLogits.size(), 0);
  for (int s = 0; s < n; ++s) {
    SamplerOptions o = base;
    o.seed = static_cast<uint64_t>(s);
    ++count[static_cast<size_t>(Sampler(o).sample(std::span(kLogits), 0))];
  }
  for (size_t i = 0; i < kLogits.size(); ++i) {
    const double f = static_cast<double>(count[i]) / n, p = want[i];
    const double sigma = std::sqrt(p * (1 - p) / n);
    if (p == 0.0) EXPECT_EQ(count[i], 0) << "id " << i;
    else EXPECT_LE(std::abs(f - p), 5 * sigma) << "id " << i << ": frequency " << f << " vs p " << p;
  }
}

// softmax(logits / T) restricted to `keep` ids (renormalised).
std::vector<double> softmax_over(double temperature, const std::vector<int>& keep) {
  std::vector<double> p(kLogits.size(), 0.0);
  double z = 0.0;
  for (int i : keep) z += p[static_cast<size_t>(i)] = std::exp(kLogits[static_cast<size_t>(i)] / temperature);
  for (double& v : p) v /= z;
  return p;
}

TEST(Sampler, TemperatureFrequenciesMatchSoftmax) {
  check_frequencies({.temperature = 0.8}, softmax_over(0.8, {0, 1, 2, 3, 4, 5, 6}));
  check_frequencies({.temperature = 2.0}, softmax_over(2.0, {0, 1, 2, 3, 4, 5, 6}));
}

TEST(Sampler, TopKAndTopPRestrictTheCandidates) {
  // top-k = 3 keeps ids 1, 6 (tied, lower id first) and 4.
  check_frequencies({.temperature = 1.0, .top_k = 3}, softmax_over(1.0, {1, 6, 4}));
  // At T = 1 the sorted probabilities are ≈ .245 .245 .222 .100 .050 .041 .012: top-p = 0.6 needs
  // the first three (cumulative .49 < .6 ≤ .71).
  check_frequencies({.temperature = 1.0, .top_p = 0.6}, softmax_over(1.0, {1, 6, 4}));
  check_frequencies({.temperature = 1.0, .top_k = 2, .top_p = 0.9}, softmax_over(1.0, {1, 6}));
}

TEST(Sampler, SameSeedSameToken) {
  const Sampler a({.temperature = 1.3, .top_p = 0.95, .seed = 1234});
  const Sampler b({.temperature = 1.3, .top_p = 0.95, .seed = 1234});
  std::vector<int> seen(kLogits.size(), 0);
  for (uint64_t c = 0; c < 200; ++c) {
    const int32_t t = a.sample(std::span(kLogits), c);
    EXPECT_EQ(t, b.sample(std::span(kLogits), c));
    EXPECT_EQ(t, a.sample(std::span(kLogits), c));
    ++seen[static_cast<size_t>(t)];
  }
  EXPECT_GE(std::count_if(seen.begin(), seen.end(), [](int n) { return n > 0; }), 4);  // it does vary with the counter

  // sample_rows: row b of [B, V] logits uses counter step·B + b.
  CpuBackend be;
  Owned logits(Shape{3, static_cast<int64_t>(kLogits.size())}, DType::kF32);
  for (int64_t i = 0; i < logits.numel(); ++i)
    logits.at<float>(i) =
        static_cast<float>(kLogits[static_cast<size_t>(i) % kLogits.size()]) * (1 + 0.1f * static_cast<float>(i / 7));
  const std::vector<int32_t> ids = a.sample_rows(be, logits, 5);
  for (int64_t b = 0; b < 3; ++b)
    EXPECT_EQ(ids[static_cast<size_t>(b)],
              a.sample(std::span<const float>(logits.ptr<float>() + b * 7, 7), 5 * 3 + static_cast<uint64_t>(b)));
}

TEST(Sampler, RejectsBadOptionsAndLogits) {
  EXPECT_THROW(Sampler({.temperature = -1.0}), Error);
  EXPECT_THROW(Sampler({.top_p = 0.0}), Error);
  const std::vector<double> bad = {0.0, std::numeric_limits<double>::quiet_NaN()};
  EXPECT_THROW(Sampler({}).sample(std::span(bad), 0), Error);
  const std::vector<double> plus_inf = {0.0, std::numeric_limits<double>::infinity()};
  EXPECT_THROW(Sampler({}).sample(std::span(plus_inf), 0), Error);
  const std::vector<float> all_masked(4, -std::numeric_limits<float>::infinity());
  EXPECT_THROW(Sampler({.temperature = 0.0}).sample(std::span(all_masked), 0), Error);
  EXPECT_THROW(Sampler({}).sample(std::span(all_masked), 0), Error);
}

// −inf masks a token (the server masks ids its tokenizer lacks): masked ids are never drawn, and the others keep the
// softmax of their own logits, in every sampling mode.
TEST(Sampler, MaskedLogitsAreNeverDrawn) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  // The highest logit (id 1) masked: greedy takes the best unmasked one.
  std::vector<float> z(kLogits.begin(), kLogits.end());
  z[1] = kMasked;
  z[6] = kMasked;
  EXPECT_EQ(Sampler({.temperature = 0.0}).sample(std::span<const float>(z), 0), 4);
  for (const SamplerOptions o : {SamplerOptions{.temperature = 1.0}, SamplerOptions{.temperature = 3.0, .top_k = 6},
                                 SamplerOptions{.temperature = 2.0, .top_p = 0.99}}) {
    std::vector<int> seen(z.size(), 0);
    for (uint64_t c = 0; c < 4000; ++c) {
      const Sampler s({.temperature = o.temperature, .top_k = o.top_k, .top_p = o.top_p, .seed = c});
      ++seen[static_cast<size_t>(s.sample(std::span<const float>(z), c))];
    }
    EXPECT_EQ(seen[1] + seen[6], 0) << "a masked id was drawn at temperature " << o.temperature;
    EXPECT_GE(std::count_if(seen.begin(), seen.end(), [](int n) { return n > 0; }), 3) << "it still samples";
  }
}

// ================================================================ cache size of the presets
// n_layers · (kv_lora_rank + qk_rope_head_dim) values per token (docs/model.md §2, §10); the naive cache of
// up-projected keys and values would hold n_layers · n_heads · (d_qk + d_v).
TEST(Generator, CacheValuesPerTokenOfThePresets) {
  struct Want {
    const char* file;
    int64_t values;
  };
  for (const Want& w : {Want{"configs/tiny.yaml", 4 * (32 + 16)}, Want{"configs/bench.yaml", 12 * (256 + 32)},
                        Want{"configs/seed-20b.yaml", 48 * (512 + 64)}}) {
    const ModelConfig c = load_model_config(test::repo_path(w.file));
    const int64_t v = Generator::cache_values_per_token(c);
    const int64_t naive = c.n_layers * c.n_heads * (c.d_qk() + c.v_head_dim);
    std::printf("[cache] %-22s %6lld values/token = %7lld B f32, %7lld B bf16 (naive K/V cache: %lld values, %.1fx)\n",
                w.file, static_cast<long long>(v), static_cast<long long>(4 * v), static_cast<long long>(2 * v),
                static_cast<long long>(naive), static_cast<double>(naive) / static_cast<double>(v));
    EXPECT_EQ(v, w.values) << w.file;
  }
}

}  // namespace
}  // namespace diffmoe
