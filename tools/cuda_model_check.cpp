// cuda_model_check: the whole model on the CPU and on the CUDA backend, same seed, same batch, one
// forward + backward each, in f32 on both. Prints the loss differences and, per parameter, the
// gradient relative error ‖cuda − cpu‖ / ‖cpu‖; exits 1 if any exceeds --tol (default 1e-4: f32
// against f32, where kernels differ only in summation order), 2 on an error, and 77 (ctest's
// SKIP_RETURN_CODE for this tool's tests in tests/model) when no CUDA device is usable here, unless
// DIFFMOE_REQUIRE_GPU=1 makes that an error.
//
// Configs: the two micro configs of tests/model/micro_config.h (every branch of the model: the
// differential and plain attention, q compression on/off, YaRN, sigmoid router with groups and
// bias, softmax router, tied embeddings, shared experts on/off), with O(1) random weights so every
// nonlinearity matters, and the tiny preset (configs/tiny.yaml) with the spec initialisation.
// The routing of both runs is compared too: near-tied router scores can pick different experts
// on the two backends, which would make the expert gradients incomparable; the tool says so.
// Last, decoding through the latent cache (Generator) is compared: prefill in chunks, then steps.
//
// Activation recompute (train.recompute, model/recompute.h): per case, the device side alone runs
// the step with `none` twice and with each mode (attention, moe, full) once, in the run's
// precision, after warming the GEMM autotune up (Backend::tuning: an untuned shape runs a different
// algorithm on each call, so the forward and the backward's recompute of one GEMM could differ in
// their last bits). Losses, logits, expert counts and routing come from the forward, which no mode
// changes: they must be bitwise those of `none`. Where the two `none` runs agree bitwise on every
// gradient, the backward is deterministic and each mode's gradients must be bitwise too (the recompute
// re-runs the same kernels on the same inputs). Where any gradient differs between the two `none` runs
// (a kernel adding with atomics), the last bits of what flows down from it differ too, and a reduction
// downstream (dλ = −Σ dout ⊙ o2, summed in f64 and rounded once) can agree in two runs by chance: then
// each gradient is within 4× its own `none` vs `none` difference (relative L2), or 1e-6 (f32) / 1e-3
// (bf16_gemm: a last-bit change before a bf16 rounding moves that value by 2^-8), whichever is larger.
// --no-recompute skips this part.
//
// Usage (from the repository root): cuda_model_check [--tiny configs/tiny.yaml] [--tol 1e-4]
//   [--against cuda]   (--against cpu compares the CPU with itself: a self-test of this tool)
//   [--verbose]        (one line per gradient; by default failures and each case's worst)
//   [--time STEPS]     (also the median time of a tiny-preset forward+backward on each backend)
//   [--no-recompute]   (skip the recompute modes' comparison against `none`)
//   [--precision bf16_gemm]  (the CUDA side in the bf16 GEMM mode: bf16 weight copies, bf16
//                      tensor-core GEMMs and attention, f32 router. Limits then: losses and logits
//                      3e-2; all gradients together ‖cuda − cpu‖/‖cpu‖ ≤ 5e-2; each gradient ≤ --tol,
//                      default 0.15 (cosine similarity ≥ 0.99); up to 1% of the routing choices may
//                      differ. Why so loose: each bf16 op is off by ~2e-3 (test_cuda_ops), and a
//                      gradient is the end of a chain of ~10 such ops per layer, so a few percent
//                      per tensor is the expected bf16 noise (measured: 3-8% on the micro configs'
//                      O(1) weights); a wrong index or a missing term gives O(1) errors, and the f32
//                      run of this tool checks every gradient to 1e-4.)
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/backend_registry.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/config.h"
#include "model/generator.h"
#include "model/model.h"
#include "model/model_file.h"
#include "train/optimizer.h"

