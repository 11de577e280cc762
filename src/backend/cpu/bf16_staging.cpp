#include "backend/cpu/bf16_staging.h"

#include <cstring>

namespace diffmoe {
namespace {

// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;

}  // namespace

float* CpuScratch::buffer(size_t slot, int64_t n) {
  if (buffers_.size() <= slot) buffers_.resize(slot + 1);  // moving the inner vectors keeps their data
  std::vector<float>& b = buffers_[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(static_cast<size_t>(n));
  return b.data();
}

void round_to_bf16(uint16_t* dst, const float* src, int64_t n) {
#pragma omp parallel for if (n >= kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

Tensor Bf16Staging::take(const Tensor& like) {
  const int64_t n = like.numel();
  Tensor t = like;
  t.dtype = DType::kF32;
  t.data = scratch_.buffer(scratch_.in_use++, n);
  return t;
}

Tensor Bf16Staging::input(const Tensor& t) {
  if (t.dtype != DType::kBF16 || t.data == nullptr) return t;
  const Tensor f = take(t);
  const auto* src = static_cast<const uint16_t*>(t.data);
  float* dst = f.ptr<float>();
  const int64_t n = t.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
  return f;
}

Tensor Bf16Staging::output(const Tensor& t) {
  if (t.dtype != DType::kBF16 || t.data == nullptr) return t;
  const Tensor f = input(t);  // t's values: what the op leaves alone rounds back to the same bits
  outputs_.emplace_back(t, f);
  return f;
}

Tensor Bf16Staging::rounded(const Tensor& t) {
  if (t.dtype == DType::kBF16) return input(t);
  if (t.dtype != DType::kF32 || t.data == nullptr) return t;
  const Tensor f = take(t);
  const float* src = t.ptr<float>();
  float* dst = f.ptr<float>();
  const int64_t n = t.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(f32_to_bf16(src[i]));
  return f;
}

void Bf16Staging::finish() {
  for (const auto& [t16, f] : outputs_) round_to_bf16(static_cast<uint16_t*>(t16.data), f.ptr<float>(), t16.numel());
  outputs_.clear();
}

}  // namespace diffmoe
