// The fp8 mode's Linear GEMMs (LayerContext::linear, linear_backward, grouped_gemm and
// grouped_gemm_wgrad on FP8 weights, model/layer_context.cpp) on the CPU, against the test's own f64
// reference of docs/model.md §7: quantise (fp8_test_util.h's loops: 1×128 tiles of x and dy, 128×128
// blocks of W, 128×1 tiles of x and dy for the Wgrad, per expert for the routed ones), dequantise,
// multiply in f64.
//
// Bound. The CPU fp8_gemm sums the exact products (an e4m3 code times an f32 scale has ≤ 28
// significant bits, so a product of two is exact in f64) in f64 and rounds once into C: per element
// |got − ref| ≤ 2^-24·|ref| (the f32 rounding) + 2·K·2^-53·Σ_k|terms| (a different f64 summation
// order; K ≤ 256 here, so 1e-13·Σ|terms| covers it). For bf16 outputs (the expert rows the plan keeps
// in bf16) the f32 result is rounded once more: 2^-8·|ref| bounds both roundings. The same data
// through an unquantised GEMM must be off by more than 1e-3 (relative L2), so the check can tell the
// FP8 path from a bf16 or f32 one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "model/layer_context.h"
#include "ops/fp8_test_util.h"
#include "serve/recording_backend.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::Owned;

// Host values of a tensor (f32, bf16 widened, f64).
std::vector<double> values(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i)
    v[static_cast<size_t>(i)] =
        t.dtype == DType::kBF16 ? bf16_to_f32(static_cast<uint16_t*>(t.data)[i]) : test::get(t, i);
  return v;
}
void put(const Tensor& t, const std::vector<float>& v) {
  ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype == DType::kBF16) static_cast<uint16_t*>(t.data)[i] = f32_to_bf16(v[static_cast<size_t>(i)]);
    else test::set(t, i, v[static_cast<size_t>(i)]);
  }
}
// Values rounded to bf16 (a bf16 source), of a generic kind: normal with per-row spread, so tiles get
// different scales.
std::vector<float> source(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      v[static_cast<size_t>(i * cols + j)] =
          bf16_to_f32(f32_to_bf16(static_cast<float>(normal_at(seed, 3, static_cast<uint64_t>(i * cols + j)) *
                                                     std::exp2(static_cast<double>((i + j / 128) % 7) - 3.0))));
  return v;
}

