// Device timing and inputs of the op benchmarks (bench_ops): the median of repeated runs timed with
// CUDA events on the legacy default stream (where the ops run with a default Context) after one
// warm-up run, and device tensors filled with random non-zero values.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_check.h"
#include "core/rng.h"

namespace diffmoe::bench {

// Median milliseconds of `reps` runs of fn after one warm-up.
template <class Fn>
double median_ms(int reps, Fn&& fn) {
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  fn();
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    CUDA_CHECK(cudaEventRecord(start, nullptr));
    fn();
    CUDA_CHECK(cudaEventRecord(stop, nullptr));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Uploads std·N(0,1) keyed by (seed, element) to a device f32 tensor (or its values rounded to bf16
// to a bf16 one: the same values as the f32 tensor filled with the same seed), in chunks.
inline void fill_normal(Backend& be, const Tensor& t, uint64_t seed, double std = 1.0) {
  constexpr int64_t kChunk = int64_t{1} << 22;
  const int64_t n = t.numel();
  std::vector<float> f;
  std::vector<uint16_t> h;
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t len = std::min(kChunk, n - off);
    f.resize(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i)
      f[static_cast<size_t>(i)] = static_cast<float>(std * normal_at(seed, 0x7e57, static_cast<uint64_t>(off + i)));
    Tensor part = t;
    part.data = static_cast<char*>(t.data) + off * static_cast<int64_t>(dtype_size(t.dtype));
    part.shape = Shape{len};
    if (t.dtype == DType::kBF16) {
      h.resize(f.size());
      for (size_t i = 0; i < f.size(); ++i) h[i] = f32_to_bf16(f[i]);
      be.upload(part, h.data());
    } else {
      be.upload(part, f.data());
    }
  }
}

// A device f32 or bf16 tensor's values as floats (both convert exactly).
inline std::vector<float> device_values(Backend& be, const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kBF16) {
    std::vector<uint16_t> h(v.size());
    be.download(h.data(), t);
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(h[i]);
  } else {
    be.download(v.data(), t);
  }
  return v;
}

}  // namespace diffmoe::bench
