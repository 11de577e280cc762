// The paged latent cache ops on the CPU (op_args.h's paged section) and RoPE's per-row positions:
//  - paged_latent_attention equals latent_attention (the contiguous-cache op, itself checked against
//    the naive MHA path in tests/model/test_generator.cpp) sequence by sequence, for a packed batch
//    of sequences of different lengths with different numbers of query rows, blocks scattered in
//    the pool in no order and NaN in every pool row no sequence owns;
//  - paged_cache_write scatters rows to their slots and nothing else;
//  - rope with positions equals rope with pos_offset row by row;
//  - bad arguments and bad index contents are errors naming the op and the field.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::Owned;

// The same f64 arithmetic in the same order on both sides (the paged op only finds rows through
// the table): any difference beyond rounding of a reordered exp is a wrong row, position or head.
// Measured 0; 1e-13 allows for a compiler's different contraction of the two loops.
constexpr double kPagedTol = 1e-13;

struct Seq {
  int64_t kv_len, n_q;  // cached positions (new ones included), query rows (its last positions)
};

void check_paged_vs_contiguous(bool differential, int64_t H, uint64_t seed) {
  CpuBackend be;
  const DType f64 = DType::kF64;
  const int64_t rkv = 6, dr = 4, dn = 3, W = dn + dr, row = rkv + dr, bs = 3;
  const int64_t comps = differential ? 2 : 1, h_out = H / comps;
  // Four sequences: a decode step, a prefill chunk in the middle of a prompt, a whole prompt, and one
  // with no query rows this call (skipped).
  const std::vector<Seq> seqs = {{7, 1}, {10, 4}, {5, 5}, {4, 0}};
  const int64_t B = static_cast<int64_t>(seqs.size()), max_blocks = 4, n_blocks = 17;
  int64_t N = 0;
  for (const Seq& s : seqs) N += s.n_q;

  // Blocks handed out in a scrambled order: sequence b's i-th block is order[next++].
  std::vector<int32_t> order(static_cast<size_t>(n_blocks));
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = 0; i < order.size(); ++i) std::swap(order[i], order[(i * 7 + 3) % order.size()]);
  Owned pool(Shape{n_blocks, bs, row}, f64), table(Shape{B, max_blocks}, DType::kI32), kv_lens(Shape{B}, DType::kI32);
  Owned q_off(Shape{B + 1}, DType::kI32), lambda(Shape{1}, f64);
  for (int64_t i = 0; i < pool.numel(); ++i) pool.at<double>(i) = std::numeric_limits<double>::quiet_NaN();
  for (int64_t i = 0; i < table.numel(); ++i) table.at<int32_t>(i) = -5;  // entries past a length are never read
  lambda.at<double>(0) = 0.41;

  // Per sequence: its contiguous cache [1, S, row] (random), copied into its pool blocks.
  std::vector<Owned> contiguous;
  size_t next = 0;
  int64_t q_row = 0;
  for (int64_t b = 0; b < B; ++b) {
    const Seq& s = seqs[static_cast<size_t>(b)];
    contiguous.emplace_back(Shape{1, s.kv_len, row}, f64);
    test::fill_normal(contiguous.back(), seed + static_cast<uint64_t>(b));
    for (int64_t i = 0; i < (s.kv_len + bs - 1) / bs; ++i) table.at<int32_t>(b * max_blocks + i) = order[next++];
    for (int64_t p = 0; p < s.kv_len; ++p) {
      const int64_t blk = table.at<int32_t>(b * max_blocks + p / bs);
      for (int64_t c = 0; c < row; ++c)
        pool.at<double>((blk * bs + p % bs) * row + c) = contiguous.back().at<double>(p * row + c);
    }
    kv_lens.at<int32_t>(b) = static_cast<int32_t>(s.kv_len);
    q_off.at<int32_t>(b) = static_cast<int32_t>(q_row);
    q_row += s.n_q;
  }
  q_off.at<int32_t>(B) = static_cast<int32_t>(N);

  Owned q_lat(Shape{H, N, rkv}, f64), q_rope(Shape{N, H, W}, f64), out(Shape{h_out, N, rkv}, f64);
  test::fill_normal(q_lat, seed + 10);
  test::fill_normal(q_rope, seed + 11);
  for (int64_t i = 0; i < out.numel(); ++i) out.at<double>(i) = std::numeric_limits<double>::quiet_NaN();
  be.paged_latent_attention({}, {.out = out,
                                 .q_lat = q_lat,
                                 .q_rope = q_rope,
                                 .cache = pool,
                                 .lambda = lambda,
                                 .block_table = table,
                                 .kv_lens = kv_lens,
                                 .q_offsets = q_off,
                                 .q_rope_offset = dn,
                                 .scale = 0.37,
                                 .differential = differential});

  double worst = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const Seq& s = seqs[static_cast<size_t>(b)];
    if (s.n_q == 0) continue;
    const int64_t r0 = q_off.at<int32_t>(b);
    // The same queries in latent_attention's token-major layout [1, Tq, H, ·].
    Owned ql(Shape{1, s.n_q, H, rkv}, f64), qr(Shape{1, s.n_q, H, W}, f64), ref(Shape{1, s.n_q, h_out, rkv}, f64);
    for (int64_t t = 0; t < s.n_q; ++t)
      for (int64_t j = 0; j < H; ++j) {
        for (int64_t i = 0; i < rkv; ++i)
          ql.at<double>((t * H + j) * rkv + i) = q_lat.at<double>((j * N + r0 + t) * rkv + i);
        for (int64_t i = 0; i < W; ++i)
          qr.at<double>((t * H + j) * W + i) = q_rope.at<double>(((r0 + t) * H + j) * W + i);
      }
    be.latent_attention({}, {.out = ref,
                             .q_lat = ql,
                             .q_rope = qr,
                             .cache = contiguous[static_cast<size_t>(b)],
                             .lambda = lambda,
                             .kv_len = s.kv_len,
                             .q_rope_offset = dn,
                             .scale = 0.37,
                             .differential = differential});
    for (int64_t t = 0; t < s.n_q; ++t)
      for (int64_t g = 0; g < h_out; ++g)
        for (int64_t i = 0; i < rkv; ++i) {
          const double got = out.at<double>((g * N + r0 + t) * rkv + i),
                       want = ref.at<double>((t * h_out + g) * rkv + i);
          ASSERT_TRUE(std::isfinite(got))
              << "a NaN pool row (owned by no sequence) was read, or the row was not written";
          worst = std::max(worst, std::abs(got - want));
        }
  }
  std::printf("[paged] %-12s H=%lld max |paged - contiguous| = %.3e\n", differential ? "differential" : "plain",
              static_cast<long long>(H), worst);
  EXPECT_LE(worst, kPagedTol);
}