namespace diffmoe {
namespace {

// tests/model/micro_config.h's micro_diff_config(): differential attention, q compression, YaRN,
// sigmoid router with groups and bias, aux loss.
ModelConfig micro_diff_config() {
  nlohmann::ordered_json j = {{"vocab_size", 23},
                              {"dim", 16},
                              {"n_layers", 3},
                              {"n_dense_layers", 1},
                              {"n_heads", 4},
                              {"q_lora_rank", 8},
                              {"kv_lora_rank", 6},
                              {"qk_nope_head_dim", 3},
                              {"qk_rope_head_dim", 4},
                              {"v_head_dim", 3},
                              {"inter_dim", 20},
                              {"moe_inter_dim", 6},
                              {"n_routed_experts", 8},
                              {"n_shared_experts", 1},
                              {"n_activated_experts", 2},
                              {"n_expert_groups", 4},
                              {"n_limited_groups", 2},
                              {"route_scale", 1.5},
                              {"aux_loss_alpha", 0.05},
                              {"max_seq_len", 8},
                              {"original_seq_len", 4},
                              {"rope_factor", 2.0}};
  return ModelConfig::from_json(j, "micro_diff");
}

// tests/model/micro_config.h's micro_plain_config(): plain MLA, no q compression, no YaRN, softmax
// router without groups or bias, tied embeddings, no shared experts.
ModelConfig micro_plain_config() {
  nlohmann::ordered_json j = {{"vocab_size", 19},
                              {"dim", 12},
                              {"n_layers", 2},
                              {"n_dense_layers", 1},
                              {"n_heads", 3},
                              {"q_lora_rank", 0},
                              {"kv_lora_rank", 5},
                              {"qk_nope_head_dim", 4},
                              {"qk_rope_head_dim", 2},
                              {"v_head_dim", 4},
                              {"inter_dim", 14},
                              {"moe_inter_dim", 5},
                              {"n_routed_experts", 6},
                              {"n_shared_experts", 0},
                              {"n_activated_experts", 3},
                              {"score_func", "softmax"},
                              {"balance_bias", false},
                              {"aux_loss_alpha", 0.02},
                              {"max_seq_len", 8},
                              {"differential", false},
                              {"tie_embeddings", true},
                              {"embed_scale", 1.0}};
  return ModelConfig::from_json(j, "micro_plain");
}

struct Case {
  std::string name;
  ModelConfig cfg;
  int64_t batch, seq;
  bool randomize;            // O(1) test weights (micro) instead of the spec initialisation (presets)
  std::string weights = {};  // a trained model .safetensors to load instead (--weights)
};

// The weights of tests/model/micro_config.h's randomize_for_test(), computed on the host and
// uploaded: matrices N(0, 1/fan_in), norms 1 + 0.2·N, λ vectors 0.3·N, the bias 0.05·N,
// embeddings N(0, 1/dim).
// Element i of parameter p under randomize(): well-conditioned random weights for the micro configs.
double random_value(const ParamSpec& p, const ModelConfig& cfg, uint64_t seed, int64_t i) {
  uint64_t s = seed + 1;
  for (const ParamSpec& q : parameter_specs(cfg)) {  // the stream of p: its position in the specs
    if (q.name == p.name) break;
    ++s;
  }
  double mean = 0.0, std = 1.0 / std::sqrt(static_cast<double>(p.shape[-1]));
  switch (p.kind) {
    case ParamKind::kNorm: mean = 1.0, std = 0.2; break;
    case ParamKind::kLambda: std = 0.3; break;
    case ParamKind::kBias: std = cfg.balance_bias ? 0.05 : 0.0; break;
    case ParamKind::kEmbedding: std = 1.0 / std::sqrt(static_cast<double>(cfg.dim)); break;
    default: break;
  }
  return static_cast<float>(mean + std * normal_at(s, 0x7e57, static_cast<uint64_t>(i)));
}

// The model's compute weights (and, with an optimizer, its masters) from random_value().
void randomize(Model& m, uint64_t seed, AdamW* opt = nullptr) {
  for (const ParamSpec& p : m.specs()) {
    const ParamLayout::Entry& e = *m.layout().find(p.name);
    std::vector<double> v(static_cast<size_t>(e.shape.numel()));
    for (size_t i = 0; i < v.size(); ++i)
      v[i] = random_value(p, m.config(), seed, e.global_offset + static_cast<int64_t>(i));
    m.set_param(p.name, v);
  }
  if (opt != nullptr)
    opt->set_masters([&](const ParamLayout::Entry& e, int64_t first, std::span<double> out) {
      for (size_t j = 0; j < out.size(); ++j)
        out[j] = random_value(e.spec, m.config(), seed, first + static_cast<int64_t>(j));
    });
}

template <class T>
std::vector<T> download(Backend& be, const Tensor& t) {
  std::vector<T> v(static_cast<size_t>(t.numel()));
  be.download(v.data(), t);
  return v;
}

// A float tensor's values as f32: f32 as stored, bf16 (the bf16 GEMM mode's logits) widened.
std::vector<float> download_f32(Backend& be, const Tensor& t) {
  if (t.dtype != DType::kBF16) return download<float>(be, t);
  const std::vector<uint16_t> raw = download<uint16_t>(be, t);
  std::vector<float> v(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) v[i] = bf16_to_f32(raw[i]);
  return v;
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    ref += static_cast<double>(b[i]) * b[i];
  }
  if (ref == 0.0) return std::sqrt(diff);  // an all-zero reference: the absolute error
  return std::sqrt(diff / ref);
}

struct Inputs {
  Arena arena;
  Tensor tokens, targets;
};

// tokens/targets [batch, seq] i32 on the backend, the same values for every backend.
Inputs make_inputs(Backend& be, const Case& c, uint64_t seed) {
  Inputs in;
  in.arena.add("tokens", Shape{c.batch, c.seq}, DType::kI32);
  in.arena.add("targets", Shape{c.batch, c.seq}, DType::kI32);
  in.arena.allocate(be.allocator());
  const int64_t n = c.batch * c.seq, V = c.cfg.vocab_size;
  std::vector<int32_t> tok(static_cast<size_t>(n)), tgt(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    tok[static_cast<size_t>(i)] = static_cast<int32_t>(uniform_at(seed, 1, static_cast<uint64_t>(i)) * (V - 1e-9));
    tgt[static_cast<size_t>(i)] =
        i % 11 == 5 ? -1 : static_cast<int32_t>(uniform_at(seed, 2, static_cast<uint64_t>(i)) * (V - 1e-9));
  }
  in.tokens = in.arena.get("tokens");
  in.targets = in.arena.get("targets");
  be.upload(in.tokens, tok.data());
  be.upload(in.targets, tgt.data());
  return in;
}

// One forward + backward on `be`; the model stays for the comparison.
std::unique_ptr<Model> run(Backend& be, const Case& c, uint64_t seed, Precision precision = Precision::kF32,
                           Recompute recompute = Recompute::kNone) {
  auto m =
      std::make_unique<Model>(c.cfg, be, DType::kF32, ModelOptions{.precision = precision, .recompute = recompute});
  m->init_weights(seed);
  if (c.randomize) randomize(*m, seed);
  if (!c.weights.empty()) load_weights(*m, c.weights);
  m->set_batch_shape(c.batch, c.seq);
  const Inputs in = make_inputs(be, c, seed);
  const Context ctx{};
  m->zero_grads(ctx);
  m->zero_expert_counts(ctx);
  m->forward(ctx, in.tokens, in.targets);
  m->backward(ctx, 1.0);
  be.synchronize(ctx);
  return m;
}

// Returns the number of checks over `tol`.
int check_case(const Case& c, Backend& cpu, Backend& gpu, double tol, bool verbose, bool bf16) {
  const double route_flip_limit = bf16 ? 0.01 : 0.0, value_tol = bf16 ? 3e-2 : tol, global_tol = bf16 ? 5e-2 : tol;
  std::printf("\n== %s: batch %lld × seq %lld, vocab %lld, dim %lld, %lld layers%s\n", c.name.c_str(),
              static_cast<long long>(c.batch), static_cast<long long>(c.seq), static_cast<long long>(c.cfg.vocab_size),
              static_cast<long long>(c.cfg.dim), static_cast<long long>(c.cfg.n_layers),
              c.randomize ? ", O(1) test weights" : ", spec initialisation");
  // Routing: near-tied router scores can pick different experts on the two backends, and then the
  // expert gradients (and the router's) are not comparable. f32: one seed, no flip allowed. bf16:
  // the rounding moves router inputs by ~1e-3, so a batch with a near tie flips; up to
  // kBf16SeedTries batches (seeds) are tried and the first whose flips stay within the limit is
  // checked. Every flip seen is printed; if every seed flips too much, that is a failure.
  constexpr uint64_t kSeed = 1234;
  constexpr int kBf16SeedTries = 4;
  const int tries = bf16 ? kBf16SeedTries : 1;
  uint64_t seed = kSeed;
  std::unique_ptr<Model> a, b;
  int64_t routing_failures = 0;
  for (int attempt = 0; attempt < tries; ++attempt) {
    seed = kSeed + static_cast<uint64_t>(attempt);
    a = run(cpu, c, seed);
    b = run(gpu, c, seed, bf16 ? Precision::kBF16 : Precision::kF32);
    routing_failures = 0;
    for (int64_t l = c.cfg.n_dense_layers; l < c.cfg.n_layers; ++l) {
      const Tensor ia = a->acts().get(fmt::format("act.{}.ffn.topk_idx", l)),
                   ib = b->acts().get(fmt::format("act.{}.ffn.topk_idx", l));
      const std::vector<int32_t> ra = download<int32_t>(cpu, ia), rb = download<int32_t>(gpu, ib);
      int64_t differ = 0;
      for (size_t i = 0; i < ra.size(); ++i) differ += ra[i] != rb[i] ? 1 : 0;
      if (differ == 0) continue;
      const bool over = static_cast<double>(differ) > route_flip_limit * static_cast<double>(ra.size());
      std::printf("  seed %llu, layer %lld: %lld of %zu routing choices differ (near-tied router scores)%s\n",
                  static_cast<unsigned long long>(seed), static_cast<long long>(l), static_cast<long long>(differ),
                  ra.size(), over ? ": expert gradients are not comparable for this seed" : ", within the limit");
      routing_failures += over ? 1 : 0;
    }
    if (routing_failures == 0) break;
    if (attempt + 1 < tries) std::printf("  trying the next seed\n");
  }
  if (routing_failures > 0) std::printf("  every seed tried flips too many routing choices  <-- FAIL\n");
  int failures = static_cast<int>(routing_failures);
  std::string worst_name;
  double worst = -1.0, all_err2 = 0.0, all_ref2 = 0.0;
  // One line per check when verbose, else only failures; the worst gradient is always printed.
  auto report = [&](const std::string& what, double err, double ref, double limit) {
    const bool bad = !(err <= limit);  // NaN fails
    failures += bad ? 1 : 0;
    if (verbose || bad)
      std::printf("  %-44s %12.5g  rel err %.3e%s\n", what.c_str(), ref, err, bad ? "  <-- FAIL" : "");
  };
  const LossValues la = a->losses(), lb = b->losses();
  std::printf("  loss (cpu / cuda): lm %.9g / %.9g, aux %.9g / %.9g, valid %lld / %lld\n", la.lm_loss, lb.lm_loss,
              la.aux_loss, lb.aux_loss, static_cast<long long>(la.valid), static_cast<long long>(lb.valid));
  report("lm_loss", std::fabs(lb.lm_loss - la.lm_loss) / std::max(std::fabs(la.lm_loss), 1e-30), la.lm_loss, value_tol);
  if (c.cfg.aux_loss_alpha > 0 && c.cfg.n_layers > c.cfg.n_dense_layers)
    report("aux_loss", std::fabs(lb.aux_loss - la.aux_loss) / std::max(std::fabs(la.aux_loss), 1e-30), la.aux_loss,
           value_tol);
  failures += la.valid == lb.valid ? 0 : 1;
  report("logits", rel_error(download_f32(gpu, b->logits()), download_f32(cpu, a->logits())), 0.0, value_tol);
  // The clipping norm as AdamW computes it after a backward: the expert stacks' Σg² as their
  // grouped wgrad added it up (Model::grad_sq_parts; on the GPU the kernel's epilogue), plus the
  // rest. Taken before the gradients are read below: grads() drops the expert part.
  const bool fused_a = a->grad_sq_parts().experts_sq.defined(), fused_b = b->grad_sq_parts().experts_sq.defined();
  AdamW opt_a(*a, OptimConfig{}), opt_b(*b, OptimConfig{});
  opt_a.compute_grad_sq({});
  opt_b.compute_grad_sq({});
  const double norm_a = opt_a.grad_norm(), norm_b = opt_b.grad_norm();
  if (verbose) std::printf("  %-44s %12s  %s\n", "gradient", "‖cpu‖", "‖cuda − cpu‖/‖cpu‖");
  for (const ParamLayout::Entry& e : a->layout().entries()) {
    const std::vector<float> ga = download<float>(cpu, a->grads().get(e.spec.name));
    const std::vector<float> gb = download<float>(gpu, b->grads().get(e.spec.name));
    double norm = 0.0;
    for (float x : ga) norm += static_cast<double>(x) * x;
    const double err = rel_error(gb, ga);
    report(e.spec.name, err, std::sqrt(norm), tol);
    all_ref2 += norm;
    all_err2 += err * err * norm;
    if (!(err <= worst)) {
      worst = err;
      worst_name = e.spec.name;
    }
  }
  const double global = std::sqrt(all_err2 / std::max(all_ref2, 1e-300));
  report("all gradients together", global, std::sqrt(all_ref2), global_tol);
  // The CPU optimizer's norm is the norm of the CPU gradients (f64 sums in other orders, stored in
  // f32 after each wgrad call and at the end: ~1e-6 relative at most); the
  // GPU's is within the gradients' global tolerance of it.
  const double cpu_norm = std::sqrt(all_ref2);
  report("grad norm, CPU optimizer vs its gradients", std::fabs(norm_a - cpu_norm) / cpu_norm, cpu_norm, 1e-5);
  report("grad norm, CUDA optimizer vs CPU optimizer", std::fabs(norm_b - norm_a) / norm_a, norm_a, global_tol);
  std::printf("  grad norm (optimizer; expert part from the wgrad GEMMs: cpu %s, cuda %s): cpu %.9g, cuda %.9g\n",
              fused_a ? "yes" : "no", fused_b ? "yes" : "no", norm_a, norm_b);
  failures += fused_a == fused_b ? 0 : 1;
  std::printf("  %zu gradients, worst rel err %.3e (%s), all together %.3e\n", a->layout().entries().size(), worst,
              worst_name.c_str(), global);

  // Decoding with the latent cache (Generator, latent_attention): a chunked prefill of 5 positions,
  // then 2 single steps, on both backends; the logits of each call compared.
  const GeneratorOptions go{.batch = 2, .max_len = std::min<int64_t>(c.cfg.max_seq_len, 16), .prefill_chunk = 3};
  Generator gen_a(*a, go), gen_b(*b, go);
  const int64_t V = c.cfg.vocab_size;
  std::vector<int32_t> ids(10);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(uniform_at(kSeed, 3, i) * (V - 1e-9));
  Tensor logits_a = gen_a.prefill({}, gen_a.upload_tokens(ids, 5));
  Tensor logits_b = gen_b.prefill({}, gen_b.upload_tokens(ids, 5));
  double worst_decode = rel_error(download<float>(gpu, logits_b), download<float>(cpu, logits_a));
  for (int step = 0; step < 2; ++step) {
    const std::vector<int32_t> next = {ids[static_cast<size_t>(step)], ids[static_cast<size_t>(5 + step)]};
    logits_a = gen_a.step({}, gen_a.upload_tokens(next, 1));
    logits_b = gen_b.step({}, gen_b.upload_tokens(next, 1));
    worst_decode = std::max(worst_decode, rel_error(download<float>(gpu, logits_b), download<float>(cpu, logits_a)));
  }
  report("decode logits (prefill 5 in chunks of 3, 2 steps)", worst_decode, 0.0, value_tol);
  std::printf("  decode: worst logits rel err %.3e; %d check%s over %.0e\n", worst_decode, failures,
              failures == 1 ? "" : "s", tol);
  return failures;
}

// A tensor's bytes as stored.
std::vector<uint8_t> raw_bytes(Backend& be, const Tensor& t) {
  std::vector<uint8_t> v(t.nbytes());
  be.download(v.data(), t);
  return v;
}

// What the forward leaves, as bytes by name: losses, logits, per MoE layer the routing and counts.
std::vector<std::pair<std::string, std::vector<uint8_t>>> forward_outputs(Model& m) {
  std::vector<std::pair<std::string, std::vector<uint8_t>>> out;
  const LossValues l = m.losses();
  for (const auto& [name, v] : {std::pair{"lm_loss", l.lm_loss}, std::pair{"aux_loss", l.aux_loss}}) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.emplace_back(name, std::vector<uint8_t>(p, p + sizeof v));
  }
  out.emplace_back("logits", raw_bytes(m.backend(), m.logits()));
  for (int64_t l = m.config().n_dense_layers; l < m.config().n_layers; ++l) {
    out.emplace_back(fmt::format("layer {} expert counts", l), raw_bytes(m.backend(), m.expert_counts(l)));
    const Tensor topk = m.acts().get(fmt::format("act.{}.ffn.topk_idx", l));
    out.emplace_back(fmt::format("layer {} top-k", l), raw_bytes(m.backend(), topk));
  }
  return out;
}

