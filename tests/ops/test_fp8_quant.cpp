// The CPU FP8 quantisers (op_args.h's FP8 section, docs/model.md §7) against the rule written out in the test:
// every finite e4m3 code reached and read back exactly, ties to even, the amax floor, ue8m0 powers of
// two, tiles at the edges (sizes not multiples of 128), bf16 sources, the transposed copy made from
// the source and not from the row-wise copy, the weights' 128×128 blocks (and their transposed copy,
// the scale rows' padding), weight_dequant, and errors that name the field.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>
#include <tuple>
#include <vector>

#include "fp8_test_util.h"
#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::expect_error;
using test::Owned;

class Fp8Quant : public test::CpuOpsTest {};

// A source tensor [rows, cols] holding v, as f32 or bf16 (v bf16-exact where the test needs it).
Owned make_source(const std::vector<float>& v, int64_t rows, int64_t cols, DType dtype) {
  Owned t({rows, cols}, dtype);
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kBF16) static_cast<uint16_t*>(t.t().data)[i] = f32_to_bf16(v[i]);
    else t.ptr<float>()[i] = v[i];
  }
  return t;
}

std::vector<uint8_t> codes_of(const Owned& t) {
  const auto* p = static_cast<const uint8_t*>(t.t().data);
  return {p, p + t.numel()};
}
std::vector<float> floats_of(const Owned& t) { return {t.ptr<float>(), t.ptr<float>() + t.numel()}; }

// The outputs of act_quant on [m, k], filled with values the op must overwrite.
struct ActOut {
  Owned q, scale, q_t, scale_t;
  ActOut(int64_t m, int64_t k)
      : q({m, k}, DType::kF8E4M3),
        scale({fp8_tiles(k), m}, DType::kF32),
        q_t({k, m}, DType::kF8E4M3),
        scale_t({fp8_tiles(m), k}, DType::kF32) {
    std::memset(q.t().data, 0x7f, q.t().nbytes());  // NaN codes
    std::memset(q_t.t().data, 0x7f, q_t.t().nbytes());
    for (int64_t i = 0; i < scale.numel(); ++i) scale.at<float>(i) = -1.0f;
    for (int64_t i = 0; i < scale_t.numel(); ++i) scale_t.at<float>(i) = -1.0f;
  }
};

// act_quant on v [m, k] (both copies) against the reference: every code and scale bit for bit.
void check_act_quant(Backend& be, const std::vector<float>& v, int64_t m, int64_t k, DType dtype, bool ue8m0,
                     const char* what) {
  const Owned x = make_source(v, m, k, dtype);
  ActOut out(m, k);
  be.act_quant({}, {.q = out.q, .scale = out.scale, .q_t = out.q_t, .scale_t = out.scale_t, .x = x, .ue8m0 = ue8m0});
  const test::RefQuant rows = test::ref_quant_rows(v, m, k, ue8m0);
  const test::RefQuant cols = test::ref_quant_rows(test::transposed(v, m, k), k, m, ue8m0);
  EXPECT_EQ(codes_of(out.q), rows.q) << what << ": q";
  EXPECT_EQ(floats_of(out.scale), rows.scale) << what << ": scale";
  EXPECT_EQ(codes_of(out.q_t), cols.q) << what << ": q_t";
  EXPECT_EQ(floats_of(out.scale_t), cols.scale) << what << ": scale_t";
}

