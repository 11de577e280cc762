// The FP8 quantisers on the GPU against the CPU, bit for bit (op_args.h's FP8 section, docs/model.md §7; the
// kernels' arithmetic is fp8_quant.cuh, the CPU's core/dtype.cpp): every e4m3 code and scale byte
// equal, NaN codes included.
// - act_quant: values built to reach every finite code, exact ties (subnormal ones too), one f32 step
//   beside them, f32 subnormals, tiles below the amax floor, tiles of very different magnitudes
//   (fp8_test_values), with and without ue8m0, f32 and bf16 sources, arranged along rows and along
//   columns (so both copies meet them), both copies in one call and each alone; shapes with full
//   tiles (the vector paths), edge tiles, K not a multiple of 4 and M not a multiple of 16 (the
//   scalar paths), unaligned views; NaN, −NaN and ±inf inputs (NaN → 0x7f, as the CPU).
// - weight_quant (q, scale with its zero padding, q_t, scale_t) and weight_dequant (f32, bf16).
// Tolerance: none (bitwise). Quantisation that differs in one code between the backends would make a
// model trained on one backend different on the other.
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>
#include <vector>

#include "cuda_dual.h"
#include "cuda_test_util.h"
#include "fp8_test_util.h"

namespace diffmoe::cudatest {
namespace {

// The raw bytes of both sides of d: equal, with the guard after the device tensor intact.
void expect_same_bytes(const Dual& d, const std::string& what) {
  std::vector<uint8_t> dev(d.host().nbytes());
  gpu().download(dev.data(), d[Side::kGpu]);
  const auto* host = static_cast<const uint8_t*>(d.host().data);
  const size_t elem = dtype_size(d.host().dtype);
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < dev.size(); i += elem)
    if (std::memcmp(dev.data() + i, host + i, elem) != 0) {
      if (bad++ == 0) first = i / elem;
    }
  const std::vector<double> gv = d.device_values(), cv = d.host_values();
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << d.numel() << " elements differ; first at " << first
                     << ": cuda " << (bad ? gv[first] : 0.0) << ", cpu " << (bad ? cv[first] : 0.0);
  EXPECT_TRUE(d.guard_intact()) << what << ": guard bytes overwritten";
}

std::vector<double> as_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }

enum class Copies { kBoth, kRows, kCols };

// act_quant of v [m, k] on both backends, the chosen copies, all outputs poisoned first.
void check_act_quant(const std::vector<float>& v, int64_t m, int64_t k, DType dt, bool ue8m0, Copies copies,
                     const std::string& what) {
  Dual x(Shape{m, k}, dt);
  x.set(as_doubles(v));
  Dual q(Shape{m, k}, DType::kF8E4M3), scale(Shape{fp8_tiles(k), m}), q_t(Shape{k, m}, DType::kF8E4M3),
      scale_t(Shape{fp8_tiles(m), k});
  for (Dual* d : {&q, &scale, &q_t, &scale_t}) d->poison();
  const bool rows = copies != Copies::kCols, cols = copies != Copies::kRows;
  run_both([&](Backend& be, Side s) {
    be.act_quant({}, {.q = rows ? q[s] : Tensor{},
                      .scale = rows ? scale[s] : Tensor{},
                      .q_t = cols ? q_t[s] : Tensor{},
                      .scale_t = cols ? scale_t[s] : Tensor{},
                      .x = x[s],
                      .ue8m0 = ue8m0});
  });
  if (rows) {
    expect_same_bytes(q, what + ": q");
    expect_same_bytes(scale, what + ": scale");
  }
  if (cols) {
    expect_same_bytes(q_t, what + ": q_t");
    expect_same_bytes(scale_t, what + ": scale_t");
  }
}