// Activation recompute on `be` alone, each mode against `none` (the file comment states the
// limits). Returns the number of failures.
int check_recompute(const Case& c, Backend& be, bool bf16, bool verbose) {
  constexpr uint64_t kSeed = 1234;
  constexpr int kMaxWarmup = 60;  // a shape called once a step settles within ~16 steps (lt_gemm.h)
  const Precision precision = bf16 ? Precision::kBF16 : Precision::kF32;
  const double floor = bf16 ? 1e-3 : 1e-6;
  int warm = 0;
  do {
    run(be, c, kSeed, precision);
    ++warm;
  } while (be.tuning() && warm < kMaxWarmup);
  std::printf("  recompute, %s side: %d warm-up step%s%s\n", std::string(be.name()).c_str(), warm, warm == 1 ? "" : "s",
              be.tuning() ? " (the GEMM autotune has still not settled: its trials can differ in the last bits)" : "");
  const std::unique_ptr<Model> ref = run(be, c, kSeed, precision), again = run(be, c, kSeed, precision);
  const auto ref_fwd = forward_outputs(*ref);
  bool deterministic = true;  // the two `none` runs agree bitwise on every gradient
  for (const ParamLayout::Entry& e : ref->layout().entries())
    deterministic =
        deterministic && raw_bytes(be, ref->grads().get(e.spec.name)) == raw_bytes(be, again->grads().get(e.spec.name));
  std::printf("  recompute: two runs of none give %s gradients\n", deterministic ? "bitwise equal" : "different");
  int failures = 0;
  for (const Recompute mode : {Recompute::kAttention, Recompute::kMoe, Recompute::kFull}) {
    const std::unique_ptr<Model> m = run(be, c, kSeed, precision, mode);
    const std::string name(recompute_name(mode));
    const auto fwd = forward_outputs(*m);
    int fwd_differ = 0;
    for (size_t i = 0; i < fwd.size(); ++i) {
      if (fwd[i].second == ref_fwd[i].second) continue;
      ++fwd_differ;
      std::printf("  recompute %-9s %s is not bitwise that of none  <-- FAIL\n", name.c_str(), fwd[i].first.c_str());
    }
    int bitwise = 0, total = 0, bad = 0;
    double worst = 0.0;
    std::string worst_name = "-";
    for (const ParamLayout::Entry& e : ref->layout().entries()) {
      const std::string& g = e.spec.name;
      const Tensor ga = ref->grads().get(g), gn = again->grads().get(g), gm = m->grads().get(g);
      const std::vector<uint8_t> ba = raw_bytes(be, ga), bn = raw_bytes(be, gn), bm = raw_bytes(be, gm);
      ++total;
      if (bm == ba) {
        ++bitwise;
        if (verbose) std::printf("  recompute %-9s %-44s bitwise\n", name.c_str(), e.spec.name.c_str());
        continue;
      }
      const std::vector<float> fa = download<float>(be, ga), fn = download<float>(be, gn), fm = download<float>(be, gm);
      const double err = rel_error(fm, fa), noise = bn == ba ? 0.0 : rel_error(fn, fa);
      const bool fail = deterministic || !(err <= std::max(4.0 * noise, floor));  // a deterministic step: bitwise
      bad += fail ? 1 : 0;
      if (!(err <= worst)) {
        worst = err;
        worst_name = e.spec.name;
      }
      if (verbose || fail)
        std::printf("  recompute %-9s %-44s rel err %.3e (none vs none: %s)%s\n", name.c_str(), e.spec.name.c_str(),
                    err, bn == ba ? "bitwise" : fmt::format("{:.3e}", noise).c_str(), fail ? "  <-- FAIL" : "");
    }
    std::printf("  recompute %-9s forward %s; %d of %d gradients bitwise those of none, worst rel err %.3e (%s)%s\n",
                name.c_str(), fwd_differ == 0 ? "bitwise" : "DIFFERS", bitwise, total, worst, worst_name.c_str(),
                fwd_differ + bad == 0 ? "" : "  <-- FAIL");
    failures += fwd_differ + bad;
  }
  return failures;
}