// Every finite code, at s = 2^e exactly: a tile holding 448·2^e has s = 448·2^e / 448 = 2^e, so each
// value c·2^e divides exactly and must come back as code c (subnormal codes and −0 included).
TEST_F(Fp8Quant, EveryCodeComesBackExactly) {
  const std::vector<uint8_t> codes = test::finite_e4m3_codes();  // 254
  const int64_t k = 2 * kFp8Tile;
  for (int e : {-20, -3, 0, 7, 15})
    for (DType dt : {DType::kF32, DType::kBF16})
      for (bool ue8m0 : {false, true}) {
        std::vector<float> v(static_cast<size_t>(k));
        for (size_t i = 0; i < codes.size(); ++i) v[i] = std::ldexp(e4m3_to_f32(codes[i]), e);
        v[254] = v[255] = std::ldexp(448.0f, e);  // both tiles' amax (tile 1 has codes 128.. too)
        const Owned x = make_source(v, 1, k, dt);
        ActOut out(1, k);
        be.act_quant(ctx, {.q = out.q, .scale = out.scale, .x = x, .ue8m0 = ue8m0});
        EXPECT_EQ(out.scale.at<float>(0), std::ldexp(1.0f, e));
        EXPECT_EQ(out.scale.at<float>(1), std::ldexp(1.0f, e));
        const std::vector<uint8_t> got = codes_of(out.q);
        std::set<uint8_t> seen;
        for (size_t i = 0; i < codes.size(); ++i) {
          EXPECT_EQ(got[i], codes[i]) << "e " << e << " code " << int(codes[i]) << " " << dtype_name(dt);
          seen.insert(got[i]);
        }
        EXPECT_EQ(seen.size(), 254u);
        EXPECT_EQ(got[254], 0x7e);  // the amax lands on 448
      }
}

// Exact ties between neighbouring codes round to the even code (the one whose last mantissa bit is
// 0), one f32 step beside a tie to the nearer code; also for the transposed copy (a column of ties).
TEST_F(Fp8Quant, TiesRoundToEven) {
  const int64_t k = kFp8Tile;
  for (bool negative : {false, true}) {
    std::vector<float> tie(static_cast<size_t>(k)), up(tie), down(tie);
    std::vector<uint8_t> even(static_cast<size_t>(k)), hi(even), lo(even);
    const uint8_t sign = negative ? 0x80 : 0x00;
    for (int c = 0; c < 0x7e; ++c) {  // 126 ties: between c and c + 1, subnormal ones included
      const float a = e4m3_to_f32(static_cast<uint8_t>(c)), b = e4m3_to_f32(static_cast<uint8_t>(c + 1));
      const float mid = (a + b) / 2.0f, sgn = negative ? -1.0f : 1.0f;
      tie[c] = sgn * mid;
      up[c] = sgn * std::nextafter(mid, 1000.0f);
      down[c] = sgn * std::nextafter(mid, 0.0f);
      even[c] = static_cast<uint8_t>(sign | (c % 2 == 0 ? c : c + 1));
      hi[c] = static_cast<uint8_t>(sign | (c + 1));
      lo[c] = static_cast<uint8_t>(sign | c);
    }
    for (auto* row : {&tie, &up, &down}) (*row)[126] = (*row)[127] = 448.0f;  // amax 448: s = 1
    const std::vector<std::pair<const std::vector<float>*, const std::vector<uint8_t>*>> cases = {
        {&tie, &even}, {&up, &hi}, {&down, &lo}};
    for (const auto& [vals, want] : cases) {
      // Row-wise: x [1, 128]; transposed copy: x [128, 1], whose one column is the same tile.
      const Owned x_row = make_source(*vals, 1, k, DType::kF32), x_col = make_source(*vals, k, 1, DType::kF32);
      ActOut r(1, k), c(k, 1);
      be.act_quant(ctx, {.q = r.q, .scale = r.scale, .x = x_row});
      be.act_quant(ctx, {.q_t = c.q_t, .scale_t = c.scale_t, .x = x_col});
      ASSERT_EQ(r.scale.at<float>(0), 1.0f);
      ASSERT_EQ(c.scale_t.at<float>(0), 1.0f);
      const std::vector<uint8_t> got_r = codes_of(r.q), got_c = codes_of(c.q_t);
      for (int i = 0; i < 0x7e; ++i) {
        EXPECT_EQ(got_r[static_cast<size_t>(i)], (*want)[static_cast<size_t>(i)]) << "row-wise, between codes " << i;
        EXPECT_EQ(got_c[static_cast<size_t>(i)], (*want)[static_cast<size_t>(i)]) << "column-wise, between codes " << i;
      }
    }
  }
}

