#include "model/config.h"

#include <cmath>
#include <functional>
#include <limits>
#include <map>

#include "core/error.h"
#include "io/config_file.h"
#include "model/rope_tables.h"

namespace diffmoe {

double ModelConfig::lambda_init(int64_t l) const { return 0.8 - 0.6 * std::exp(-0.3 * static_cast<double>(l)); }

double ModelConfig::softmax_scale() const {
  const RopeParams p{.rope_dim = qk_rope_head_dim,
                     .theta = rope_theta,
                     .max_seq_len = max_seq_len,
                     .original_seq_len = original_seq_len,
                     .factor = rope_factor,
                     .beta_fast = beta_fast,
                     .beta_slow = beta_slow,
                     .mscale = mscale};
  return yarn_softmax_scale_factor(p) / std::sqrt(static_cast<double>(d_qk()));
}

namespace {

using Json = nlohmann::ordered_json;

// One table drives parsing, printing and the unknown-key check, so the three never disagree.
struct Field {
  const char* key;
  bool required;
  std::function<void(ModelConfig&, const Json&, const std::string&)> read;
  std::function<Json(const ModelConfig&)> write;
};

template <class T>
T as(const Json& v, const std::string& where);

template <>
int64_t as<int64_t>(const Json& v, const std::string& where) {
  if (v.is_number_integer()) return v.get<int64_t>();
  // An integral double outside int64 (1e30, .inf) cannot be cast: that is undefined behaviour.
  // 2^63 is exact as a double, so [-2^63, 2^63) is exactly the range that converts.
  constexpr double kTwo63 = 9223372036854775808.0;
  if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && v.get<double>() >= -kTwo63 &&
      v.get<double>() < kTwo63)
    return static_cast<int64_t>(v.get<double>());
  DIFFMOE_FAIL("{}: expected an integer, got {}", where, v.dump());
}
template <>
double as<double>(const Json& v, const std::string& where) {
  DIFFMOE_CHECK(v.is_number(), "{}: expected a number, got {}", where, v.dump());
  // NaN and ±inf pass the range checks of validate() ("x <= 0" is false for NaN): no key takes them.
  // Nor a magnitude past f32's largest (1e39): the devices compute in f32, where it is inf.
  const double x = v.get<double>();
  DIFFMOE_CHECK(std::isfinite(x) && std::fabs(x) <= std::numeric_limits<float>::max(),
                "{}: must be a finite number of f32 range (|x| <= {}), got {}", where,
                std::numeric_limits<float>::max(), x);
  return x;
}
template <>
bool as<bool>(const Json& v, const std::string& where) {
  DIFFMOE_CHECK(v.is_boolean(), "{}: expected true or false, got {}", where, v.dump());
  return v.get<bool>();
}

#define DIFFMOE_FIELD(name, type, req)                                                                           \
  Field {                                                                                                        \
#name, req,                                                                                                  \
        [](ModelConfig & c, const Json& v,                                                                       \
           const std::string& w) { c.name = as<type>(v, w); }, [](const ModelConfig& c) { return Json(c.name); } \
  }

const std::vector<Field>& fields() {
  static const std::vector<Field> kFields = {
      DIFFMOE_FIELD(vocab_size, int64_t, true),
      DIFFMOE_FIELD(dim, int64_t, true),
      DIFFMOE_FIELD(n_layers, int64_t, true),
      DIFFMOE_FIELD(n_dense_layers, int64_t, true),
      DIFFMOE_FIELD(n_heads, int64_t, true),
      DIFFMOE_FIELD(q_lora_rank, int64_t, true),
      DIFFMOE_FIELD(kv_lora_rank, int64_t, true),
      DIFFMOE_FIELD(qk_nope_head_dim, int64_t, true),
      DIFFMOE_FIELD(qk_rope_head_dim, int64_t, true),
      DIFFMOE_FIELD(v_head_dim, int64_t, true),
      DIFFMOE_FIELD(inter_dim, int64_t, true),
      DIFFMOE_FIELD(moe_inter_dim, int64_t, true),
      DIFFMOE_FIELD(n_routed_experts, int64_t, true),
      DIFFMOE_FIELD(n_shared_experts, int64_t, true),
      DIFFMOE_FIELD(n_activated_experts, int64_t, true),
      DIFFMOE_FIELD(n_expert_groups, int64_t, false),
      DIFFMOE_FIELD(n_limited_groups, int64_t, false),
      Field{"score_func", false,
            [](ModelConfig& c, const Json& v, const std::string& w) {
              DIFFMOE_CHECK(v.is_string() && (v == "sigmoid" || v == "softmax"),
                            "{}: expected \"sigmoid\" or \"softmax\", got {}", w, v.dump());
              c.score_func = v == "sigmoid" ? ScoreFunc::kSigmoid : ScoreFunc::kSoftmax;
            },
            [](const ModelConfig& c) { return Json(c.score_func == ScoreFunc::kSigmoid ? "sigmoid" : "softmax"); }},
      DIFFMOE_FIELD(route_scale, double, false),
      DIFFMOE_FIELD(balance_bias, bool, false),
      DIFFMOE_FIELD(bias_update_rate, double, false),
      DIFFMOE_FIELD(aux_loss_alpha, double, false),
      DIFFMOE_FIELD(max_seq_len, int64_t, true),
      DIFFMOE_FIELD(original_seq_len, int64_t, false),
      DIFFMOE_FIELD(rope_theta, double, false),
      DIFFMOE_FIELD(rope_factor, double, false),
      DIFFMOE_FIELD(beta_fast, double, false),
      DIFFMOE_FIELD(beta_slow, double, false),
      DIFFMOE_FIELD(mscale, double, false),
      DIFFMOE_FIELD(differential, bool, false),
      DIFFMOE_FIELD(tie_embeddings, bool, false),
      DIFFMOE_FIELD(init_std, double, false),
      DIFFMOE_FIELD(embed_init_std, double, false),
      DIFFMOE_FIELD(embed_scale, double, false),
      DIFFMOE_FIELD(norm_eps, double, false),
  };
  return kFields;
}
#undef DIFFMOE_FIELD

}  // namespace

