// CUDA vs CPU for the serving engine's ops (cuda_dual.h harness): paged_cache_write,
// paged_latent_attention (tiles of 16 keys and chunks of 8 heads: lengths and head counts that are
// not multiples of either, a sequence with no query rows, blocks in scrambled order, several key
// tiles per row; decode rows over long contexts, whose keys are split over blocks) and rope with per-row positions;
// plus the device-side checks of their indices.
#include "cuda_dual.h"

#include <numeric>

namespace diffmoe::cudatest {
namespace {

using test::expect_error;

// As kAttnTol in cuda_vs_cpu.cpp: f32 dot products, exp and the P·ĉ sums in another order (the GPU
// rescales per tile of 16 keys, the CPU runs two passes), amplified by exp, and the differential
// output cancels (A0ĉ − λA1ĉ): rtol 1e-4 with an absolute floor of 1e-5 for O(1) values.
constexpr Tol kPagedTol{1e-4, 1e-5, "f32 online softmax and sums in another order"};

struct Batch {
  std::vector<int32_t> kv_lens, n_q;
};

void check_paged(bool differential, int64_t H, int64_t r_kv, int64_t d_rope, int64_t bs, const Batch& batch) {
  const int64_t B = static_cast<int64_t>(batch.kv_lens.size()), W = r_kv + d_rope + 3, off = 2;
  int64_t N = 0, blocks_needed = 0, max_blocks = 1;
  for (int64_t b = 0; b < B; ++b) {
    N += batch.n_q[static_cast<size_t>(b)];
    const int64_t nb = (batch.kv_lens[static_cast<size_t>(b)] + bs - 1) / bs;
    blocks_needed += nb;
    max_blocks = std::max(max_blocks, nb);
  }
  const int64_t n_blocks = blocks_needed + 5, h_out = differential ? H / 2 : H;
  std::vector<int32_t> order(static_cast<size_t>(n_blocks));
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = 0; i < order.size(); ++i) std::swap(order[i], order[(i * 11 + 5) % order.size()]);
  std::vector<double> table(static_cast<size_t>(B * max_blocks), 0.0), offsets(static_cast<size_t>(B + 1), 0.0);
  size_t next = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < (batch.kv_lens[static_cast<size_t>(b)] + bs - 1) / bs; ++i)
      table[static_cast<size_t>(b * max_blocks + i)] = order[next++];
    offsets[static_cast<size_t>(b + 1)] = offsets[static_cast<size_t>(b)] + batch.n_q[static_cast<size_t>(b)];
  }
  Dual out(Shape{h_out, N, r_kv}), q_lat(Shape{H, N, r_kv}), q_rope(Shape{N, H, W}),
      pool(Shape{n_blocks, bs, r_kv + d_rope});
  Dual lambda(Shape{1}), tab(Shape{B, max_blocks}, DType::kI32), lens(Shape{B}, DType::kI32),
      q_off(Shape{B + 1}, DType::kI32);
  q_lat.normal(70, 0.5);
  q_rope.normal(71, 0.5);
  pool.normal(72);
  lambda.set({0.35});
  tab.set(table);
  lens.set(std::vector<double>(batch.kv_lens.begin(), batch.kv_lens.end()));
  q_off.set(offsets);
  out.poison();
  run_both([&](Backend& be, Side s) {
    be.paged_latent_attention({}, {.out = out[s],
                                   .q_lat = q_lat[s],
                                   .q_rope = q_rope[s],
                                   .cache = pool[s],
                                   .lambda = differential ? lambda[s] : Tensor{},
                                   .block_table = tab[s],
                                   .kv_lens = lens[s],
                                   .q_offsets = q_off[s],
                                   .q_rope_offset = off,
                                   .scale = 0.21,
                                   .differential = differential});
  });
  expect_close(
      out, kPagedTol,
      fmt::format("paged_latent_attention diff={} H={} r_kv={} d_rope={} bs={}", differential, H, r_kv, d_rope, bs));
}

TEST(CudaPaged, LatentAttentionMatchesCpu) {
  DIFFMOE_REQUIRE_CUDA();
  // Lengths around the 16-key tile (1, 15, 16, 17, 40), query rows of decode (1) and prefill (up to
  // the whole sequence), a sequence without query rows.
  const Batch mixed{{1, 17, 40, 16, 9, 15}, {1, 1, 7, 16, 0, 3}};
  check_paged(true, 4, 9, 4, 5, mixed);                    // one head chunk
  check_paged(false, 3, 9, 4, 4, mixed);                   // plain, odd head count
  check_paged(true, 20, 33, 6, 3, mixed);                  // 3 head chunks (8 + 8 + 4), r_kv not a multiple of a warp
  check_paged(true, 16, 512, 64, 16, {{70, 33}, {2, 1}});  // seed-20b's row width (72 KiB of shared memory)
  // Decode rows over long contexts: few (row, head chunk) blocks, so the keys are split over blocks and merged
  // (the kernel's split path: 19 splits of 32 keys here, most of them empty for the short sequences).
  check_paged(true, 16, 64, 8, 16, {{600, 1, 77, 300, 33}, {1, 1, 1, 2, 0}});
  check_paged(false, 5, 40, 8, 7, {{1000, 3}, {1, 1}});
  check_paged(true, 16, 256, 32, 16, {{540}, {1}});  // the bench preset's decode at batch 1 (r_kv 256, d_rope 32)
}