// Random-ish values of every kind (fp8_test_values) at sizes that are not multiples of 128 (edge
// tiles of 44 and 72), f32 and bf16 sources, with and without ue8m0: both copies bit for bit.
TEST_F(Fp8Quant, ActQuantMatchesTheRule) {
  const int64_t m = 200, k = 300;
  for (DType dt : {DType::kF32, DType::kBF16})
    for (bool ue8m0 : {false, true}) {
      const std::vector<float> v = test::fp8_test_values(m, k, 17, dt == DType::kBF16);
      check_act_quant(be, v, m, k, dt, ue8m0, dt == DType::kBF16 ? "bf16" : "f32");
      check_act_quant(be, test::transposed(v, m, k), k, m, dt, ue8m0, "transposed values");
    }
  check_act_quant(be, test::fp8_test_values(1, 1, 3), 1, 1, DType::kF32, false, "1x1");
  check_act_quant(be, test::fp8_test_values(130, 129, 5), 130, 129, DType::kF32, false, "130x129");
}

// Every value comes back within half a step of its code: |q·s − x| ≤ 2^-4·|x| (normal e4m3 range,
// 3-bit mantissa) + 2^-10·s (half the subnormal step 2^-9·s), + 2^-20·|x| for the f32 quotient. An independent check of
// the scale's direction: a scale applied the wrong way round would miss by orders of magnitude.
TEST_F(Fp8Quant, DequantisedValuesAreNearTheSource) {
  const int64_t m = 140, k = 260;
  const std::vector<float> v = test::fp8_test_values(m, k, 29);
  const Owned x = make_source(v, m, k, DType::kF32);
  ActOut out(m, k);
  be.act_quant(ctx, {.q = out.q, .scale = out.scale, .x = x});
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const double s = out.scale.at<float>((j / kFp8Tile) * m + i);
      const double xv = v[static_cast<size_t>(i * k + j)];
      const double back = e4m3_to_f32(codes_of(out.q)[static_cast<size_t>(i * k + j)]) * s;
      // (+2^-20·|x|: the f32 quotient x/s is itself rounded before the e4m3 rounding)
      ASSERT_LE(std::fabs(back - xv), (0.0625 + std::ldexp(1.0, -20)) * std::fabs(xv) + std::ldexp(s, -10))
          << i << "," << j;
    }
}

// Tiles whose amax is below 1e-4 (and one of zeros, an edge the floor exists for) take s = 1e-4/448;
// a tile at exactly 1e-4 too; a tile just above takes its own amax.
TEST_F(Fp8Quant, AmaxFloor) {
  const int64_t k = 4 * kFp8Tile;
  std::vector<float> v(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    const float u = static_cast<float>((j * 37) % 101) / 100.0f - 0.5f;
    const int64_t tile = j / kFp8Tile;
    v[static_cast<size_t>(j)] = tile == 0 ? 5e-5f * u : tile == 1 ? 0.0f : tile == 2 ? 1e-4f * u : 3e-4f * u;
  }
  v[2 * kFp8Tile + 7] = 1e-4f;  // tile 2: amax exactly the floor
  v[3 * kFp8Tile + 9] = 2e-4f;  // tile 3: amax above it
  const Owned x = make_source(v, 1, k, DType::kF32);
  ActOut out(1, k);
  be.act_quant(ctx, {.q = out.q, .scale = out.scale, .x = x});
  const float floor_s = 1e-4f / 448.0f;
  EXPECT_EQ(out.scale.at<float>(0), floor_s);
  EXPECT_EQ(out.scale.at<float>(1), floor_s);
  EXPECT_EQ(out.scale.at<float>(2), floor_s);
  EXPECT_EQ(out.scale.at<float>(3), 2e-4f / 448.0f);  // its own amax: 2e-4 (the others are ≤ 1.5e-4)
  const std::vector<uint8_t> q = codes_of(out.q);
  for (int64_t j = 0; j < k; ++j) {
    const float s = out.scale.at<float>(j / kFp8Tile);
    EXPECT_EQ(q[static_cast<size_t>(j)], f32_to_e4m3(v[static_cast<size_t>(j)] * (1.0f / s))) << j;
  }
  for (int64_t j = kFp8Tile; j < 2 * kFp8Tile; ++j) EXPECT_EQ(q[static_cast<size_t>(j)], 0x00);  // zeros stay +0
}