ModelConfig ModelConfig::from_json(const Json& j, const std::string& source) {
  DIFFMOE_CHECK(j.is_object(), "{}: model: expected a mapping of model keys, got {}", source, j.dump());
  std::map<std::string, const Field*> by_key;
  for (const Field& f : fields()) by_key[f.key] = &f;
  ModelConfig c;
  for (const auto& [key, value] : j.items()) {
    auto it = by_key.find(key);
    if (it == by_key.end()) {
      std::string known;
      for (const Field& f : fields()) known += fmt::format("{}{}", known.empty() ? "" : ", ", f.key);
      DIFFMOE_FAIL("{}: model.{}: unknown key (known keys: {})", source, key, known);
    }
    it->second->read(c, value, fmt::format("{}: model.{}", source, key));
  }
  for (const Field& f : fields())
    DIFFMOE_CHECK(!f.required || j.contains(f.key), "{}: model.{}: required key is missing", source, f.key);
  if (!j.contains("original_seq_len")) c.original_seq_len = c.max_seq_len;
  if (c.embed_init_std < 0) c.embed_init_std = c.init_std;
  if (c.embed_scale < 0) c.embed_scale = std::sqrt(static_cast<double>(c.dim));
  c.validate(source);
  return c;
}

Json ModelConfig::to_json() const {
  Json j = Json::object();
  for (const Field& f : fields()) j[f.key] = f.write(*this);
  return j;
}

namespace {
constexpr int64_t kMaxDimension = (int64_t{1} << 31) - 1;
}  // namespace

