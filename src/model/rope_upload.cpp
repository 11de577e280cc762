#include "model/rope_upload.h"

#include <vector>

#include "core/error.h"

namespace diffmoe {

RopeParams rope_params(const ModelConfig& c) {
  return RopeParams{.rope_dim = c.qk_rope_head_dim,
                    .theta = c.rope_theta,
                    .max_seq_len = c.max_seq_len,
                    .original_seq_len = c.original_seq_len,
                    .factor = c.rope_factor,
                    .beta_fast = c.beta_fast,
                    .beta_slow = c.beta_slow,
                    .mscale = c.mscale};
}

void upload_rope_tables(Backend& be, const ModelConfig& c, int64_t max_pos, const Tensor& cos, const Tensor& sin) {
  std::vector<double> cos64, sin64;
  rope_tables(rope_params(c), max_pos, cos64, sin64);
  DIFFMOE_CHECK(cos.dtype == sin.dtype, "[rope tables] cos is {}, sin is {}", dtype_name(cos.dtype),
                dtype_name(sin.dtype));
  if (cos.dtype == DType::kF64) {
    be.upload(cos, cos64.data());
    be.upload(sin, sin64.data());
    return;
  }
  DIFFMOE_CHECK(cos.dtype == DType::kF32, "[rope tables] unsupported dtype {}", dtype_name(cos.dtype));
  const std::vector<float> cos32(cos64.begin(), cos64.end()), sin32(sin64.begin(), sin64.end());
  be.upload(cos, cos32.data());
  be.upload(sin, sin32.data());
}

}  // namespace diffmoe
