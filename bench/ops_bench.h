// The op benchmarks of bench_ops (ops_bench.cpp runs them): CUDA kernels at the bench preset's
// shapes, median device times.
#pragma once
#include "backend/backend.h"

namespace diffmoe {
class CudaBackend;
}

namespace diffmoe::bench {

// The attention kernels (simple, f32 flash, bf16 tensor-core) at the bench shape: ms, and the
// kernels' results against each other; returns how many of those comparisons failed.
int bench_attention(CudaBackend& be);

// The memory-bound MoE/SwiGLU/cross-entropy/MLA/RoPE kernels at the bench shapes: ms and GB/s
// beside a device copy.
void bench_elementwise(Backend& be);

}  // namespace diffmoe::bench