// ue8m0: every scale a power of two, the smallest one ≥ max(amax, 1e-4)/448 (checked with frexp,
// not the op's bit trick), and the codes those scales give; docs/derivations.md §6.5's two checked values.
TEST_F(Fp8Quant, Ue8m0ScalesArePowersOfTwo) {
  const int64_t m = 130, k = 390;
  const std::vector<float> v = test::fp8_test_values(m, k, 41);
  const Owned x = make_source(v, m, k, DType::kF32);
  ActOut plain(m, k), pow2(m, k);
  be.act_quant(ctx, {.q = plain.q, .scale = plain.scale, .q_t = plain.q_t, .scale_t = plain.scale_t, .x = x});
  be.act_quant(ctx,
               {.q = pow2.q, .scale = pow2.scale, .q_t = pow2.q_t, .scale_t = pow2.scale_t, .x = x, .ue8m0 = true});
  for (const auto& [p, s2] : {std::pair{&plain.scale, &pow2.scale}, std::pair{&plain.scale_t, &pow2.scale_t}})
    for (int64_t i = 0; i < p->numel(); ++i) {
      const float s = p->at<float>(i), t = s2->at<float>(i);
      int e = 0;
      ASSERT_EQ(std::frexp(t, &e), 0.5f) << "not a power of two: " << t;
      ASSERT_TRUE(t / 2 < s && s <= t) << s << " -> " << t;
    }
  std::vector<float> w(static_cast<size_t>(2 * kFp8Tile), 0.1f);
  w[3] = 0.3f;
  w[kFp8Tile + 3] = -500.0f;
  const Owned x2 = make_source(w, 1, 2 * kFp8Tile, DType::kF32);
  ActOut out(1, 2 * kFp8Tile);
  be.act_quant(ctx, {.q = out.q, .scale = out.scale, .x = x2, .ue8m0 = true});
  EXPECT_EQ(out.scale.at<float>(0), std::ldexp(1.0f, -10));  // amax 0.3: 6.696e-4 -> 2^-10
  EXPECT_EQ(out.scale.at<float>(1), 2.0f);                   // amax 500: 1.116 -> 2
  EXPECT_EQ(codes_of(out.q)[kFp8Tile + 3], f32_to_e4m3(-250.0f));
}

// The transposed copy is made from x: it equals the reference from x, and differs from what
// requantising the row-wise copy's values q·s would give (so the check can tell them apart). One call
// writing both copies equals two calls writing one each.
TEST_F(Fp8Quant, TransposedCopyComesFromTheSource) {
  const int64_t m = 256, k = 256;
  const std::vector<float> v = test::fp8_test_values(m, k, 53);
  const Owned x = make_source(v, m, k, DType::kF32);
  ActOut both(m, k), rows_only(m, k), cols_only(m, k);
  be.act_quant(ctx, {.q = both.q, .scale = both.scale, .q_t = both.q_t, .scale_t = both.scale_t, .x = x});
  be.act_quant(ctx, {.q = rows_only.q, .scale = rows_only.scale, .x = x});
  be.act_quant(ctx, {.q_t = cols_only.q_t, .scale_t = cols_only.scale_t, .x = x});
  EXPECT_EQ(codes_of(both.q), codes_of(rows_only.q));
  EXPECT_EQ(floats_of(both.scale), floats_of(rows_only.scale));
  EXPECT_EQ(codes_of(both.q_t), codes_of(cols_only.q_t));
  EXPECT_EQ(floats_of(both.scale_t), floats_of(cols_only.scale_t));
  const test::RefQuant from_x = test::ref_quant_rows(test::transposed(v, m, k), k, m, false);
  std::vector<float> requant(v.size());  // the row-wise copy's values q·s
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j)
      requant[static_cast<size_t>(i * k + j)] =
          e4m3_to_f32(codes_of(both.q)[static_cast<size_t>(i * k + j)]) * both.scale.at<float>((j / kFp8Tile) * m + i);
  const test::RefQuant from_q = test::ref_quant_rows(test::transposed(requant, m, k), k, m, false);
  EXPECT_EQ(codes_of(both.q_t), from_x.q);
  EXPECT_NE(from_q.q, from_x.q) << "the test data cannot tell a copy of a copy from a copy of x";
}