TEST(CudaFp8Quant, ActQuantBitwise) {
  DIFFMOE_REQUIRE_CUDA();
  // (m, k): full tiles (vector paths); edges; K % 4 != 0; M % 16 != 0; one row; one column.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{256, 256}, {200, 300}, {128, 1536}, {130, 132},
                                                           {37, 19},   {1, 4096},  {4096, 1},   {264, 520}};
  uint64_t seed = 900;
  for (const auto& [m, k] : shapes)
    for (DType dt : {DType::kF32, DType::kBF16})
      for (bool ue8m0 : {false, true})
        for (bool along_cols : {false, true}) {
          const bool b16 = dt == DType::kBF16;
          // Structured tiles along rows, or along columns (the transposed copy's tiles).
          const std::vector<float> v = along_cols ? test::transposed(test::fp8_test_values(k, m, ++seed, b16), k, m)
                                                  : test::fp8_test_values(m, k, ++seed, b16);
          for (Copies c : {Copies::kBoth, Copies::kRows, Copies::kCols})
            check_act_quant(v, m, k, dt, ue8m0, c,
                            fmt::format("act_quant {}x{} {} ue8m0={} {} copies={}", m, k, dtype_name(dt), ue8m0,
                                        along_cols ? "column tiles" : "row tiles", static_cast<int>(c)));
        }
}

// Every finite code at s = 2^e (the tile's amax 448·2^e), read back on the GPU; NaN, −NaN, +inf and
// −inf in tiles of their own (inf: s = inf, finite values → ±0, inf / inf → NaN → 0x7f).
TEST(CudaFp8Quant, EveryCodeAndSpecialValues) {
  DIFFMOE_REQUIRE_CUDA();
  const std::vector<uint8_t> codes = test::finite_e4m3_codes();
  const int64_t k = 6 * kFp8Tile;
  for (int e : {-18, 0, 9}) {
    std::vector<float> v(static_cast<size_t>(k), 0.5f);
    for (size_t i = 0; i < codes.size(); ++i) v[i] = std::ldexp(e4m3_to_f32(codes[i]), e);
    v[254] = v[255] = std::ldexp(448.0f, e);
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    v[2 * kFp8Tile + 3] = nan;
    v[3 * kFp8Tile + 4] = -nan;
    v[4 * kFp8Tile + 5] = inf;
    v[5 * kFp8Tile + 6] = -inf;
    for (bool ue8m0 : {false, true}) {
      Dual x(Shape{1, k});
      x.set(as_doubles(v));
      Dual q(Shape{1, k}, DType::kF8E4M3), scale(Shape{6, 1});
      q.poison();
      scale.poison();
      run_both(
          [&](Backend& be, Side s) { be.act_quant({}, {.q = q[s], .scale = scale[s], .x = x[s], .ue8m0 = ue8m0}); });
      expect_same_bytes(q, fmt::format("every code, e = {}", e));
      expect_same_bytes(scale, fmt::format("every code's scales, e = {}", e));
      std::vector<uint8_t> got(static_cast<size_t>(k));
      gpu().download(got.data(), q[Side::kGpu]);
      EXPECT_EQ(std::set<uint8_t>(got.begin(), got.begin() + 254).size(), 254u);
      EXPECT_EQ(got[2 * kFp8Tile + 3], 0x7f);
      EXPECT_EQ(got[3 * kFp8Tile + 4], 0x7f);
      EXPECT_EQ(got[4 * kFp8Tile + 5], 0x7f);  // inf / inf
      EXPECT_EQ(got[4 * kFp8Tile + 7], 0x00);  // 0.5 / inf
    }
  }
}