void ModelConfig::validate(const std::string& source) const {
  auto fail_if = [&](bool bad, const char* key, const std::string& why) {
    DIFFMOE_CHECK(!bad, "{}: model.{}: {}", source, key, why);
  };
  for (const Field& f : fields()) {  // also for a config built in code, not read by from_json
    const Json v = f.write(*this);
    fail_if(v.is_number_float() && !std::isfinite(v.get<double>()), f.key,
            fmt::format("must be a finite number, got {}", v.is_number_float() ? v.get<double>() : 0.0));
    // No dimension of a real model comes near 2^31; beyond it sizes and positions overflow.
    fail_if(v.is_number_integer() && v.get<int64_t>() > kMaxDimension, f.key,
            fmt::format("must be at most {}, got {}", kMaxDimension, v.is_number_integer() ? v.get<int64_t>() : 0));
  }
  for (auto [key, v] : {std::pair{"vocab_size", vocab_size},
                        {"dim", dim},
                        {"n_layers", n_layers},
                        {"n_heads", n_heads},
                        {"kv_lora_rank", kv_lora_rank},
                        {"qk_nope_head_dim", qk_nope_head_dim},
                        {"v_head_dim", v_head_dim},
                        {"max_seq_len", max_seq_len},
                        {"original_seq_len", original_seq_len}})
    fail_if(v <= 0, key, fmt::format("must be positive, got {}", v));
  fail_if(qk_rope_head_dim <= 0 || qk_rope_head_dim % 2 != 0, "qk_rope_head_dim",
          fmt::format("must be positive and even (RoPE rotates pairs), got {}", qk_rope_head_dim));
  fail_if(q_lora_rank < 0, "q_lora_rank", fmt::format("must be >= 0 (0 = no query compression), got {}", q_lora_rank));
  fail_if(n_dense_layers < 0 || n_dense_layers > n_layers, "n_dense_layers",
          fmt::format("must be in [0, n_layers = {}], got {}", n_layers, n_dense_layers));
  fail_if(differential && n_heads % 2 != 0, "n_heads",
          fmt::format("must be even when differential (heads pair up), got {}", n_heads));
  fail_if(n_dense_layers > 0 && inter_dim <= 0, "inter_dim",
          fmt::format("must be positive with dense layers, got {}", inter_dim));
  const bool has_moe = n_dense_layers < n_layers;
  if (has_moe) {
    fail_if(moe_inter_dim <= 0, "moe_inter_dim",
            fmt::format("must be positive with MoE layers, got {}", moe_inter_dim));
    fail_if(n_routed_experts <= 0, "n_routed_experts",
            fmt::format("must be positive with MoE layers, got {}", n_routed_experts));
    fail_if(n_shared_experts < 0, "n_shared_experts", fmt::format("must be >= 0, got {}", n_shared_experts));
    fail_if(n_expert_groups <= 0 || n_routed_experts % n_expert_groups != 0, "n_expert_groups",
            fmt::format("must divide n_routed_experts = {}, got {}", n_routed_experts, n_expert_groups));
    fail_if(n_limited_groups <= 0 || n_limited_groups > n_expert_groups, "n_limited_groups",
            fmt::format("must be in [1, n_expert_groups = {}], got {}", n_expert_groups, n_limited_groups));
    const int64_t kept = n_routed_experts / std::max<int64_t>(n_expert_groups, 1) * n_limited_groups;
    fail_if(n_activated_experts <= 0 || n_activated_experts > kept, "n_activated_experts",
            fmt::format("must be in [1, experts in the kept groups = {}], got {}", kept, n_activated_experts));
    // The routing op scores a group by its top-2 biased experts (op_validation.cpp, docs/model.md §9).
    fail_if(balance_bias && n_expert_groups > 1 && n_routed_experts / n_expert_groups < 2, "n_expert_groups",
            fmt::format("must leave at least 2 experts per group with balance_bias (the top-2 group score), got {} "
                        "groups of {}",
                        n_expert_groups, n_routed_experts / n_expert_groups));
  }
  fail_if(max_seq_len < original_seq_len, "max_seq_len",
          fmt::format("must be >= original_seq_len = {}, got {}", original_seq_len, max_seq_len));
  fail_if(yarn() && rope_factor <= 1.0, "rope_factor",
          fmt::format("must be > 1 when max_seq_len > original_seq_len (YaRN on), got {}", rope_factor));
  // Mirrors check_params in rope_tables.cpp, which would otherwise fail at the first forward.
  fail_if(!(rope_theta > 1.0), "rope_theta",
          fmt::format("must be > 1 (the frequencies theta^(-2i/d) must fall), got {}", rope_theta));
  fail_if(yarn() && !(beta_fast > 0.0), "beta_fast",
          fmt::format("must be > 0 when max_seq_len > original_seq_len (YaRN on), got {}", beta_fast));
  fail_if(yarn() && !(beta_slow > 0.0), "beta_slow",
          fmt::format("must be > 0 when max_seq_len > original_seq_len (YaRN on), got {}", beta_slow));
  fail_if(route_scale <= 0, "route_scale", "must be positive");
  fail_if(init_std <= 0, "init_std", "must be positive");
  fail_if(embed_init_std <= 0, "embed_init_std", "must be positive");
  fail_if(embed_scale <= 0, "embed_scale", "must be positive");
  fail_if(norm_eps <= 0, "norm_eps", "must be positive");
  fail_if(aux_loss_alpha < 0, "aux_loss_alpha", "must be >= 0");
  fail_if(bias_update_rate < 0, "bias_update_rate", "must be >= 0");
}

ModelConfig load_model_config(const std::string& path) {
  const Json doc = load_yaml_file(path);
  DIFFMOE_CHECK(doc.is_object(), "{}: expected a mapping with a 'model:' section", path);
  for (const auto& [key, value] : doc.items()) {
    bool known = false;
    for (const char* s : kConfigSections) known = known || key == s;
    DIFFMOE_CHECK(known, "{}: {}: unknown top-level section", path, key);
  }
  DIFFMOE_CHECK(doc.contains("model"), "{}: model: section is missing", path);
  return ModelConfig::from_json(doc["model"], path);
}

std::string config_differences(const ModelConfig& a, const ModelConfig& b) {
  const Json ja = a.to_json(), jb = b.to_json();
  std::string out;
  for (const auto& [key, va] : ja.items()) {
    const Json vb = jb.contains(key) ? jb[key] : Json();
    if (va != vb) out += fmt::format("{}model.{} {} vs {}", out.empty() ? "" : ", ", key, va.dump(), vb.dump());
  }
  return out;
}

}  // namespace diffmoe
