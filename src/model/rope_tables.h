// RoPE frequency tables with YaRN (docs/model.md §3, docs/derivations.md §5): cos/sin [max_pos, rope_dim/2].
#pragma once
#include <cstdint>
#include <vector>

namespace diffmoe {

struct RopeParams {
  int64_t rope_dim = 0;    // qk_rope_head_dim
  double theta = 10000.0;  // rope_theta
  int64_t max_seq_len = 0;
  int64_t original_seq_len = 0;
  double factor = 1.0;  // rope_factor
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 1.0;
};

// θ'_i for i < rope_dim/2: plain θ_i = theta^(−2i/d), YaRN-interpolated when
// max_seq_len > original_seq_len (DeepSeek precompute_freqs_cis).
std::vector<double> rope_frequencies(const RopeParams& p);
// cos/sin of pos·θ'_i, row-major [max_pos][rope_dim/2], in double (callers convert).
void rope_tables(const RopeParams& p, int64_t max_pos, std::vector<double>& cos, std::vector<double>& sin);
// Softmax-scale multiplier m² (docs/model.md §2): (0.1·mscale·ln(factor) + 1)² when YaRN is on, else 1.
double yarn_softmax_scale_factor(const RopeParams& p);

}  // namespace diffmoe
