#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/parameters.h"
#include "test_util.h"

namespace diffmoe {
namespace {

nlohmann::ordered_json minimal() {
  return {{"vocab_size", 100},
          {"dim", 32},
          {"n_layers", 2},
          {"n_dense_layers", 1},
          {"n_heads", 4},
          {"q_lora_rank", 0},
          {"kv_lora_rank", 8},
          {"qk_nope_head_dim", 4},
          {"qk_rope_head_dim", 4},
          {"v_head_dim", 4},
          {"inter_dim", 64},
          {"moe_inter_dim", 16},
          {"n_routed_experts", 8},
          {"n_shared_experts", 1},
          {"n_activated_experts", 2},
          {"max_seq_len", 64}};
}

std::string error_of(const nlohmann::ordered_json& j) {
  try {
    ModelConfig::from_json(j, "cfg.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelConfig, DefaultsResolved) {
  const ModelConfig c = ModelConfig::from_json(minimal(), "cfg.yaml");
  EXPECT_EQ(c.original_seq_len, 64);
  EXPECT_DOUBLE_EQ(c.embed_scale, std::sqrt(32.0));
  EXPECT_DOUBLE_EQ(c.embed_init_std, 0.02);
  EXPECT_EQ(c.score_func, ScoreFunc::kSigmoid);
  EXPECT_TRUE(c.differential);
  EXPECT_TRUE(c.balance_bias);
  EXPECT_DOUBLE_EQ(c.aux_loss_alpha, 1e-4);
  EXPECT_DOUBLE_EQ(c.lambda_init(0), 0.2);
  EXPECT_NEAR(c.lambda_init(1), 0.3555, 1e-4);  // docs/derivations.md §1.2
  // to_json → from_json round trip keeps every value.
  const ModelConfig back = ModelConfig::from_json(c.to_json(), "round-trip");
  EXPECT_EQ(back.to_json(), c.to_json());
}

TEST(ModelConfig, ErrorsNameTheKeyAndReason) {
  auto j = minimal();
  j["n_experts"] = 3;
  EXPECT_NE(error_of(j).find("cfg.yaml: model.n_experts: unknown key"), std::string::npos) << error_of(j);
  j = minimal();
  j["dim"] = "wide";
  EXPECT_NE(error_of(j).find("model.dim: expected an integer"), std::string::npos) << error_of(j);
  j = minimal();
  j["n_heads"] = 3;
  EXPECT_NE(error_of(j).find("model.n_heads: must be even"), std::string::npos) << error_of(j);
  j = minimal();
  j["n_expert_groups"] = 3;
  EXPECT_NE(error_of(j).find("model.n_expert_groups: must divide"), std::string::npos) << error_of(j);
  j = minimal();
  j["n_expert_groups"] = 4;
  j["n_limited_groups"] = 5;
  EXPECT_NE(error_of(j).find("model.n_limited_groups"), std::string::npos) << error_of(j);
  j = minimal();
  j["n_expert_groups"] = 4;
  j["n_limited_groups"] = 1;
  j["n_activated_experts"] = 3;  // only 2 experts in the one kept group
  EXPECT_NE(error_of(j).find("model.n_activated_experts"), std::string::npos) << error_of(j);
  j = minimal();
  j["original_seq_len"] = 128;
  EXPECT_NE(error_of(j).find("model.max_seq_len: must be >= original_seq_len"), std::string::npos) << error_of(j);
  j = minimal();
  j.erase("dim");
  EXPECT_NE(error_of(j).find("model.dim: required key is missing"), std::string::npos) << error_of(j);
  j = minimal();
  j["score_func"] = "relu";
  EXPECT_NE(error_of(j).find("model.score_func"), std::string::npos) << error_of(j);
  j = minimal();
  j["differential"] = 1;
  EXPECT_NE(error_of(j).find("model.differential: expected true or false"), std::string::npos) << error_of(j);
}

// What the ops reject at the first forward is rejected here, under the key to change
// (op_validation.cpp validate routing; rope_tables.cpp check_params).
TEST(ModelConfig, RejectsWhatTheOpsRejectAtTheFirstForward) {
  auto j = minimal();
  j["n_expert_groups"] = 8;  // 8 experts: groups of 1, no top-2 group score
  j["n_limited_groups"] = 4;
  EXPECT_NE(error_of(j).find("cfg.yaml: model.n_expert_groups: must leave at least 2 experts per group"),
            std::string::npos)
      << error_of(j);
  j["balance_bias"] = false;  // without the bias a group is scored by its best expert: allowed
  EXPECT_EQ(error_of(j), "");
  j = minimal();
  j["n_expert_groups"] = 4;  // groups of 2 are enough
  EXPECT_EQ(error_of(j), "");

  for (double theta : {1.0, 0.5, -2.0}) {
    j = minimal();
    j["rope_theta"] = theta;
    EXPECT_NE(error_of(j).find("cfg.yaml: model.rope_theta: must be > 1"), std::string::npos) << error_of(j);
  }

  j = minimal();
  j["original_seq_len"] = 32;  // < max_seq_len 64: YaRN on
  j["rope_factor"] = 2.0;
  EXPECT_EQ(error_of(j), "");
  j["beta_fast"] = 0.0;
  EXPECT_NE(error_of(j).find("cfg.yaml: model.beta_fast: must be > 0"), std::string::npos) << error_of(j);
  j["beta_fast"] = 32.0;
  j["beta_slow"] = -1.0;
  EXPECT_NE(error_of(j).find("cfg.yaml: model.beta_slow: must be > 0"), std::string::npos) << error_of(j);
  j = minimal();
  j["beta_slow"] = -1.0;  // YaRN off: the betas are unused, as in rope_tables.cpp
  EXPECT_EQ(error_of(j), "");
}

// A float that is integral but outside int64 would be undefined behaviour to cast.
TEST(ModelConfig, HugeIntegralFloatIsNotAnInteger) {
  for (double big : {1e30, -1e30, 9223372036854775808.0, HUGE_VAL}) {
    auto j = minimal();
    j["dim"] = big;
    EXPECT_NE(error_of(j).find("cfg.yaml: model.dim: expected an integer, got "), std::string::npos) << error_of(j);
  }
  auto j = minimal();
  j["dim"] = 1e30;
  EXPECT_NE(error_of(j).find("model.dim: expected an integer, got 1e+30"), std::string::npos) << error_of(j);
  j["dim"] = 32.0;  // integral and in range: fine
  EXPECT_EQ(error_of(j), "");
}

TEST(ModelConfig, YamlFileErrorsNameTheFile) {
  const auto dir = std::filesystem::temp_directory_path() / "diffmoe_cfg_test";
  std::filesystem::create_directories(dir);
  const auto path = (dir / "bad.yaml").string();
  std::ofstream(path) << "model:\n  dim: 8\nwhatever: 1\n";
  try {
    load_model_config(path);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.yaml: whatever: unknown top-level section"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(load_model_config((dir / "missing.yaml").string()), Error);
}

// docs/model.md §10: an independent count gives tiny 2.71M / 1.82M, bench 1892.31M / 335.18M,
// seed-20b 20841.17M / 6685.40M; FLOPs/token bench 1.973 G, seed-20b at 8K 67.9 G (docs/model.md §9).
// seed-slice (2026.31M / 964.62M, 5.7874 GFLOP/token at 4K) is pinned from diffmoe's own count, so
// that a change to the preset or the formulas shows.
TEST(ModelConfig, PresetsMatchTheSpecCounts) {
  struct Want {
    const char* file;
    double total_m, active_m, gflops;
  };
  for (const Want& w : {Want{"configs/tiny.yaml", 2.71, 1.82, -1}, Want{"configs/bench.yaml", 1892.31, 335.18, 1.973},
                        Want{"configs/seed-slice.yaml", 2026.31, 964.62, 5.7874},
                        Want{"configs/seed-20b.yaml", 20841.17, 6685.40, 67.9}}) {
    const ModelConfig c = load_model_config(test::repo_path(w.file));
    const ParamCounts n = count_parameters(c, c.max_seq_len);
    EXPECT_NEAR(static_cast<double>(n.total) / 1e6, w.total_m, 0.006) << w.file;
    EXPECT_NEAR(static_cast<double>(n.active) / 1e6, w.active_m, 0.006) << w.file;
    if (w.gflops > 0) {
      EXPECT_NEAR(n.flops_per_token / 1e9, w.gflops, 0.0006 * w.gflops) << w.file;
    }
  }
}

TEST(Parameters, NamesFollowSpec8) {
  auto j = minimal();
  const ModelConfig c = ModelConfig::from_json(j, "cfg");
  std::vector<std::string> names;
  for (const ParamSpec& p : parameter_specs(c)) names.push_back(p.name);
  for (const char* want : {"embed.weight", "layers.0.attn_norm.weight", "layers.0.attn.wq.weight",
                           "layers.0.attn.wkv_a.weight", "layers.0.attn.kv_norm.weight", "layers.0.attn.wkv_b.weight",
                           "layers.0.attn.wo.weight", "layers.0.attn.subln.weight", "layers.0.attn.lambda_q1",
                           "layers.0.ffn.w1.weight", "layers.1.ffn.gate.weight", "layers.1.ffn.gate.bias",
                           "layers.1.ffn.experts.w1", "layers.1.ffn.shared.w2.weight", "norm.weight", "head.weight"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  EXPECT_EQ(std::find(names.begin(), names.end(), "layers.0.attn.wq_a.weight"), names.end());
}

// init_values is init_value element by element, bitwise, from even and odd starts, short and long
// (parallel) runs, for every kind of parameter.
TEST(Parameters, InitValuesAreInitValueBitwise) {
  const ModelConfig c = ModelConfig::from_json(minimal(), "cfg");
  for (const ParamSpec& p : parameter_specs(c)) {
    for (const auto& [first, n] : {std::pair<int64_t, int64_t>{0, 1}, {1, 1}, {3, 6}, {0, 7}, {5, 70001}}) {
      std::vector<double> got(static_cast<size_t>(n), -123.0);
      init_values(p, 99, first, got);
      int64_t differ = 0;
      for (int64_t j = 0; j < n; ++j) differ += got[static_cast<size_t>(j)] != init_value(p, 99, first + j) ? 1 : 0;
      EXPECT_EQ(differ, 0) << p.name << " from " << first << ", " << n << " values";
    }
  }
}

}  // namespace
}  // namespace diffmoe