TEST(CudaPaged, CacheWriteMatchesCpu) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t n_blocks = 7, bs = 5, W = 37, N = 9;
  Dual pool(Shape{n_blocks, bs, W}), rows(Shape{N, W}), slots(Shape{N}, DType::kI32);
  pool.normal(80);
  rows.normal(81);
  slots.set({34, 0, 5, 6, 12, 33, 20, 1, 19});
  run_both(
      [&](Backend& be, Side s) { be.paged_cache_write({}, {.cache = pool[s], .rows = rows[s], .slots = slots[s]}); });
  expect_close(pool, kExact, "paged_cache_write");
}

TEST(CudaPaged, RopePositionsMatchCpu) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t N = 13, H = 3, dqk = 12, dn = 4, dr = 8, max_pos = 50;
  for (const int64_t stride : {dqk, int64_t{11}}) {  // aligned float4 pairs, and the scalar path
    Dual x(Shape{N, H * stride}), cos(Shape{max_pos, dr / 2}), sin(Shape{max_pos, dr / 2}), pos(Shape{N}, DType::kI32);
    x.normal(90);
    cos.normal(91);
    sin.normal(92);
    pos.set({49, 0, 3, 3, 17, 8, 1, 40, 2, 2, 30, 12, 6});
    run_both([&](Backend& be, Side s) {
      be.rope({}, {.x = x[s],
                   .cos = cos[s],
                   .sin = sin[s],
                   .n_heads = H,
                   .head_stride = stride,
                   .col_offset = stride == dqk ? dn : 3,
                   .rope_dim = dr,
                   .positions = pos[s]});
    });
    // The op-case rope tolerance (op_cases_elementwise.cpp): one f32 formula, FMA contraction on the GPU.
    expect_close(x, Tol{1e-6, 1e-6, "same f32 formula, FMA contraction"},
                 fmt::format("rope positions stride {}", stride));
  }
}

TEST(CudaPaged, BadIndicesAreReportedAtSynchronize) {
  DIFFMOE_REQUIRE_CUDA();
  Dual pool(Shape{3, 2, 10}), rows(Shape{2, 10}), slots(Shape{2}, DType::kI32);
  pool.normal(1);
  rows.normal(2);
  slots.set({1, 6});
  expect_error(
      [&] {
        gpu().paged_cache_write({}, {.cache = pool[Side::kGpu], .rows = rows[Side::kGpu], .slots = slots[Side::kGpu]});
        gpu().synchronize({});
      },
      {"[paged_cache_write]", "slots[1] = 6", "[0, 6)"});

  Dual out(Shape{2, 2, 6}), q_lat(Shape{4, 2, 6}), q_rope(Shape{2, 4, 4}), lambda(Shape{1});
  Dual tab(Shape{1, 2}, DType::kI32), lens(Shape{1}, DType::kI32), q_off(Shape{2}, DType::kI32);
  q_lat.normal(3);
  q_rope.normal(4);
  lambda.set({0.2});
  tab.set({2, 7});
  lens.set({3});
  q_off.set({0, 2});
  const auto call = [&] {
    gpu().paged_latent_attention({}, {.out = out[Side::kGpu],
                                      .q_lat = q_lat[Side::kGpu],
                                      .q_rope = q_rope[Side::kGpu],
                                      .cache = pool[Side::kGpu],
                                      .lambda = lambda[Side::kGpu],
                                      .block_table = tab[Side::kGpu],
                                      .kv_lens = lens[Side::kGpu],
                                      .q_offsets = q_off[Side::kGpu]});
    gpu().synchronize({});
  };
  expect_error(call, {"[paged_latent_attention]", "block_table[1] = 7", "[0, 3)"});
  tab.set({2, 0});
  lens.set({5});  // two blocks of two positions
  expect_error(call, {"[paged_latent_attention]", "kv_lens[0] = 5"});
  lens.set({3});
  q_off.set({0, 1});
  expect_error(call, {"[paged_latent_attention]", "q_offsets"});
  q_off.set({0, 2});
  EXPECT_NO_THROW(call());  // the backend stays usable
}

}  // namespace
}  // namespace diffmoe::cudatest
