#include "model/parameters.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "core/rng.h"

namespace diffmoe {

std::vector<ParamSpec> parameter_specs(const ModelConfig& c) {
  std::vector<ParamSpec> ps;
  const double std = c.init_std;
  const double out_std = std / std::sqrt(2.0 * static_cast<double>(c.n_layers));  // wo and every w2 (docs/model.md §6)
  auto add = [&](std::string name, Shape s, ParamKind k, double sd = 0.0) {
    ps.push_back({std::move(name), s, k, sd});
  };
  const int64_t D = c.dim, H = c.n_heads, dqk = c.d_qk();

  add("embed.weight", Shape{c.vocab_size, D}, ParamKind::kEmbedding, c.embed_init_std);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string p = fmt::format("layers.{}.", l);
    add(p + "attn_norm.weight", Shape{D}, ParamKind::kNorm);
    if (c.q_lora_rank > 0) {
      add(p + "attn.wq_a.weight", Shape{c.q_lora_rank, D}, ParamKind::kMatrix, std);
      add(p + "attn.q_norm.weight", Shape{c.q_lora_rank}, ParamKind::kNorm);
      add(p + "attn.wq_b.weight", Shape{H * dqk, c.q_lora_rank}, ParamKind::kMatrix, std);
    } else {
      add(p + "attn.wq.weight", Shape{H * dqk, D}, ParamKind::kMatrix, std);
    }
    add(p + "attn.wkv_a.weight", Shape{c.kv_lora_rank + c.qk_rope_head_dim, D}, ParamKind::kMatrix, std);
    add(p + "attn.kv_norm.weight", Shape{c.kv_lora_rank}, ParamKind::kNorm);
    add(p + "attn.wkv_b.weight", Shape{H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, ParamKind::kMatrix,
        std);
    add(p + "attn.wo.weight", Shape{D, H * c.v_head_dim}, ParamKind::kMatrix, out_std);
    if (c.differential) {
      add(p + "attn.subln.weight", Shape{2 * c.v_head_dim}, ParamKind::kNorm);
      for (const char* n : {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"})
        add(p + "attn." + n, Shape{dqk}, ParamKind::kLambda, 0.1);
    }
    add(p + "ffn_norm.weight", Shape{D}, ParamKind::kNorm);
    if (!c.is_moe_layer(l)) {
      add(p + "ffn.w1.weight", Shape{c.inter_dim, D}, ParamKind::kMatrix, std);
      add(p + "ffn.w2.weight", Shape{D, c.inter_dim}, ParamKind::kMatrix, out_std);
      add(p + "ffn.w3.weight", Shape{c.inter_dim, D}, ParamKind::kMatrix, std);
    } else {
      const int64_t E = c.n_routed_experts, I = c.moe_inter_dim, S = c.n_shared_experts * c.moe_inter_dim;
      add(p + "ffn.gate.weight", Shape{E, D}, ParamKind::kGate, std);
      add(p + "ffn.gate.bias", Shape{E}, ParamKind::kBias);
      add(p + "ffn.experts.w1", Shape{E, I, D}, ParamKind::kExpert, std);
      add(p + "ffn.experts.w2", Shape{E, D, I}, ParamKind::kExpert, out_std);
      add(p + "ffn.experts.w3", Shape{E, I, D}, ParamKind::kExpert, std);
      if (S > 0) {
        add(p + "ffn.shared.w1.weight", Shape{S, D}, ParamKind::kMatrix, std);
        add(p + "ffn.shared.w2.weight", Shape{D, S}, ParamKind::kMatrix, out_std);
        add(p + "ffn.shared.w3.weight", Shape{S, D}, ParamKind::kMatrix, std);
      }
    }
  }
  add("norm.weight", Shape{D}, ParamKind::kNorm);
  if (!c.tie_embeddings) add("head.weight", Shape{c.vocab_size, D}, ParamKind::kHead, std);
  return ps;
}

double init_value(const ParamSpec& p, uint64_t seed, int64_t i) {
  switch (p.kind) {
    case ParamKind::kNorm: return 1.0;
    case ParamKind::kBias: return 0.0;
    default: return p.init_std * normal_at(seed, stream_id(p.name), static_cast<uint64_t>(i));
  }
}

void init_values(const ParamSpec& p, uint64_t seed, int64_t first, std::span<double> out) {
  const int64_t n = static_cast<int64_t>(out.size());
  if (p.kind == ParamKind::kNorm || p.kind == ParamKind::kBias) {
    std::fill(out.begin(), out.end(), init_value(p, seed, first));
    return;
  }
  const uint64_t stream = stream_id(p.name);
  // Element e = first + j is number e of the stream: pair e / 2, its even or odd half.
  const int64_t pair0 = first / 2, pair_end = (first + n + 1) / 2;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t q = pair0; q < pair_end; ++q) {
    const std::array<double, 2> z = normal_pair_at(seed, stream, static_cast<uint64_t>(q));
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t j = 2 * q + h - first;
      if (j >= 0 && j < n) out[static_cast<size_t>(j)] = p.init_std * z[static_cast<size_t>(h)];
    }
  }
}

ParamCounts count_parameters(const ModelConfig& c, int64_t seq_len) {
  ParamCounts n;
  for (const ParamSpec& p : parameter_specs(c)) {
    const int64_t k = p.shape.numel();
    if (p.kind == ParamKind::kBias) {
      n.buffers += k;
      continue;
    }
    n.total += k;
    // A token runs K of the E routed experts: it touches K/E of their weights.
    const int64_t active = p.kind == ParamKind::kExpert ? k / c.n_routed_experts * c.n_activated_experts : k;
    n.active += active;
    if (p.kind == ParamKind::kEmbedding) n.embedding += k;
    if (p.kind == ParamKind::kMatrix || p.kind == ParamKind::kExpert || p.kind == ParamKind::kGate ||
        p.kind == ParamKind::kHead)
      n.active_matmul += active;
  }
  if (c.tie_embeddings) n.active_matmul += c.vocab_size * c.dim;  // the head is still a matmul
  const double dv_eff = static_cast<double>(c.differential ? 2 * c.v_head_dim : c.v_head_dim);
  n.flops_per_token =
      6.0 * static_cast<double>(n.active_matmul) +
      3.0 * static_cast<double>(c.n_layers * seq_len * c.n_heads) * (static_cast<double>(c.d_qk()) + dv_eff);
  return n;
}

}  // namespace diffmoe