// Dequantised values of the references (codes × their tile's scale).
std::vector<double> deq_rows(const std::vector<float>& v, int64_t rows, int64_t cols) {
  const test::RefQuant r = test::ref_quant_rows(v, rows, cols, false);
  std::vector<double> d(v.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < cols; ++k)
      d[static_cast<size_t>(i * cols + k)] = static_cast<double>(e4m3_to_f32(r.q[static_cast<size_t>(i * cols + k)])) *
                                             r.scale[static_cast<size_t>((k / kFp8Tile) * rows + i)];
  return d;
}
std::vector<double> deq_blocks(const std::vector<float>& w, int64_t n, int64_t k) {
  const test::RefQuant r = test::ref_quant_blocks(w, n, k, false);
  std::vector<double> d(w.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j)
      d[static_cast<size_t>(i * k + j)] =
          static_cast<double>(e4m3_to_f32(r.q[static_cast<size_t>(i * k + j)])) *
          r.scale[static_cast<size_t>((i / kFp8Tile) * fp8_block_scale_cols(k) + j / kFp8Tile)];
  return d;
}
// C[m, n] = Σ_k A[m, k]·B[n, k] (both K-major) and Σ_k |A·B| (for the summation-order term).
struct Product {
  std::vector<double> c, mag;
};
Product product_nt(const std::vector<double>& a, const std::vector<double>& b, int64_t m, int64_t n, int64_t k) {
  Product p{std::vector<double>(static_cast<size_t>(m * n)), std::vector<double>(static_cast<size_t>(m * n))};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, g = 0;
      for (int64_t l = 0; l < k; ++l) {
        const double t = a[static_cast<size_t>(i * k + l)] * b[static_cast<size_t>(j * k + l)];
        s += t;
        g += std::fabs(t);
      }
      p.c[static_cast<size_t>(i * n + j)] = s;
      p.mag[static_cast<size_t>(i * n + j)] = g;
    }
  return p;
}
template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// got within the bound of the file comment of ref (+ base, an exact addend), element by element.
void expect_close(const std::string& what, const std::vector<double>& got, const Product& ref, double rel,
                  const std::vector<double>& base = {}) {
  ASSERT_EQ(got.size(), ref.c.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double want = ref.c[i] + (base.empty() ? 0.0 : base[i]);
    const double tol = rel * std::fabs(want) + 1e-13 * (ref.mag[i] + (base.empty() ? 0.0 : std::fabs(base[i]))) + 1e-30;
    if (std::fabs(got[i] - want) > tol && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: " << got[i] << " vs " << want << " (tolerance " << tol << ")";
  }
  EXPECT_EQ(bad, 0) << what;
}

// A LayerContext over the CPU backend with an FP8 scratch arena and the given FP8 weights.
class Fp8Linear : public ::testing::Test {
 protected:
  // Registers weight `w` (bf16, [N, K] or [E, N, K]) as an FP8 weight (the table is made by start()).
  void add_weight(const Tensor& w) { pending_.push_back(w); }
  // The FP8 scratch (fp8_weights.h's slots) for `rows` rows of at most `width` columns and the weights.
  void start(int64_t rows, int64_t width) {
    const int64_t data = rows * width, scales = std::max(fp8_tiles(width) * rows, fp8_tiles(rows) * width);
    for (const char* s : {"a", "a_t", "b_t"}) {
      acts_.add(std::string("scratch.fp8.") + s + ".q", Shape{data}, DType::kF8E4M3);
      acts_.add(std::string("scratch.fp8.") + s + ".scale", Shape{scales}, DType::kF32);
    }
    int64_t matrix = 0, block_scales = 0;
    for (const Tensor& w : pending_) {
      const int64_t n = w.dim(-2), k = w.dim(-1);
      matrix = std::max(matrix, n * k);
      block_scales =
          std::max({block_scales, fp8_tiles(n) * fp8_block_scale_cols(k), fp8_tiles(k) * fp8_block_scale_cols(n)});
    }
    for (const char* s : {"w", "w_t"}) {
      acts_.add(std::string("scratch.fp8.") + s + ".q", Shape{matrix}, DType::kF8E4M3);
      acts_.add(std::string("scratch.fp8.") + s + ".scale", Shape{block_scales}, DType::kF32);
    }
    // The grouped GEMMs' slots: all rows of A and A2, the blocks of a stack per term, the Wgrad's
    // grouped transposed copies of dy and x.
    int64_t stack = 0, stack_scales = 0, experts = 0;
    for (const Tensor& w : pending_)
      if (w.rank() == 3) {
        const int64_t e = w.dim(0), n = w.dim(1), k = w.dim(2);
        experts = std::max(experts, e);
        stack = std::max(stack, e * n * k);
        stack_scales = std::max(
            stack_scales, e * std::max(fp8_tiles(n) * fp8_block_scale_cols(k), fp8_tiles(k) * fp8_block_scale_cols(n)));
      }
    for (const char* s : {"ga", "ga2"}) {
      acts_.add(std::string("scratch.fp8.") + s + ".q", Shape{rows * width}, DType::kF8E4M3);
      acts_.add(std::string("scratch.fp8.") + s + ".scale", Shape{fp8_tiles(width) * rows}, DType::kF32);
    }
    const int64_t slots = fp8_group_tiles(rows, std::max<int64_t>(experts, 1));
    acts_.add("scratch.fp8.gt.q", Shape{kFp8Tile * slots * 2 * width}, DType::kF8E4M3);
    acts_.add("scratch.fp8.gt.scale", Shape{slots * 2 * width}, DType::kF32);
    for (const char* s : {"gw", "gw2"}) {
      acts_.add(std::string("scratch.fp8.") + s + ".q", Shape{std::max<int64_t>(stack, 1)}, DType::kF8E4M3);
      acts_.add(std::string("scratch.fp8.") + s + ".scale", Shape{std::max<int64_t>(stack_scales, 1)}, DType::kF32);
    }
    acts_.allocate(be_.allocator());
    for (const Tensor& w : pending_)
      table_.emplace(w.data,
                     Fp8Weight{.w = w, .n = w.dim(-2), .k = w.dim(-1), .experts = w.rank() == 3 ? w.dim(0) : 0});
    lc_ = LayerContext{.be = &be_,
                       .ctx = {},
                       .cfg = nullptr,
                       .dtype = DType::kF32,
                       .batch = 1,
                       .seq = rows,
                       .params = nullptr,
                       .grads = nullptr,
                       .acts = &acts_,
                       .plan = nullptr,
                       .bf16_operands = true,
                       .fp8 = &table_};
  }

  CpuBackend be_;
  Arena acts_;
  Fp8WeightTable table_;
  std::vector<Tensor> pending_;
  LayerContext lc_;
};

TEST_F(Fp8Linear, DenseFpropDgradWgradEqualTheQuantisedF64Products) {
  // M = 40 tokens: the Wgrad's 128×1 tiles run past the edge (one partial tile of 40 tokens).
  const int64_t M = 40, K = 256, N = 128;
  Owned w(Shape{N, K}, DType::kBF16), x(Shape{M, K}, DType::kBF16), dy(Shape{M, N}, DType::kBF16);
  Owned r(Shape{M, N}, DType::kF32), y(Shape{M, N}, DType::kF32), dx(Shape{M, K}, DType::kF32),
      dw(Shape{N, K}, DType::kF32);
  const std::vector<float> wv = source(N, K, 1), xv = source(M, K, 2), dyv = source(M, N, 3), rv = source(M, N, 4);
  const std::vector<float> dw0 = source(N, K, 5);
  put(w, wv);
  put(x, xv);
  put(dy, dyv);
  put(r, rv);
  put(dw, dw0);
  add_weight(w);
  start(M, K);

  // Fprop with the residual as the addend (y = x Wᵀ + r), then the two backward GEMMs accumulating
  // dW (dw_beta = 1) and overwriting dx.
  lc_.linear(y, x, w, 1.0, r);
  lc_.dw_beta = 1.0;
  lc_.linear_backward(dw, dx, dy, x, w);

  const std::vector<double> wq = deq_blocks(wv, N, K);
  expect_close("y", values(y), product_nt(deq_rows(xv, M, K), wq, M, N, K), std::exp2(-24), widen(rv));
  // dx = dŷ Ŵ: Ŵᵀ's blocks are Ŵ's (a block's amax does not depend on its orientation).
  expect_close("dx", values(dx), product_nt(deq_rows(dyv, M, N), test::transposed(wq, N, K), M, K, N), std::exp2(-24));
  // dW += dyᵀx over 128×1 tiles of tokens: the transposes quantised row-wise.
  const Product dw_ref =
      product_nt(deq_rows(test::transposed(dyv, M, N), N, M), deq_rows(test::transposed(xv, M, K), K, M), N, K, M);
  expect_close("dW", values(dw), dw_ref, std::exp2(-24), widen(dw0));

  // The same data through an exact product differs: FP8 really ran.
  const Product exact = product_nt(widen(xv), widen(wv), M, N, K);
  std::vector<double> y_exact(exact.c);
  for (size_t i = 0; i < y_exact.size(); ++i) y_exact[i] += rv[i];
  EXPECT_GT(test::rel_error(values(y), y_exact), 1e-3);

  // linear_dx and linear_dw alone (the FFN's w1/w3 backward) give the same bits as linear_backward.
  Owned dx2(Shape{M, K}, DType::kF32), dw2(Shape{N, K}, DType::kF32);
  put(dw2, dw0);
  lc_.linear_dx(dx2, dy, w);
  lc_.linear_dw(dw2, dy, x, w);
  EXPECT_EQ(std::memcmp(dx2.t().data, dx.t().data, dx.t().nbytes()), 0);
  EXPECT_EQ(std::memcmp(dw2.t().data, dw.t().data, dw.t().nbytes()), 0);
}

TEST_F(Fp8Linear, RoutedExpertsQuantisePerExpertRows) {
  // Fprop and Dgrad run as one fp8_grouped_gemm (all rows quantised at once: 1×128 tiles never cross
  // rows), Wgrad as one fp8_grouped_gemm_wgrad on copies whose 128×1 tiles restart at each expert.
  // 3 experts, the middle one empty; 2 rows past offsets[G] that no call may touch.
  const int64_t E = 3, N = 128, K = 256, R = 52;
  const std::vector<int32_t> off = {0, 21, 21, 50};
  Owned w1(Shape{E, N, K}, DType::kBF16), w3(Shape{E, N, K}, DType::kBF16), offsets(Shape{E + 1}, DType::kI32);
  Owned x(Shape{R, K}, DType::kBF16), da(Shape{R, N}, DType::kBF16), db(Shape{R, N}, DType::kBF16);
  Owned a(Shape{R, N}, DType::kBF16), dxp(Shape{R, K}, DType::kBF16), dw(Shape{E, N, K}, DType::kF32),
      sum_sq(Shape{1}, DType::kF32);
  const std::vector<float> w1v = source(E * N, K, 11), w3v = source(E * N, K, 12), xv = source(R, K, 13);
  const std::vector<float> dav = source(R, N, 14), dbv = source(R, N, 15);
  put(w1, w1v);
  put(w3, w3v);
  put(x, xv);
  put(da, dav);
  put(db, dbv);
  std::memcpy(offsets.t().data, off.data(), off.size() * sizeof(int32_t));
  for (const Tensor& t : {a.t(), dxp.t()})
    for (int64_t i = 0; i < t.numel(); ++i) static_cast<uint16_t*>(t.data)[i] = f32_to_bf16(7.0f);  // sentinels
  put(dw, std::vector<float>(static_cast<size_t>(E * N * K), 7.0f));  // beta = 0 below: never read
  add_weight(w1);
  add_weight(w3);
  start(R, K);

  lc_.grouped_gemm({.c = a, .a = x, .b = w1, .offsets = offsets, .trans_b = true});
  lc_.grouped_gemm({.c = dxp, .a = da, .b = w1, .offsets = offsets, .trans_b = false, .a2 = db, .b2 = w3});
  lc_.grouped_gemm_wgrad({.c = dw, .a = da, .b = x, .offsets = offsets, .beta = 0.0, .sum_sq = sum_sq}, w1);

  const std::vector<double> av = values(a), dxv = values(dxp), dwv = values(dw);
  double sq = 0;
  for (const double v : dwv) sq += v * v;
  for (int64_t g = 0; g < E; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g) + 1], mg = r1 - r0;
    const std::vector<float> w1g(w1v.begin() + g * N * K, w1v.begin() + (g + 1) * N * K);
    const std::vector<float> w3g(w3v.begin() + g * N * K, w3v.begin() + (g + 1) * N * K);
    auto rows = [&](const std::vector<float>& v, int64_t cols) {
      return std::vector<float>(v.begin() + r0 * cols, v.begin() + r1 * cols);
    };
    auto slice = [&](const std::vector<double>& v, int64_t cols) {
      return std::vector<double>(v.begin() + r0 * cols, v.begin() + r1 * cols);
    };
    const std::string tag = "expert " + std::to_string(g);
    const std::vector<double> dwg(dwv.begin() + g * N * K, dwv.begin() + (g + 1) * N * K);
    if (mg == 0) {  // beta = 0: the empty expert's gradient is written 0
      for (const double v : dwg) ASSERT_EQ(v, 0.0) << tag;
      continue;
    }
    const std::vector<double> w1q = deq_blocks(w1g, N, K), w3q = deq_blocks(w3g, N, K);
    expect_close(tag + " Fprop", slice(av, N), product_nt(deq_rows(rows(xv, K), mg, K), w1q, mg, N, K), std::exp2(-8));
    // dx = da Ŵ1 + db Ŵ3, both in the expert's f32 sum, rounded once to bf16.
    Product d1 = product_nt(deq_rows(rows(dav, N), mg, N), test::transposed(w1q, N, K), mg, K, N);
    const Product d3 = product_nt(deq_rows(rows(dbv, N), mg, N), test::transposed(w3q, N, K), mg, K, N);
    for (size_t i = 0; i < d1.c.size(); ++i) {
      d1.c[i] += d3.c[i];
      d1.mag[i] += d3.mag[i];
    }
    expect_close(tag + " Dgrad", slice(dxv, K), d1, std::exp2(-8));
    // Wgrad over the expert's own rows: its 128×1 tiles start at its first row.
    expect_close(tag + " Wgrad", dwg,
                 product_nt(deq_rows(test::transposed(rows(dav, N), mg, N), N, mg),
                            deq_rows(test::transposed(rows(xv, K), mg, K), K, mg), N, K, mg),
                 std::exp2(-24));
  }
  // Rows past offsets[G] untouched; Σ dW² added as the grouped op adds it.
  for (int64_t i = 50 * N; i < R * N; ++i) ASSERT_EQ(av[static_cast<size_t>(i)], 7.0);
  for (int64_t i = 50 * K; i < R * K; ++i) ASSERT_EQ(dxv[static_cast<size_t>(i)], 7.0);
  EXPECT_NEAR(test::get(sum_sq, 0), sq, 1e-5 * sq);
}