// Views that start one element (x, q) or 4 bytes (q_t) past an alignment boundary: the scalar paths.
TEST(CudaFp8Quant, UnalignedViews) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t m = 256, k = 256;
  const std::vector<float> v = test::fp8_test_values(m, k, 77);
  Dual x_buf(Shape{m * k + 1}), q_buf(Shape{m * k + 1}, DType::kF8E4M3), q_t_buf(Shape{m * k + 4}, DType::kF8E4M3);
  std::vector<double> xv(1, 0.25);
  xv.insert(xv.end(), v.begin(), v.end());
  x_buf.set(xv);
  q_buf.poison();
  q_t_buf.poison();
  Dual scale(Shape{2, m}), scale_t(Shape{2, k});
  run_both([&](Backend& be, Side s) {
    be.act_quant({}, {.q = offset_view(q_buf, s, Shape{m, k}, 1),
                      .scale = scale[s],
                      .q_t = offset_view(q_t_buf, s, Shape{k, m}, 4),
                      .scale_t = scale_t[s],
                      .x = offset_view(x_buf, s, Shape{m, k}, 1)});
  });
  expect_same_bytes(q_buf, "unaligned q");
  expect_same_bytes(q_t_buf, "unaligned q_t");
  expect_same_bytes(scale, "scale (unaligned x)");
  expect_same_bytes(scale_t, "scale_t (unaligned x)");
}

TEST(CudaFp8Quant, WeightQuantBitwise) {
  DIFFMOE_REQUIRE_CUDA();
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{300, 200}, {128, 128},  {1536, 768}, {200, 1000},
                                                           {40, 24},   {576, 1536}, {37, 19}};
  uint64_t seed = 1900;
  for (const auto& [n, k] : shapes)
    for (DType dt : {DType::kF32, DType::kBF16})
      for (bool ue8m0 : {false, true})
        for (Copies c : {Copies::kBoth, Copies::kRows, Copies::kCols}) {
          Dual w(Shape{n, k}, dt);
          w.set(as_doubles(test::fp8_test_values(n, k, ++seed, dt == DType::kBF16)));
          Dual q(Shape{n, k}, DType::kF8E4M3), scale(Shape{fp8_tiles(n), fp8_block_scale_cols(k)}),
              q_t(Shape{k, n}, DType::kF8E4M3), scale_t(Shape{fp8_tiles(k), fp8_block_scale_cols(n)});
          for (Dual* d : {&q, &scale, &q_t, &scale_t}) d->poison();
          const bool rows = c != Copies::kCols, cols = c != Copies::kRows;
          run_both([&](Backend& be, Side s) {
            be.weight_quant({}, {.q = rows ? q[s] : Tensor{},
                                 .scale = rows ? scale[s] : Tensor{},
                                 .q_t = cols ? q_t[s] : Tensor{},
                                 .scale_t = cols ? scale_t[s] : Tensor{},
                                 .w = w[s],
                                 .ue8m0 = ue8m0});
          });
          const std::string what =
              fmt::format("weight_quant {}x{} {} ue8m0={} copies={}", n, k, dtype_name(dt), ue8m0, static_cast<int>(c));
          if (rows) {
            expect_same_bytes(q, what + ": q");
            expect_same_bytes(scale, what + ": scale");
            // weight_dequant of this copy: one f32 product, as f32 and rounded to bf16.
            Dual w32(Shape{n, k}), w16(Shape{n, k}, DType::kBF16);
            w32.poison();
            w16.poison();
            run_both([&](Backend& be, Side s) {
              be.weight_dequant({}, {.w = w32[s], .q = q[s], .scale = scale[s]});
              be.weight_dequant({}, {.w = w16[s], .q = q[s], .scale = scale[s]});
            });
            expect_same_bytes(w32, what + ": weight_dequant f32");
            expect_same_bytes(w16, what + ": weight_dequant bf16");
          }
          if (cols) {
            expect_same_bytes(q_t, what + ": q_t");
            expect_same_bytes(scale_t, what + ": scale_t");
          }
        }
}