// act_quant with offsets: the transposed copy's 128×1 tiles restart at each group's first row. Each group's tiles
// equal the plain transposed copy of that group's rows alone (codes and scales bit for bit), in consecutive slots,
// zero codes past the group's last row; slots past the last group's stay as they were. The row-wise copy beside it
// is the plain one's for the rows in use. Bad input is named.
TEST_F(Fp8Quant, GroupedTransposedCopyRestartsTilesAtEachGroup) {
  const int64_t m = 300, k = 136;
  const std::vector<int32_t> off = {0, 130, 130, 131, 290};  // 2 tiles, none, 1 (one row), 2; rows 290… unused
  const int64_t G = static_cast<int64_t>(off.size()) - 1, slots = fp8_group_tiles(m, G), width = kFp8Tile * slots;
  const std::vector<float> v = test::fp8_test_values(m, k, 61);
  const Owned x = make_source(v, m, k, DType::kF32);
  Owned offsets({G + 1}, DType::kI32), q_t({k, width}, DType::kF8E4M3), s_t({slots, k}, DType::kF32);
  for (int64_t g = 0; g <= G; ++g) offsets.at<int32_t>(g) = off[static_cast<size_t>(g)];
  std::memset(q_t.t().data, 0xAB, static_cast<size_t>(q_t.t().nbytes()));
  for (int64_t i = 0; i < s_t.numel(); ++i) s_t.at<float>(i) = -1.0f;
  be.act_quant(ctx, {.q_t = q_t, .scale_t = s_t, .x = x, .offsets = offsets});
  const std::vector<uint8_t> got = codes_of(q_t);
  int64_t slot = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], rows = off[static_cast<size_t>(g) + 1] - r0;
    if (rows == 0) continue;
    const std::vector<float> vg(v.begin() + r0 * k, v.begin() + (r0 + rows) * k);
    const test::RefQuant ref = test::ref_quant_rows(test::transposed(vg, rows, k), k, rows, false);
    for (int64_t j = 0; j < fp8_tiles(rows); ++j)
      for (int64_t kk = 0; kk < k; ++kk) {
        ASSERT_EQ(s_t.at<float>((slot + j) * k + kk), ref.scale[static_cast<size_t>(j * k + kk)])
            << "group " << g << " tile " << j << " column " << kk;
        for (int64_t i = 0; i < kFp8Tile; ++i) {
          const int64_t r = j * kFp8Tile + i;
          const uint8_t want = r < rows ? ref.q[static_cast<size_t>(kk * rows + r)] : 0;
          ASSERT_EQ(got[static_cast<size_t>(kk * width + (slot + j) * kFp8Tile + i)], want)
              << "group " << g << " row " << r << " column " << kk;
        }
      }
    slot += fp8_tiles(rows);
  }
  ASSERT_EQ(slot, 5);
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t i = slot * kFp8Tile; i < width; ++i) ASSERT_EQ(got[static_cast<size_t>(kk * width + i)], 0xAB);
  for (int64_t i = slot * k; i < slots * k; ++i) ASSERT_EQ(s_t.at<float>(i), -1.0f);

  // The row-wise copy beside it (one pass): the plain row-wise copy's bits for rows < offsets[G], the rows past
  // untouched; the grouped copy unchanged by asking for it.
  ActOut plain(m, k), beside(m, k);
  be.act_quant(ctx, {.q = plain.q, .scale = plain.scale, .x = x});
  Owned q_t2({k, width}, DType::kF8E4M3), s_t2({slots, k}, DType::kF32);
  std::memset(q_t2.t().data, 0xAB, static_cast<size_t>(q_t2.t().nbytes()));
  for (int64_t i = 0; i < s_t2.numel(); ++i) s_t2.at<float>(i) = -1.0f;
  be.act_quant(ctx, {.q = beside.q, .scale = beside.scale, .q_t = q_t2, .scale_t = s_t2, .x = x, .offsets = offsets});
  EXPECT_EQ(codes_of(q_t2), got);
  EXPECT_EQ(floats_of(s_t2), floats_of(s_t));
  const int64_t used = off.back();
  const std::vector<uint8_t> want_q = codes_of(plain.q), got_q = codes_of(beside.q);
  for (int64_t i = 0; i < m * k; ++i)
    ASSERT_EQ(got_q[static_cast<size_t>(i)], i < used * k ? want_q[static_cast<size_t>(i)] : 0x7f) << "q " << i;
  for (int64_t kb = 0; kb < fp8_tiles(k); ++kb)
    for (int64_t r = 0; r < m; ++r)
      ASSERT_EQ(beside.scale.at<float>(kb * m + r), r < used ? plain.scale.at<float>(kb * m + r) : -1.0f)
          << "scale " << kb << ", row " << r;
  expect_error([&] { be.act_quant(ctx, {.q = plain.q, .q_t = q_t, .scale_t = s_t, .x = x, .offsets = offsets}); },
               {"[act_quant]", "q and scale come together"});
  expect_error([&] { be.act_quant(ctx, {.q = plain.q, .scale = plain.scale, .x = x, .offsets = offsets}); },
               {"[act_quant]", "offsets given without q_t and scale_t"});
  expect_error([&] { be.act_quant(ctx, {.q_t = plain.q_t, .scale_t = plain.scale_t, .x = x, .offsets = offsets}); },
               {"[act_quant]", "q_t (grouped: [K, 128·(ceil(M/128) + G)]): expected shape [136, 896]"});
  offsets.at<int32_t>(2) = 100;
  expect_error([&] { be.act_quant(ctx, {.q_t = q_t, .scale_t = s_t, .x = x, .offsets = offsets}); },
               {"[act_quant]", "non-decreasing"});
}