// The lm loss before each of `steps` AdamW steps on one batch and after the last (lr 1e-2, the
// default clip): steps + 1 values. In the bf16 GEMM mode the optimizer writes the bf16 weight copies
// together with the masters, and the next forward must see the updated weights.
std::vector<double> training_losses(Backend& be, const Case& c, uint64_t seed, int steps, Precision precision) {
  Model m(c.cfg, be, DType::kF32, ModelOptions{.precision = precision});
  AdamW opt(m, OptimConfig{});
  m.init_weights(seed);
  opt.init_masters(seed);
  if (c.randomize) randomize(m, seed, &opt);
  m.set_batch_shape(c.batch, c.seq);
  const Inputs in = make_inputs(be, c, seed);
  std::vector<double> losses;
  for (int s = 0; s <= steps; ++s) {
    m.zero_grads({});
    m.zero_expert_counts({});
    m.forward({}, in.tokens, in.targets);
    losses.push_back(m.losses().lm_loss);
    if (s == steps) break;
    m.backward({}, 1.0);
    opt.step({}, 1e-2);
  }
  return losses;
}

// Median wall time of one forward + backward (after one warm-up step), synchronized: a rough
// number for the micro configs, not a benchmark (bench/step_bench.cpp is).
double median_step_ms(Backend& be, const Case& c, int steps, Precision precision) {
  Model m(c.cfg, be, DType::kF32, ModelOptions{.precision = precision});
  m.init_weights(1);
  m.set_batch_shape(c.batch, c.seq);
  const Inputs in = make_inputs(be, c, 1);
  const Context ctx{};
  std::vector<double> ms;
  for (int i = 0; i <= steps; ++i) {
    be.synchronize(ctx);
    const auto t0 = std::chrono::steady_clock::now();
    m.zero_grads(ctx);
    m.forward(ctx, in.tokens, in.targets);
    m.backward(ctx, 1.0);
    be.synchronize(ctx);
    const double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (i > 0) ms.push_back(elapsed);  // step 0 warms up (module load, cuBLAS heuristics, scratch)
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

constexpr int kSkipExitCode = 77;  // nothing checked: no usable device

int main_impl(int argc, char** argv) {
  std::string tiny_path = "configs/tiny.yaml";
  std::string against = "cuda";
  double tol = -1.0;  // 1e-4 (f32) or 3e-2 (bf16_gemm) unless given
  std::string precision = "f32";
  bool verbose = false;
  int time_steps = 0;
  bool recompute = true;
  std::string weights;
  int64_t tiny_batch = 4, tiny_seq = 128;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--tiny" && i + 1 < argc) tiny_path = argv[++i];
    else if (arg == "--tol" && i + 1 < argc) tol = std::atof(argv[++i]);
    else if (arg == "--against" && i + 1 < argc) against = argv[++i];
    else if (arg == "--precision" && i + 1 < argc) precision = argv[++i];
    else if (arg == "--verbose") verbose = true;
    else if (arg == "--no-recompute") recompute = false;
    else if (arg == "--time" && i + 1 < argc) time_steps = std::max(1, std::atoi(argv[++i]));
    else if (arg == "--weights" && i + 1 < argc) weights = argv[++i];
    else if (arg == "--batch" && i + 1 < argc) tiny_batch = std::atoll(argv[++i]);
    else if (arg == "--seq" && i + 1 < argc) tiny_seq = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: cuda_model_check [--tiny configs/tiny.yaml] [--tol 1e-4] [--against cuda|cpu] [--verbose] "
                   "[--time STEPS]\n"
                   "                        [--no-recompute]\n"
                   "                        [--precision f32|bf16_gemm]\n"
                   "                        [--weights trained.safetensors --batch B --seq T]  (the preset case)\n");
      return 2;
    }
  }
  if (precision != "f32" && precision != "bf16_gemm") {
    std::fprintf(stderr, "cuda_model_check: --precision must be f32 or bf16_gemm, got %s\n", precision.c_str());
    return 2;
  }
  const bool bf16 = precision == "bf16_gemm";
  if (tol < 0) tol = bf16 ? 0.15 : 1e-4;
  if (const std::string unusable = backend_unusable_reason(against); !unusable.empty()) {
    const char* required = std::getenv("DIFFMOE_REQUIRE_GPU");
    if (required != nullptr && std::string(required) == "1") DIFFMOE_FAIL("DIFFMOE_REQUIRE_GPU=1, but {}", unusable);
    std::printf("cuda_model_check: skipped, %s\n", unusable.c_str());
    return kSkipExitCode;
  }
  std::unique_ptr<Backend> cpu = make_backend("cpu");
  std::unique_ptr<Backend> gpu = make_backend(against);
  std::printf("cuda_model_check: %s on the %s side, gradient tolerance %.2g\n", precision.c_str(), against.c_str(),
              tol);
  const std::vector<Case> cases = {
      {"micro_diff", micro_diff_config(), 3, 8, true},
      {"micro_plain", micro_plain_config(), 2, 7, true},
      {"tiny (" + tiny_path + (weights.empty() ? "" : ", weights " + weights) + ")", load_model_config(tiny_path),
       tiny_batch, tiny_seq, false, weights},
  };
  int failures = 0;
  for (const Case& c : cases) {
    failures += check_case(c, *cpu, *gpu, tol, verbose, bf16);
    if (recompute) failures += check_recompute(c, *gpu, bf16, verbose);
  }
  if (bf16) {
    const Case& c = cases.front();
    constexpr uint64_t kSeed = 1234;
    // Three AdamW steps on one batch, CPU f32 against the bf16 mode: the GPU's loss after them must
    // follow the CPU's descent to within a tenth of it (stale bf16 weight copies would leave the
    // GPU's loss where it started).
    const std::vector<double> lc = training_losses(*cpu, c, kSeed, 3, Precision::kF32),
                              lg = training_losses(*gpu, c, kSeed, 3, Precision::kBF16);
    const double descent = lc.front() - lc.back(), off = std::fabs(lg.back() - lc.back());
    const bool steps_bad = !(descent > 1e-3 * std::fabs(lc.front()) && off <= 0.1 * descent);
    std::printf(
        "== %s, 3 AdamW steps: lm loss cpu %.6f -> %.6f, bf16 mode %.6f -> %.6f (off by %.2e, %.0f%% of the "
        "descent)%s\n",
        c.name.c_str(), lc.front(), lc.back(), lg.front(), lg.back(), off, 100.0 * off / std::max(descent, 1e-30),
        steps_bad ? "  <-- FAIL" : "");
    failures += steps_bad ? 1 : 0;
  }
  if (time_steps > 0) {
    const Case& c = cases.back();
    const double cpu_ms = median_step_ms(*cpu, c, time_steps, Precision::kF32),
                 gpu_ms = median_step_ms(*gpu, c, time_steps, bf16 ? Precision::kBF16 : Precision::kF32);
    const double tokens = static_cast<double>(c.batch * c.seq);
    std::printf(
        "\ntiming, %s, %lld tokens, median of %d forward+backward steps: cpu %.1f ms (%.0f tokens/s), %s %.1f "
        "ms (%.0f tokens/s)\n",
        c.name.c_str(), static_cast<long long>(c.batch * c.seq), time_steps, cpu_ms, 1e3 * tokens / cpu_ms,
        against.c_str(), gpu_ms, 1e3 * tokens / gpu_ms);
  }
  std::printf("\ncuda_model_check: %s (%d check%s over %.0e)\n", failures == 0 ? "PASS" : "FAIL", failures,
              failures == 1 ? "" : "s", tol);
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace diffmoe

int main(int argc, char** argv) {
  try {
    return diffmoe::main_impl(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_model_check: %s\n", e.what());
    return 2;
  }
}
