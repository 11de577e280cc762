// The model configuration: exactly the `model:` keys of docs/model.md §9, their defaults, and the
// validation rules. Built from JSON (which YAML files, overrides and checkpoint metadata all become).
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "backend/op_args.h"

namespace diffmoe {

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t dim = 0;
  int64_t n_layers = 0;
  int64_t n_dense_layers = 0;
  int64_t n_heads = 0;      // component heads (docs/model.md §2); even when differential
  int64_t q_lora_rank = 0;  // 0 = no query compression (wq instead of wq_a/q_norm/wq_b)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t inter_dim = 0;
  int64_t moe_inter_dim = 0;
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = 0;
  int64_t n_activated_experts = 0;
  int64_t n_expert_groups = 1;
  int64_t n_limited_groups = 1;
  ScoreFunc score_func = ScoreFunc::kSigmoid;
  double route_scale = 1.0;
  bool balance_bias = true;
  double bias_update_rate = 1e-3;
  double aux_loss_alpha = 1e-4;
  int64_t max_seq_len = 0;
  int64_t original_seq_len = 0;
  double rope_theta = 10000.0;
  double rope_factor = 1.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  bool differential = true;
  bool tie_embeddings = false;
  double init_std = 0.02;
  double embed_init_std = -1.0;  // < 0: "= init_std" (resolved by from_json)
  double embed_scale = -1.0;     // < 0: "= √dim" (resolved by from_json)
  double norm_eps = 1e-6;

  // Derived quantities (docs/model.md §2).
  int64_t d_qk() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool yarn() const { return max_seq_len > original_seq_len; }
  bool is_moe_layer(int64_t l) const { return l >= n_dense_layers; }
  double lambda_init(int64_t l) const;  // 0.8 − 0.6·exp(−0.3·l), l 0-based
  double softmax_scale() const;         // d_qk^-1/2 · m² (YaRN on)

  // Reads a JSON object with exactly the §9 keys (missing optional keys take defaults; the sizes
  // are required). An unknown key, a wrong type or an inconsistent value throws diffmoe::Error
  // "<source>: model.<key>: <reason>".
  static ModelConfig from_json(const nlohmann::ordered_json& j, const std::string& source);
  nlohmann::ordered_json to_json() const;  // every key, defaults resolved
  void validate(const std::string& source) const;
};

// The keys whose values differ, for one-line errors: "model.dim 32 vs 48, model.n_layers 2 vs 4"
// (this's value first); "" when the configs are equal.
std::string config_differences(const ModelConfig& a, const ModelConfig& b);

// Reads the `model:` section of a YAML config file (errors name the file and the key). Top-level
// sections other than those the project knows (kConfigSections) are errors too.
ModelConfig load_model_config(const std::string& path);
// The top-level sections a config file may have.
inline constexpr const char* kConfigSections[] = {"model", "train", "data",      "optim",   "checkpoint",
                                                  "log",   "eval",  "tokenizer", "parallel"};

}  // namespace diffmoe
