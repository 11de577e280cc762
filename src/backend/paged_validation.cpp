// Argument checks of the paged latent cache ops (op_args.h's paged section; op_validation.h), shared
// by both backends, and the host-side checks of their index contents (the CPU backend reads them; the
// CUDA backend checks each index on the device where it uses it, device_issue.h).
#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "backend/op_validation.h"

namespace diffmoe {
namespace {

void expect(const Tensor& t, const Shape& shape, DType dtype, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_shape(t, shape, op, name);
  check_dtype(t, dtype, op, name);
}

// An i32 index tensor of `rank` on dev.
void expect_index(const Tensor& t, int rank, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_dtype(t, DType::kI32, op, name);
  DIFFMOE_CHECK(t.rank() == rank, "[{}] {} must be {}-D, got {}", op, name, rank, t.describe());
}

// The pool of one layer: [n_blocks, block_size, W] of a float type.
void expect_pool(const Tensor& t, Device dev, std::string_view op) {
  check_device(t, dev, op, "cache");
  DIFFMOE_CHECK(t.rank() == 3 && t.dim(0) >= 1 && t.dim(1) >= 1 && t.dim(2) >= 1,
                "[{}] cache must be [n_blocks, block_size, W] with every size >= 1, got {}", op, t.describe());
  DIFFMOE_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kF64, "[{}] cache must be f32 or f64, got {}", op,
                dtype_name(t.dtype));
}

}  // namespace

PagedCacheWriteDims validate_paged_cache_write(const PagedCacheWriteArgs& a, Device dev) {
  constexpr std::string_view kOp = "paged_cache_write";
  expect_pool(a.cache, dev, kOp);
  PagedCacheWriteDims d{.n_blocks = a.cache.dim(0), .block_size = a.cache.dim(1)};
  d.width = a.cache.dim(2);
  expect_index(a.slots, 1, dev, kOp, "slots");
  d.rows = a.slots.numel();
  expect(a.rows, Shape{d.rows, d.width}, a.cache.dtype, dev, kOp, "rows");
  return d;
}

void check_paged_slots(const int32_t* slots, const PagedCacheWriteDims& d, std::string_view op) {
  const int64_t capacity = d.n_blocks * d.block_size;
  std::vector<int32_t> seen(slots, slots + d.rows);
  for (int64_t n = 0; n < d.rows; ++n)
    DIFFMOE_CHECK(slots[n] >= 0 && slots[n] < capacity,
                  "[{}] slots[{}] = {} is outside the pool's {} rows ({} blocks of {})", op, n, slots[n], capacity,
                  d.n_blocks, d.block_size);
  std::sort(seen.begin(), seen.end());
  const auto dup = std::adjacent_find(seen.begin(), seen.end());
  DIFFMOE_CHECK(dup == seen.end(), "[{}] slot {} is written twice in one call", op, dup == seen.end() ? 0 : *dup);
}

PagedLatentDims validate_paged_latent_attention(const PagedLatentAttentionArgs& a, Device dev) {
  constexpr std::string_view kOp = "paged_latent_attention";
  PagedLatentDims d;
  check_device(a.q_lat, dev, kOp, "q_lat");
  DIFFMOE_CHECK(a.q_lat.rank() == 3 && a.q_lat.dim(0) >= 1 && a.q_lat.dim(2) >= 1,
                "[{}] q_lat must be [H, N, r_kv] with H, r_kv >= 1, got {}", kOp, a.q_lat.describe());
  d.heads = a.q_lat.dim(0);
  d.rows = a.q_lat.dim(1);
  d.r_kv = a.q_lat.dim(2);
  DIFFMOE_CHECK(!a.differential || d.heads % 2 == 0,
                "[{}] differential attention pairs component heads 2h, 2h+1: H must be even, got {}", kOp, d.heads);
  d.comps = a.differential ? 2 : 1;
  d.groups = d.heads / d.comps;

  expect_pool(a.cache, dev, kOp);
  d.n_blocks = a.cache.dim(0);
  d.block_size = a.cache.dim(1);
  DIFFMOE_CHECK(a.cache.dim(2) > d.r_kv,
                "[{}] cache rows must be r_kv + d_rope wide with r_kv = {} and d_rope >= 1, got {}", kOp, d.r_kv,
                a.cache.describe());
  d.d_rope = a.cache.dim(2) - d.r_kv;

  check_device(a.q_rope, dev, kOp, "q_rope");
  DIFFMOE_CHECK(a.q_rope.rank() == 3 && a.q_rope.dim(0) == d.rows && a.q_rope.dim(1) == d.heads,
                "[{}] q_rope must be [N, H, W] = [{}, {}, W], got {}", kOp, d.rows, d.heads, a.q_rope.describe());
  d.q_rope_width = a.q_rope.dim(2);
  DIFFMOE_CHECK(a.q_rope_offset >= 0 && a.q_rope_offset + d.d_rope <= d.q_rope_width,
                "[{}] rope query columns [{}, {}) do not fit q_rope's {} values per head", kOp, a.q_rope_offset,
                a.q_rope_offset + d.d_rope, d.q_rope_width);

  expect_index(a.block_table, 2, dev, kOp, "block_table");
  d.batch = a.block_table.dim(0);
  d.max_blocks = a.block_table.dim(1);
  DIFFMOE_CHECK(d.max_blocks >= 1, "[{}] block_table must have at least one column, got {}", kOp,
                a.block_table.describe());
  expect(a.kv_lens, Shape{d.batch}, DType::kI32, dev, kOp, "kv_lens");
  expect(a.q_offsets, Shape{d.batch + 1}, DType::kI32, dev, kOp, "q_offsets");

  const DType dt = a.cache.dtype;
  check_dtype(a.q_lat, dt, kOp, "q_lat");
  check_dtype(a.q_rope, dt, kOp, "q_rope");
  expect(a.out, Shape{d.groups, d.rows, d.r_kv}, dt, dev, kOp, "out");
  if (a.differential) expect(a.lambda, Shape{1}, dt, dev, kOp, "lambda");
  return d;
}

void check_paged_indices(const int32_t* block_table, const int32_t* kv_lens, const int32_t* q_offsets,
                         const PagedLatentDims& d, std::string_view op) {
  DIFFMOE_CHECK(q_offsets[0] == 0 && q_offsets[d.batch] == d.rows,
                "[{}] q_offsets must run from 0 to N = {}, got q_offsets[0] = {}, q_offsets[{}] = {}", op, d.rows,
                q_offsets[0], d.batch, q_offsets[d.batch]);
  const int64_t capacity = d.max_blocks * d.block_size;
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t n_b = int64_t{q_offsets[b + 1]} - q_offsets[b];
    DIFFMOE_CHECK(n_b >= 0, "[{}] q_offsets must not decrease: q_offsets[{}] = {} > q_offsets[{}] = {}", op, b,
                  q_offsets[b], b + 1, q_offsets[b + 1]);
    DIFFMOE_CHECK(kv_lens[b] >= n_b && kv_lens[b] <= capacity,
                  "[{}] kv_lens[{}] = {} must cover its {} query rows and fit the block table's {} positions", op, b,
                  kv_lens[b], n_b, capacity);
    if (n_b == 0) continue;  // skipped: its table row is not read
    const int64_t used = (kv_lens[b] + d.block_size - 1) / d.block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t blk = block_table[b * d.max_blocks + i];
      DIFFMOE_CHECK(blk >= 0 && blk < d.n_blocks, "[{}] block_table[{}, {}] = {} is outside the pool's {} blocks", op,
                    b, i, blk, d.n_blocks);
    }
  }
}

}  // namespace diffmoe