TEST(PagedLatentAttention, DifferentialMatchesContiguousCache) { check_paged_vs_contiguous(true, 4, 11); }
TEST(PagedLatentAttention, PlainMatchesContiguousCache) { check_paged_vs_contiguous(false, 3, 23); }

// The smallest valid call, and one field broken at a time.
struct SmallCall {
  Owned out{Shape{2, 2, 6}, DType::kF32}, q_lat{Shape{4, 2, 6}, DType::kF32}, q_rope{Shape{2, 4, 4}, DType::kF32};
  Owned pool{Shape{3, 2, 10}, DType::kF32}, table{Shape{1, 2}, DType::kI32}, kv_lens{Shape{1}, DType::kI32};
  Owned q_off{Shape{2}, DType::kI32}, lambda{Shape{1}, DType::kF32};
  SmallCall() {
    test::fill_normal(q_lat, 1);
    test::fill_normal(q_rope, 2);
    test::fill_normal(pool, 3);
    table.at<int32_t>(0) = 2;
    table.at<int32_t>(1) = 0;
    kv_lens.at<int32_t>(0) = 3;
    q_off.at<int32_t>(1) = 2;
  }
  PagedLatentAttentionArgs args() const {
    return {.out = out,
            .q_lat = q_lat,
            .q_rope = q_rope,
            .cache = pool,
            .lambda = lambda,
            .block_table = table,
            .kv_lens = kv_lens,
            .q_offsets = q_off};
  }
};

TEST(PagedLatentAttention, RejectsBadArgumentsAndIndices) {
  CpuBackend be;
  SmallCall c;
  EXPECT_NO_THROW(be.paged_latent_attention({}, c.args()));
  const std::string op = "[paged_latent_attention]";
  PagedLatentAttentionArgs a = c.args();
  a.differential = false;  // plain needs out [4, 2, 6]
  test::expect_error([&] { be.paged_latent_attention({}, a); }, {op, "out"});
  a = c.args();
  a.q_rope_offset = 1;  // rope columns [1, 5) do not fit W = 4
  test::expect_error([&] { be.paged_latent_attention({}, a); }, {op, "rope query columns"});
  c.table.at<int32_t>(1) = 3;  // the pool has blocks 0 … 2
  test::expect_error([&] { be.paged_latent_attention({}, c.args()); }, {op, "block_table[0, 1] = 3"});
  c.table.at<int32_t>(1) = 0;
  c.kv_lens.at<int32_t>(0) = 5;  // the table covers 2 blocks of 2 positions
  test::expect_error([&] { be.paged_latent_attention({}, c.args()); }, {op, "kv_lens[0] = 5"});
  c.kv_lens.at<int32_t>(0) = 1;  // fewer positions than its 2 query rows
  test::expect_error([&] { be.paged_latent_attention({}, c.args()); }, {op, "kv_lens[0] = 1"});
  c.kv_lens.at<int32_t>(0) = 3;
  c.q_off.at<int32_t>(1) = 1;  // must end at N = 2
  test::expect_error([&] { be.paged_latent_attention({}, c.args()); }, {op, "q_offsets"});
}