// weight_quant: 128×128 blocks at sizes with edge blocks, f32 and bf16, ue8m0 or not: q and scale
// (with its zero padding) bit for bit, q_t = qᵀ and scale_t = scaleᵀ; weight_dequant = q·s.
TEST_F(Fp8Quant, WeightQuantBlocks) {
  const int64_t n = 300, k = 200;  // 3×2 blocks; scale rows padded from 2 to 4, scale_t rows from 3 to 4
  for (DType dt : {DType::kF32, DType::kBF16})
    for (bool ue8m0 : {false, true}) {
      const std::vector<float> v = test::fp8_test_values(n, k, 61, dt == DType::kBF16);
      const Owned w = make_source(v, n, k, dt);
      Owned q({n, k}, DType::kF8E4M3), q_t({k, n}, DType::kF8E4M3), scale({3, 4}, DType::kF32),
          scale_t({2, 4}, DType::kF32);
      for (int64_t i = 0; i < 12; ++i) scale.at<float>(i) = -1.0f;
      for (int64_t i = 0; i < 8; ++i) scale_t.at<float>(i) = -1.0f;
      be.weight_quant(ctx, {.q = q, .scale = scale, .q_t = q_t, .scale_t = scale_t, .w = w, .ue8m0 = ue8m0});
      const test::RefQuant ref = test::ref_quant_blocks(v, n, k, ue8m0);
      EXPECT_EQ(codes_of(q), ref.q);
      EXPECT_EQ(floats_of(scale), ref.scale);  // padding columns 2, 3 are 0
      EXPECT_EQ(codes_of(q_t), test::transposed(ref.q, n, k));
      for (int64_t kb = 0; kb < 2; ++kb) {
        for (int64_t nb = 0; nb < 3; ++nb) EXPECT_EQ(scale_t.at<float>(kb * 4 + nb), scale.at<float>(nb * 4 + kb));
        EXPECT_EQ(scale_t.at<float>(kb * 4 + 3), 0.0f);  // padding
      }
      // weight_dequant: one f32 product (f32, then bf16), exact in f64.
      Owned w32({n, k}, DType::kF32), w16({n, k}, DType::kBF16), w64({n, k}, DType::kF64);
      for (const Owned* out : {&w32, &w16, &w64}) be.weight_dequant(ctx, {.w = *out, .q = q, .scale = scale});
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t at = i * k + j;
          const float c = e4m3_to_f32(codes_of(q)[static_cast<size_t>(at)]),
                      s = scale.at<float>((i / 128) * 4 + j / 128);
          ASSERT_EQ(w32.at<float>(at), c * s);
          ASSERT_EQ(static_cast<uint16_t*>(w16.t().data)[at], f32_to_bf16(c * s));
          ASSERT_EQ(w64.at<double>(at), static_cast<double>(c) * static_cast<double>(s));
        }
    }
}

