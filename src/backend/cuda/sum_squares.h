// Σ x² on the GPU for the global gradient norm (docs/model.md §7), shared by the sum_squares op
// (basic_ops.cu) and the grouped weight-gradient GEMM, whose kernel squares the values it stores
// (GroupedGemmWgradArgs::sum_sq). Everything is enqueued on the given stream; no atomics, so the
// sums are the same bits on every run.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace diffmoe::cuda {

// f64 partials launch_sum_squares needs for n elements: a function of n only.
int64_t sum_squares_partials(int64_t n);
// out[0] += Σ x[i]² (i < n): one f64 partial per block into `partial` (sum_squares_partials(n)
// doubles), then launch_add_partial_sums.
void launch_sum_squares(float* out, const float* x, int64_t n, double* partial, cudaStream_t s);
// out[0] += Σ partial[i] (i < n), added in a fixed order by one block, rounded once to f32.
void launch_add_partial_sums(float* out, const double* partial, int64_t n, cudaStream_t s);

}  // namespace diffmoe::cuda
