// RoPE frequencies with YaRN (docs/model.md §3, docs/derivations.md §5). Follows DeepSeek-V3's precompute_freqs_cis:
// the correction range comes from find_correction_dim, a linear ramp blends the extrapolated
// (high-frequency) and interpolated (low-frequency, θ/s) regimes, and cos/sin are NOT scaled
// (the attention temperature goes into the softmax scale as m², docs/derivations.md §5.2).
#include "model/rope_tables.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace diffmoe {

namespace {

bool yarn_enabled(const RopeParams& p) { return p.max_seq_len > p.original_seq_len; }

// fcd(n) = d · ln(L0 / (2π n)) / (2 ln b): the dimension index whose wavelength completes n
// rotations over the original context L0 (docs/derivations.md §5.1, DeepSeek find_correction_dim).
double find_correction_dim(double n_rotations, const RopeParams& p) {
  return static_cast<double>(p.rope_dim) *
         std::log(static_cast<double>(p.original_seq_len) / (n_rotations * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(p.theta));
}

void check_params(const RopeParams& p) {
  DIFFMOE_CHECK(p.rope_dim > 0 && p.rope_dim % 2 == 0, "[rope] rope_dim must be positive and even, got {}", p.rope_dim);
  DIFFMOE_CHECK(p.theta > 1.0, "[rope] rope_theta must be > 1, got {}", p.theta);
  if (yarn_enabled(p)) {
    DIFFMOE_CHECK(p.original_seq_len > 0, "[rope] YaRN needs original_seq_len > 0, got {}", p.original_seq_len);
    DIFFMOE_CHECK(p.factor > 0.0, "[rope] YaRN needs rope_factor > 0, got {}", p.factor);
    DIFFMOE_CHECK(p.beta_fast > 0.0 && p.beta_slow > 0.0, "[rope] beta_fast and beta_slow must be > 0, got {} and {}",
                  p.beta_fast, p.beta_slow);
  }
}

}  // namespace

std::vector<double> rope_frequencies(const RopeParams& p) {
  check_params(p);
  const int64_t half = p.rope_dim / 2;
  const double d = static_cast<double>(p.rope_dim);
  // θ_i = b^(−2i/d), i = 0 … d/2−1
  std::vector<double> freqs(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    freqs[static_cast<size_t>(i)] = std::pow(p.theta, -2.0 * static_cast<double>(i) / d);
  if (!yarn_enabled(p)) return freqs;

  // low = max(floor(fcd(β_fast)), 0), high = min(ceil(fcd(β_slow)), d−1); low == high → high += 0.001
  const double low = std::max(std::floor(find_correction_dim(p.beta_fast, p)), 0.0);
  double high = std::min(std::ceil(find_correction_dim(p.beta_slow, p)), d - 1.0);
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    // ramp_i = clamp((i − low)/(high − low), 0, 1), smooth_i = 1 − ramp_i
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double smooth = 1.0 - ramp;
    // θ'_i = θ_i/s · (1 − smooth_i) + θ_i · smooth_i
    double& f = freqs[static_cast<size_t>(i)];
    f = f / p.factor * (1.0 - smooth) + f * smooth;
  }
  return freqs;
}

void rope_tables(const RopeParams& p, int64_t max_pos, std::vector<double>& cos, std::vector<double>& sin) {
  DIFFMOE_CHECK(max_pos > 0, "[rope] max_pos must be > 0, got {}", max_pos);
  const std::vector<double> freqs = rope_frequencies(p);
  const int64_t half = p.rope_dim / 2;
  cos.assign(static_cast<size_t>(max_pos * half), 0.0);
  sin.assign(static_cast<size_t>(max_pos * half), 0.0);
  for (int64_t pos = 0; pos < max_pos; ++pos) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos) * freqs[static_cast<size_t>(i)];  // pos·θ'_i
      cos[static_cast<size_t>(pos * half + i)] = std::cos(angle);
      sin[static_cast<size_t>(pos * half + i)] = std::sin(angle);
    }
  }
}

double yarn_softmax_scale_factor(const RopeParams& p) {
  check_params(p);
  if (!yarn_enabled(p)) return 1.0;
  // m = 0.1 · mscale · ln(s) + 1 (DeepSeek yarn_get_mscale; 1 when s ≤ 1), the factor is m² (docs/model.md §2)
  const double m = p.factor <= 1.0 ? 1.0 : 0.1 * p.mscale * std::log(p.factor) + 1.0;
  return m * m;
}

}  // namespace diffmoe