// Errors name the op and the field.
// A stack [G, N, K] is G weights quantised each on its own: every output equals the 2-D call on that
// matrix, byte for byte (edge blocks in N and K included), and a stack output of the wrong shape is named.
TEST_F(Fp8Quant, WeightQuantStackIsEachMatrixOnItsOwn) {
  const int64_t G = 3, N = 200, K = 136;
  Owned w({G, N, K}, DType::kBF16);
  const std::vector<float> v = test::fp8_test_values(G * N, K, 77, /*bf16=*/true);
  for (int64_t i = 0; i < w.numel(); ++i)
    static_cast<uint16_t*>(w.t().data)[i] = f32_to_bf16(v[static_cast<size_t>(i)]);
  Owned q({G, N, K}, DType::kF8E4M3), s({G, fp8_tiles(N), fp8_block_scale_cols(K)}, DType::kF32),
      q_t({G, K, N}, DType::kF8E4M3), s_t({G, fp8_tiles(K), fp8_block_scale_cols(N)}, DType::kF32);
  be.weight_quant(ctx, {.q = q, .scale = s, .q_t = q_t, .scale_t = s_t, .w = w});
  for (int64_t g = 0; g < G; ++g) {
    Owned q1({N, K}, DType::kF8E4M3), s1({fp8_tiles(N), fp8_block_scale_cols(K)}, DType::kF32),
        q1_t({K, N}, DType::kF8E4M3), s1_t({fp8_tiles(K), fp8_block_scale_cols(N)}, DType::kF32);
    be.weight_quant(ctx, {.q = q1,
                          .scale = s1,
                          .q_t = q1_t,
                          .scale_t = s1_t,
                          .w = w.t().reshape(Shape{G * N, K}).rows(g * N, (g + 1) * N)});
    const auto same = [&](const Owned& stack, const Owned& one, const char* what) {
      const size_t bytes = one.t().nbytes();
      EXPECT_EQ(std::memcmp(static_cast<const char*>(stack.t().data) + g * bytes, one.t().data, bytes), 0)
          << what << " of matrix " << g;
    };
    same(q, q1, "q");
    same(s, s1, "scale");
    same(q_t, q1_t, "q_t");
    same(s_t, s1_t, "scale_t");
  }
  Owned bad({G, N + 1, K}, DType::kF8E4M3);
  expect_error([&] { be.weight_quant(ctx, {.q = bad, .scale = s, .w = w}); },
               {"[weight_quant]", "q: expected shape [3, 200, 136]"});
}

