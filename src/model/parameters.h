// The parameter list of a config (names of docs/model.md §8, shapes of docs/model.md §2/§4/§5) and what depends on
// it alone: initialisation rules (docs/model.md §6), weight-decay classes, and parameter/FLOP counts.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace diffmoe {

enum class ParamKind : uint8_t {
  kEmbedding,  // embed.weight
  kHead,       // head.weight (absent when tied)
  kMatrix,     // attention projections, dense/shared FFN matrices
  kExpert,     // stacked routed-expert matrices [E, out, in]
  kGate,       // router weight [E, D]
  kNorm,       // RMSNorm weights (init 1)
  kLambda,     // λ vectors (init N(0, 0.1²))
  kBias,       // the balancing bias: a buffer, no gradient, updated by the bias rule (docs/model.md §5)
};

struct ParamSpec {
  std::string name;  // checkpoint name (docs/model.md §8)
  Shape shape;
  ParamKind kind;
  double init_std;  // N(0, init_std²) for matrices; unused for norms (1) and bias (0)
  bool trainable() const { return kind != ParamKind::kBias; }
  // AdamW weight decay applies to matrices only: never to norms, λ vectors, biases or embeddings.
  bool decayed() const {
    return kind == ParamKind::kMatrix || kind == ParamKind::kExpert || kind == ParamKind::kGate ||
           kind == ParamKind::kHead;
  }
};

std::vector<ParamSpec> parameter_specs(const ModelConfig& c);

// Initial value of element i of a parameter (docs/model.md §6); identical on every backend for a seed.
double init_value(const ParamSpec& p, uint64_t seed, int64_t i);
// init_value of elements first, first + 1, ... of a parameter into out, bitwise, in parallel: the
// name's stream id hashed once and each Box-Muller pair computed once (a 2B-weight model's host
// initialisation is this loop).
void init_values(const ParamSpec& p, uint64_t seed, int64_t first, std::span<double> out);

struct ParamCounts {
  int64_t total = 0;           // every parameter (the balancing bias excluded: it is a buffer)
  int64_t active = 0;          // per token: routed experts counted K/E
  int64_t embedding = 0;       // embed.weight
  int64_t active_matmul = 0;   // active non-embedding matmul weights + head (docs/model.md §9 FLOPs)
  int64_t buffers = 0;         // balancing biases
  double flops_per_token = 0;  // docs/model.md §9 at seq = max_seq_len
};
// FLOPs per token (docs/model.md §9): 6·(active non-embedding matmul weights + head)
//   + 3·n_layers·seq·n_heads·(d_qk + d_v,eff), d_v,eff = 2·v_head_dim if differential else v_head_dim.
ParamCounts count_parameters(const ModelConfig& c, int64_t seq_len);

}  // namespace diffmoe
