// Helpers for the eval tests: a byte-level tokenizer (one id per byte, so a text of n bytes is n
// tokens and hand computations stay simple), a small MoE model with O(1) activations, and the
// reference log-likelihood of one sequence from a forward of exactly that sequence (batch 1, no
// padding) with the log-softmax done here in f64.
#pragma once
#include <gtest/gtest.h>

#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "data/tokenizer.h"
#include "eval/batch_scorer.h"
#include "model/config.h"
#include "model/micro_config.h"
#include "model/model.h"

namespace diffmoe::test {

inline std::filesystem::path eval_fixtures() {
  const char* f = std::getenv("DIFFMOE_FIXTURES");
  return std::filesystem::path(f ? f : DIFFMOE_REPO_DIR "/tests/fixtures") / "eval";
}

// A temporary directory, removed with everything in it at the end of the scope.
class TempDir {
 public:
  TempDir() {
    std::string tpl = (std::filesystem::temp_directory_path() / "diffmoe-eval-XXXXXX").string();
    if (::mkdtemp(tpl.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
    path_ = tpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  // Writes `text` to <dir>/<name> and returns the path.
  std::filesystem::path write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

// Bytes 0..255 are ids 0..255; "<|endoftext|>" is 256.
class ByteTokenizer : public data::Tokenizer {
 public:
  static constexpr int32_t kEot = 256;
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    for (const char c : text) ids.push_back(static_cast<unsigned char>(c));
    return ids;
  }
  std::vector<int32_t> encode_with_special(std::string_view text) const override { return encode(text); }
  int32_t vocab_size() const override { return 257; }
  bool is_token(int32_t id) const override { return id >= 0 && id <= kEot; }
  std::string_view token_bytes(int32_t id) const override {
    static const std::vector<std::string> bytes = [] {
      std::vector<std::string> b;
      for (int i = 0; i < 256; ++i) b.emplace_back(1, static_cast<char>(i));
      b.emplace_back("<|endoftext|>");
      return b;
    }();
    return bytes.at(static_cast<size_t>(id));
  }
  std::optional<int32_t> eos_id() const override { return kEot; }
  std::span<const data::SpecialToken> special_tokens() const override { return specials_; }
  const std::string& name() const override { return name_; }
  data::TokenizerKind kind() const override { return data::TokenizerKind::kDiffmoe; }

 private:
  std::vector<data::SpecialToken> specials_ = {{"<|endoftext|>", kEot}};
  std::string name_ = "bytes";
};

// Differential attention, q compression, MoE layer with groups: the model's every branch, with a
// vocabulary that holds the byte tokenizer's ids.
inline ModelConfig eval_test_config(int64_t max_seq_len = 48) {
  nlohmann::ordered_json j = {{"vocab_size", 260},
                              {"dim", 16},
                              {"n_layers", 2},
                              {"n_dense_layers", 1},
                              {"n_heads", 4},
                              {"q_lora_rank", 8},
                              {"kv_lora_rank", 6},
                              {"qk_nope_head_dim", 4},
                              {"qk_rope_head_dim", 4},
                              {"v_head_dim", 4},
                              {"inter_dim", 24},
                              {"moe_inter_dim", 8},
                              {"n_routed_experts", 4},
                              {"n_shared_experts", 1},
                              {"n_activated_experts", 2},
                              {"n_expert_groups", 2},
                              {"n_limited_groups", 1},
                              {"max_seq_len", max_seq_len}};
  return ModelConfig::from_json(j, "eval_test");
}

// The model with O(1) activations (randomize_for_test), so log-probabilities vary by token.
inline std::unique_ptr<Model> eval_test_model(Backend& be, DType dtype, uint64_t seed = 11, int64_t max_seq_len = 48) {
  auto m = std::make_unique<Model>(eval_test_config(max_seq_len), be, dtype);
  randomize_for_test(*m, seed);
  return m;
}

// The eval test model's weights on any backend, precision and dtype: randomized on the host in
// f64, then written through set_param (rounded to each compute dtype).
inline std::unique_ptr<Model> eval_test_model_on(Backend& be, const ModelOptions& opt, uint64_t seed = 11,
                                                 int64_t max_seq_len = 48) {
  auto m = std::make_unique<Model>(eval_test_config(max_seq_len), be, DType::kF32, opt);
  randomize_for_test_on_host(*m, seed);
  return m;
}

// Σ_t [targets[t] ≠ −1] log softmax(logits_t)[targets[t]] from a forward of exactly this row.
inline double reference_logprob(Model& ref, const eval::ScoreRow& row) {
  const int64_t L = static_cast<int64_t>(row.inputs.size()), V = ref.config().vocab_size;
  ref.set_batch_shape(1, L);
  Owned tokens(Shape{1, L}, DType::kI32);
  for (int64_t t = 0; t < L; ++t) tokens.at<int32_t>(t) = row.inputs[static_cast<size_t>(t)];
  ref.forward({}, tokens, Tensor{});
  const Tensor logits = ref.logits();
  std::vector<double> host(static_cast<size_t>(L * V));
  if (logits.dtype == DType::kF64) {
    ref.backend().download(host.data(), logits);
  } else {
    std::vector<float> f(host.size());
    ref.backend().download(f.data(), logits);
    for (size_t i = 0; i < f.size(); ++i) host[i] = f[i];
  }
  double sum = 0;
  for (int64_t t = 0; t < L; ++t) {
    const int32_t y = row.targets[static_cast<size_t>(t)];
    if (y < 0) continue;
    const double* z = host.data() + t * V;
    double mx = z[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, z[v]);
    double se = 0;
    for (int64_t v = 0; v < V; ++v) se += std::exp(z[v] - mx);
    sum += z[y] - (mx + std::log(se));
  }
  return sum;
}

}  // namespace diffmoe::test