TEST(PagedCacheWrite, ScattersRowsToTheirSlots) {
  CpuBackend be;
  const int64_t n_blocks = 4, bs = 3, W = 5, N = 4;
  Owned pool(Shape{n_blocks, bs, W}, DType::kF32), rows(Shape{N, W}, DType::kF32), slots(Shape{N}, DType::kI32);
  test::fill_normal(pool, 7);
  test::fill_normal(rows, 8);
  const std::vector<float> before(pool.ptr<float>(), pool.ptr<float>() + pool.numel());
  const int32_t want[N] = {11, 0, 5, 6};
  for (int64_t n = 0; n < N; ++n) slots.at<int32_t>(n) = want[n];
  be.paged_cache_write({}, {.cache = pool, .rows = rows, .slots = slots});
  for (int64_t slot = 0; slot < n_blocks * bs; ++slot) {
    int64_t src = -1;
    for (int64_t n = 0; n < N; ++n)
      if (want[n] == slot) src = n;
    for (int64_t i = 0; i < W; ++i) {
      const float got = pool.at<float>(slot * W + i);
      EXPECT_EQ(got, src >= 0 ? rows.at<float>(src * W + i) : before[static_cast<size_t>(slot * W + i)])
          << "slot " << slot << " column " << i;
    }
  }
  slots.at<int32_t>(2) = 12;  // 4 blocks of 3 rows: slots 0 … 11
  test::expect_error([&] { be.paged_cache_write({}, {.cache = pool, .rows = rows, .slots = slots}); },
                     {"[paged_cache_write]", "slots[2] = 12"});
  slots.at<int32_t>(2) = 0;  // slot 0 twice
  test::expect_error([&] { be.paged_cache_write({}, {.cache = pool, .rows = rows, .slots = slots}); },
                     {"[paged_cache_write]", "slot 0 is written twice"});
  Owned narrow(Shape{N, W - 1}, DType::kF32);
  test::expect_error([&] { be.paged_cache_write({}, {.cache = pool, .rows = narrow, .slots = slots}); },
                     {"[paged_cache_write]", "rows"});
}

// RoPE at per-row positions equals RoPE of each row alone at pos_offset = its position.
TEST(RopePositions, EqualPerRowOffsets) {
  CpuBackend be;
  const int64_t N = 5, heads = 2, stride = 7, off = 3, dr = 4, max_pos = 9;
  Owned x(Shape{N, heads * stride}, DType::kF64), y(Shape{N, heads * stride}, DType::kF64);
  Owned cos(Shape{max_pos, dr / 2}, DType::kF64), sin(Shape{max_pos, dr / 2}, DType::kF64), pos(Shape{N}, DType::kI32);
  test::fill_normal(x, 1);
  test::copy_values(y, x);
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < dr / 2; ++i) {
      cos.at<double>(p * dr / 2 + i) = std::cos(0.3 * static_cast<double>(p * (i + 1)));
      sin.at<double>(p * dr / 2 + i) = std::sin(0.3 * static_cast<double>(p * (i + 1)));
    }
  const int32_t positions[N] = {8, 0, 3, 3, 6};
  for (int64_t n = 0; n < N; ++n) pos.at<int32_t>(n) = positions[n];
  be.rope({}, {.x = x,
               .cos = cos,
               .sin = sin,
               .n_heads = heads,
               .head_stride = stride,
               .col_offset = off,
               .rope_dim = dr,
               .positions = pos});
  for (int64_t n = 0; n < N; ++n)
    be.rope({}, {.x = y.t().rows(n, n + 1),
                 .cos = cos,
                 .sin = sin,
                 .n_heads = heads,
                 .head_stride = stride,
                 .col_offset = off,
                 .rope_dim = dr,
                 .seq_len = 1,
                 .pos_offset = positions[n]});
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(x.at<double>(i), y.at<double>(i)) << "element " << i;
  pos.at<int32_t>(4) = 9;  // the table has positions 0 … 8
  test::expect_error([&] { be.rope({}, {.x = x, .cos = cos, .sin = sin, .rope_dim = dr, .positions = pos}); },
                     {"[rope]", "positions[4] = 9"});
}

}  // namespace
}  // namespace diffmoe