// A stack [G, N, K] (the routed experts): each matrix quantised on its own, bit for bit as the CPU does it,
// with edge blocks in N and K and both copies.
TEST(CudaFp8Quant, WeightQuantStackBitwise) {
  DIFFMOE_REQUIRE_CUDA();
  uint64_t seed = 2900;
  for (const auto& [g, n, k] : {std::tuple<int64_t, int64_t, int64_t>{3, 300, 200}, {4, 128, 256}, {2, 40, 136}})
    for (DType dt : {DType::kF32, DType::kBF16}) {
      Dual w(Shape{g, n, k}, dt);
      w.set(as_doubles(test::fp8_test_values(g * n, k, ++seed, dt == DType::kBF16)));
      Dual q(Shape{g, n, k}, DType::kF8E4M3), scale(Shape{g, fp8_tiles(n), fp8_block_scale_cols(k)}),
          q_t(Shape{g, k, n}, DType::kF8E4M3), scale_t(Shape{g, fp8_tiles(k), fp8_block_scale_cols(n)});
      for (Dual* d : {&q, &scale, &q_t, &scale_t}) d->poison();
      const bool bf16_source = dt == DType::kF32 && g % 2 == 1;  // the f32 weights' bf16 rounding (some cases)
      run_both([&](Backend& be, Side s) {
        be.weight_quant({}, {.q = q[s],
                             .scale = scale[s],
                             .q_t = q_t[s],
                             .scale_t = scale_t[s],
                             .w = w[s],
                             .bf16_source = bf16_source});
      });
      const std::string what =
          fmt::format("weight_quant stack {}x{}x{} {} bf16_source={}", g, n, k, dtype_name(dt), bf16_source);
      expect_same_bytes(q, what + ": q");
      expect_same_bytes(scale, what + ": scale");
      expect_same_bytes(q_t, what + ": q_t");
      expect_same_bytes(scale_t, what + ": scale_t");
    }
}

// act_quant's grouped transposed copy (offsets): bit for bit the CPU's, for groups of 0, 1, 127, 128, 129 and 300
// rows, rows past offsets[G], f32 and bf16 sources; the slots past the last group's keep their (poisoned) bytes.
TEST(CudaFp8Quant, GroupedTransposedBitwise) {
  DIFFMOE_REQUIRE_CUDA();
  const std::vector<double> off = {0, 127, 127, 255, 256, 385, 685};
  const int64_t G = static_cast<int64_t>(off.size()) - 1, R = 690, slots = fp8_group_tiles(R, G);
  uint64_t seed = 2950;
  for (const int64_t k : {int64_t{130}, int64_t{136}, int64_t{512}})
    for (DType dt : {DType::kF32, DType::kBF16}) {
      Dual x(Shape{R, k}, dt), offsets(Shape{G + 1}, DType::kI32);
      x.set(as_doubles(test::fp8_test_values(R, k, ++seed, dt == DType::kBF16)));
      offsets.set(off);
      for (const bool rows : {false, true}) {  // with the row-wise copy beside it (rows < offsets[G])
        Dual q_t(Shape{k, kFp8Tile * slots}, DType::kF8E4M3), scale_t(Shape{slots, k});
        Dual q(Shape{R, k}, DType::kF8E4M3), scale(Shape{fp8_tiles(k), R});
        for (Dual* d : {&q_t, &scale_t, &q, &scale}) d->poison();
        run_both([&](Backend& be, Side s) {
          be.act_quant({}, {.q = rows ? q[s] : Tensor{},
                            .scale = rows ? scale[s] : Tensor{},
                            .q_t = q_t[s],
                            .scale_t = scale_t[s],
                            .x = x[s],
                            .offsets = offsets[s]});
        });
        const std::string what =
            fmt::format("act_quant grouped {}x{} {}{}", R, k, dtype_name(dt), rows ? " +rows" : "");
        expect_same_bytes(q_t, what + ": q_t");
        expect_same_bytes(scale_t, what + ": scale_t");
        expect_same_bytes(q, what + ": q");
        expect_same_bytes(scale, what + ": scale");
      }
    }
}

}  // namespace
}  // namespace diffmoe::cudatest