TEST_F(Fp8Linear, PairsQuantiseTheSharedOperandOnceAndGiveTheBitsOfSingleCalls) {
  // linear_pair / linear_backward_pair (an FFN's W1 and W3 on one x), grouped_gemm_pair (the experts' W1 and
  // W3 stacks on one x_perm), grouped_backward / grouped_backward_pair (the experts' backward) against the
  // single calls on the same data: the same bits, and each shared operand quantised once, counted as the ops
  // the backend runs (serve/recording_backend.h counts every op it passes on).
  const int64_t M = 40, K = 256, N = 128, E = 3;
  const std::vector<int32_t> off = {0, 17, 17, 40};
  Owned w1(Shape{N, K}, DType::kBF16), w3(Shape{N, K}, DType::kBF16), x(Shape{M, K}, DType::kBF16);
  Owned dy1(Shape{M, N}, DType::kBF16), dy2(Shape{M, N}, DType::kBF16);
  Owned s1(Shape{E, N, K}, DType::kBF16), s3(Shape{E, N, K}, DType::kBF16), offsets(Shape{E + 1}, DType::kI32);
  put(w1, source(N, K, 21));
  put(w3, source(N, K, 22));
  put(x, source(M, K, 23));
  put(dy1, source(M, N, 24));
  put(dy2, source(M, N, 25));
  put(s1, source(E * N, K, 26));
  put(s3, source(E * N, K, 27));
  std::memcpy(offsets.t().data, off.data(), off.size() * sizeof(int32_t));
  add_weight(w1);
  add_weight(w3);
  add_weight(s1);
  add_weight(s3);
  start(M, K);
  lc_.dw_beta = 0.0;

  // Every output twice: [0] by the single calls, [1] by the pairs.
  struct Outputs {
    Owned y1{Shape{M, N}, DType::kF32}, y2{Shape{M, N}, DType::kF32}, dx{Shape{M, K}, DType::kF32};
    Owned dw1{Shape{N, K}, DType::kF32}, dw3{Shape{N, K}, DType::kF32};
    Owned ea{Shape{M, N}, DType::kBF16}, eb{Shape{M, N}, DType::kBF16};
    Owned ew1{Shape{E, N, K}, DType::kF32}, ew3{Shape{E, N, K}, DType::kF32};
    Owned edx{Shape{M, K}, DType::kBF16}, edx2{Shape{M, K}, DType::kBF16};
  } out[2];
  serve::test::RecordingBackend counting(be_);
  lc_.be = &counting;
  const auto ops = [&](const std::function<void()>& f) {
    const int64_t before = counting.ops_run;
    f();
    return counting.ops_run - before;
  };
  const auto grouped = [&](Outputs& o, const Tensor& stack, bool first) {
    return GroupedGemmArgs{.c = first ? o.ea.t() : o.eb.t(), .a = x, .b = stack, .offsets = offsets, .trans_b = true};
  };
  const auto wgrad = [&](Outputs& o, const Tensor& dy, bool first) {
    return GroupedGemmWgradArgs{.c = first ? o.ew1.t() : o.ew3.t(), .a = dy, .b = x, .offsets = offsets, .beta = 0.0};
  };
  Outputs &a = out[0], &b = out[1];
  // Fprop: act_quant + weight_quant + fp8_gemm per Linear, the pair without the second act_quant.
  EXPECT_EQ(ops([&] {
              lc_.linear(a.y1, x, w1);
              lc_.linear(a.y2, x, w3);
            }),
            6);
  EXPECT_EQ(ops([&] { lc_.linear_pair(b.y1, w1, b.y2, w3, x); }), 5);
  // Backward: singles 2 × (2 act_quant + fp8_gemm) + 2 × (act_quant + weight_quant + fp8_gemm); the pair
  // quantises x once and each dy once into both copies: 1 + 2 × (act_quant + fp8_gemm + weight_quant + fp8_gemm).
  EXPECT_EQ(ops([&] {
              lc_.linear_dw(a.dw1, dy1, x, w1);
              lc_.linear_dw(a.dw3, dy2, x, w3);
              lc_.linear_dx(a.dx, dy1, w1);
              lc_.linear_dx(a.dx, dy2, w3, 1.0);
            }),
            12);
  EXPECT_EQ(ops([&] { lc_.linear_backward_pair(b.dw1, dy1, w1, b.dw3, dy2, w3, b.dx, x); }), 9);
  // Experts: act_quant + weight_quant + fp8_grouped_gemm per stack; the Wgrad's two grouped copies + the GEMM.
  EXPECT_EQ(ops([&] {
              lc_.grouped_gemm(grouped(a, s1, true));
              lc_.grouped_gemm(grouped(a, s3, false));
            }),
            6);
  EXPECT_EQ(ops([&] { lc_.grouped_gemm_pair(grouped(b, s1, true), grouped(b, s3, false)); }), 5);
  // The experts' backward through W2 (one dy: its Wgrad and Dgrad) and through W1, W3 (two dy, one x, the
  // two-term Dgrad): singles quantise x per Wgrad and each dy twice (grouped transposed, then row-wise).
  const auto dgrad = [&](Outputs& o, bool two) {
    return GroupedGemmArgs{.c = two ? o.edx2.t() : o.edx.t(),
                           .a = dy1,
                           .b = s1,
                           .offsets = offsets,
                           .trans_b = false,
                           .a2 = two ? dy2.t() : Tensor{},
                           .b2 = two ? s3.t() : Tensor{}};
  };
  EXPECT_EQ(ops([&] {
              lc_.grouped_gemm_wgrad(wgrad(a, dy1, true), s1);
              lc_.grouped_gemm(dgrad(a, false));
            }),
            6);
  EXPECT_EQ(ops([&] { lc_.grouped_backward(wgrad(b, dy1, true), s1, dgrad(b, false)); }), 5);
  EXPECT_EQ(ops([&] {
              lc_.grouped_gemm_wgrad(wgrad(a, dy1, true), s1);
              lc_.grouped_gemm_wgrad(wgrad(a, dy2, false), s3);
              lc_.grouped_gemm(dgrad(a, true));
            }),
            11);
  EXPECT_EQ(ops([&] { lc_.grouped_backward_pair(wgrad(b, dy1, true), s1, wgrad(b, dy2, false), s3, dgrad(b, true)); }),
            8);

  for (const auto& [p, q, name] :
       std::vector<std::tuple<const Owned*, const Owned*, const char*>>{{&a.y1, &b.y1, "y1"},
                                                                        {&a.y2, &b.y2, "y2"},
                                                                        {&a.dx, &b.dx, "dx"},
                                                                        {&a.dw1, &b.dw1, "dW1"},
                                                                        {&a.dw3, &b.dw3, "dW3"},
                                                                        {&a.ea, &b.ea, "experts a"},
                                                                        {&a.eb, &b.eb, "experts b"},
                                                                        {&a.ew1, &b.ew1, "experts dW1"},
                                                                        {&a.ew3, &b.ew3, "experts dW3"},
                                                                        {&a.edx, &b.edx, "experts dx (W2)"},
                                                                        {&a.edx2, &b.edx2, "experts dx (W1, W3)"}}) {
    EXPECT_EQ(std::memcmp(p->t().data, q->t().data, p->t().nbytes()), 0) << name;
    const std::vector<double> v = values(p->t());
    EXPECT_TRUE(std::any_of(v.begin(), v.end(), [](double e) { return e != 0.0; })) << name << " was written";
  }

  // A pair whose operands differ is refused, naming the call.
  EXPECT_THROW(
      {
        try {
          lc_.grouped_gemm_pair(grouped(b, s1, true),
                                {.c = b.eb, .a = dy1, .b = s3, .offsets = offsets, .trans_b = true});
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("grouped_gemm_pair"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
}

}  // namespace
}  // namespace diffmoe
