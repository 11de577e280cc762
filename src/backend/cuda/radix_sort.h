// A stable sort of i32 (key, value) pairs by key on the device (CUB's radix sort; one template
// instantiation for the whole backend, in basic_ops.cu). Used to group rows by key without
// atomics: the embedding backward (by token id) and the MoE routing plan (by expert).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace diffmoe::cuda {

// Bytes of CUB temporary storage for n pairs.
size_t sort_pairs_temp_bytes(int64_t n);
// keys_out/vals_out = (keys_in, vals_in) sorted by key, equal keys in input order (stable), all
// 32 key bits (negative keys sort first).
void sort_pairs(void* temp, size_t temp_bytes, const int32_t* keys_in, int32_t* keys_out, const int32_t* vals_in,
                int32_t* vals_out, int64_t n, cudaStream_t s);

}  // namespace diffmoe::cuda