// bf16_source: an f32 weight quantised as its bf16 rounding, byte for byte the quantisation of a bf16 copy (the
// values are chosen so that most differ from their rounding), and not that of the f32 values themselves.
TEST_F(Fp8Quant, Bf16SourceQuantisesTheBf16Rounding) {
  const int64_t N = 200, K = 136;
  const std::vector<float> v = test::fp8_test_values(N, K, 91);
  const Owned w32 = make_source(v, N, K, DType::kF32), w16 = make_source(v, N, K, DType::kBF16);
  const auto quant = [&](const Owned& w, bool bf16_source) {
    Owned q({N, K}, DType::kF8E4M3), s({fp8_tiles(N), fp8_block_scale_cols(K)}, DType::kF32),
        q_t({K, N}, DType::kF8E4M3), s_t({fp8_tiles(K), fp8_block_scale_cols(N)}, DType::kF32);
    be.weight_quant(ctx, {.q = q, .scale = s, .q_t = q_t, .scale_t = s_t, .w = w, .bf16_source = bf16_source});
    return std::tuple{codes_of(q), floats_of(s), codes_of(q_t), floats_of(s_t)};
  };
  EXPECT_EQ(quant(w32, true), quant(w16, false));
  EXPECT_EQ(quant(w16, true), quant(w16, false));
  EXPECT_NE(quant(w32, true), quant(w32, false)) << "the test values are their own bf16 roundings";
}

TEST_F(Fp8Quant, ErrorsNameTheField) {
  const int64_t m = 200, k = 300;
  const Owned x({m, k}, DType::kF32), x64({m, k}, DType::kF64), q({m, k}, DType::kF8E4M3), q32({m, k}, DType::kF32),
      scale({3, m}, DType::kF32), scale_swapped({m, 3}, DType::kF32), q_t({k, m}, DType::kF8E4M3),
      scale_t({2, k}, DType::kF32);
  test::fill_normal(x, 7);
  expect_error([&] { be.act_quant(ctx, {.q = q, .scale = scale, .x = x64}); },
               {"[act_quant]", "x must be f32 or bf16"});
  expect_error([&] { be.act_quant(ctx, {.q = q32, .scale = scale, .x = x}); },
               {"[act_quant]", "q: expected dtype f8e4m3"});
  expect_error([&] { be.act_quant(ctx, {.q = q, .scale = scale_swapped, .x = x}); },
               {"[act_quant]", "scale: expected shape [3, 200], got [200, 3]"});
  expect_error([&] { be.act_quant(ctx, {.q = q, .x = x}); }, {"[act_quant]", "q and scale come together"});
  expect_error([&] { be.act_quant(ctx, {.x = x}); }, {"[act_quant]", "no output"});
  expect_error([&] { be.act_quant(ctx, {.q_t = q, .scale_t = scale_t, .x = x}); },
               {"[act_quant]", "q_t: expected shape [300, 200]"});
  expect_error([&] { be.act_quant(ctx, {.q_t = q_t, .scale_t = scale, .x = x}); },
               {"[act_quant]", "scale_t: expected shape [2, 300]"});
  // Weights: the scale rows are padded to 4 (op_args.h); the unpadded shape is refused.
  const Owned w({m, k}, DType::kF32), wscale_unpadded({2, 3}, DType::kF32), wscale({2, 4}, DType::kF32);
  expect_error([&] { be.weight_quant(ctx, {.q = q, .scale = wscale_unpadded, .w = w}); },
               {"[weight_quant]", "scale: expected shape [2, 4], got [2, 3]"});
  expect_error([&] { be.weight_quant(ctx, {.q_t = q, .scale_t = wscale, .w = w}); },
               {"[weight_quant]", "q_t: expected shape [300, 200]"});
  const Owned wi({m, k}, DType::kI32);
  expect_error([&] { be.weight_dequant(ctx, {.w = wi, .q = q, .scale = wscale}); },
               {"[weight_dequant]", "w must be f32 or bf16"});
  expect_error([&] { be.weight_dequant(ctx, {.w = w, .q = q32, .scale = wscale}); },
               {"[weight_dequant]", "q: expected dtype f8e4m3"});
}

}  // namespace
}  // namespace diffmoe
