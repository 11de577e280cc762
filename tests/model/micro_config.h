// Micro configs for whole-model tests: every branch of the model at sizes where finite
// differences over all parameters are affordable.
#pragma once
#include <cmath>

#include "backend/cpu/cpu_backend.h"
#include "model/config.h"
#include "model/model.h"
#include "test_util.h"

namespace diffmoe::test {

// A batch of random token ids and targets for a whole-model test, with the targets at the `ignored`
// positions (flat indices into [B, T]) set to −1, which must not contribute.
struct Batch {
  Owned tokens, targets;
};
inline Batch make_batch(const ModelConfig& c, int64_t B, int64_t T, uint64_t seed,
                        std::initializer_list<int64_t> ignored) {
  Batch b{Owned(Shape{B, T}, DType::kI32), Owned(Shape{B, T}, DType::kI32)};
  fill_int(b.tokens, seed, 0, static_cast<int32_t>(c.vocab_size));
  fill_int(b.targets, seed + 1, 0, static_cast<int32_t>(c.vocab_size));
  for (const int64_t i : ignored) b.targets.at<int32_t>(i) = -1;
  return b;
}

// Differential attention, q compression, YaRN on, sigmoid router with groups and bias, aux loss.
inline ModelConfig micro_diff_config() {
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

// Plain MLA, no q compression, no YaRN, softmax router without groups or bias, tied embeddings,
// no shared experts.
inline ModelConfig micro_plain_config() {
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

// The fp8 mode's micro config: 128-wide projections, so that W_qa, W_qb, W_kva, W_o, the dense and
// shared FFN and the routed experts run the FP8 recipe (whole 128×128 weight blocks, docs/model.md §7);
// W_kvb ([224, 112]) keeps its bf16 GEMMs. Differential attention, q compression, a sigmoid router.
inline ModelConfig fp8_micro_config() {
  nlohmann::ordered_json j = {{"vocab_size", 64},
                              {"dim", 128},
                              {"n_layers", 2},
                              {"n_dense_layers", 1},
                              {"n_heads", 2},
                              {"q_lora_rank", 128},
                              {"kv_lora_rank", 112},
                              {"qk_nope_head_dim", 48},
                              {"qk_rope_head_dim", 16},
                              {"v_head_dim", 64},
                              {"inter_dim", 256},
                              {"moe_inter_dim", 128},
                              {"n_routed_experts", 4},
                              {"n_shared_experts", 1},
                              {"n_activated_experts", 2},
                              {"aux_loss_alpha", 0.01},
                              {"max_seq_len", 16},
                              {"original_seq_len", 16}};
  return ModelConfig::from_json(j, "fp8_micro");
}

// Replaces the (tiny, near-linear) spec initialisation with O(1) activations so that every
// nonlinearity matters in a gradient check: matrices N(0, 1/fan_in), norms 1 + 0.2·N, λ vectors
// 0.3·N, the balancing bias 0.05·N (it must move the selection), embeddings N(0, 1).
inline void randomize_for_test(Model& m, uint64_t seed) {
  uint64_t s = seed;
  for (const ParamSpec& p : m.specs()) {
    const Tensor t = m.params().get(p.name);
    ++s;
    switch (p.kind) {
      case ParamKind::kNorm: fill_normal(t, s, 0.2, 1.0); break;
      case ParamKind::kLambda: fill_normal(t, s, 0.3); break;
      case ParamKind::kBias: fill_normal(t, s, m.config().balance_bias ? 0.05 : 0.0); break;
      case ParamKind::kEmbedding: fill_normal(t, s, 1.0 / std::sqrt(static_cast<double>(m.config().dim))); break;
      default: fill_normal(t, s, 1.0 / std::sqrt(static_cast<double>(p.shape[-1]))); break;
    }
  }
}

// randomize_for_test's weights on a model of any backend, precision and dtype (randomize_for_test writes through host
// pointers, which a CUDA model's tensors are not): drawn on a host copy in f64, then written through set_param
// (rounded once to each compute dtype).
inline void randomize_for_test_on_host(Model& m, uint64_t seed) {
  CpuBackend host_be;
  Model host(m.config(), host_be, DType::kF64);
  randomize_for_test(host, seed);
  for (const ParamSpec& p : m.specs()) m.set_param(p.name, to_vector(host.params().get(p.name)));
}

}  // namespace diffmoe::test
