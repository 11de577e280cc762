// Helpers the communicator implementations share: element ranges of flat tensors, the host
// reduction of the CPU transports, timeout texts.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "dist/communicator.h"

namespace diffmoe::dist {

using Clock = std::chrono::steady_clock;

// The 1-D view of elements [offset, offset + count) of t's flat data.
inline Tensor flat_view(const Tensor& t, int64_t offset, int64_t count) {
  Tensor v = t;
  v.data = static_cast<char*>(t.data) + offset * static_cast<int64_t>(dtype_size(t.dtype));
  v.shape = Shape{count};
  return v;
}

inline char* byte_ptr(const Tensor& t, int64_t element) {
  return static_cast<char*>(t.data) + element * static_cast<int64_t>(dtype_size(t.dtype));
}

// Whether the byte ranges of two tensors' data intersect (empty tensors never do).
inline bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data);
  const char* b0 = static_cast<const char*>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// acc[i] = op(acc[i], in[i]), i < n, in acc's dtype (bf16: through f32, rounded once per call; the
// same arithmetic as NCCL's per-step bf16 reduction). Integers wrap as in C.
void host_reduce(void* acc, const void* in, int64_t n, DType dtype, ReduceOp op);

// "3 s", "0.5 s"
std::string seconds_text(std::chrono::milliseconds t);

}  // namespace diffmoe::dist
