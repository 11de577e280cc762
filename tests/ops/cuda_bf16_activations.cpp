// The bf16 GEMM mode's activations (docs/model.md §7) against the CPU backend's bf16 fields: both sides run
// the same call on the same bf16 tensors (the CPU widens bf16 inputs exactly and rounds bf16 outputs
// once from its f32 result, cpu/bf16_staging.h). bf16 outputs: the op's f32 tolerance plus one bf16
// step (expect_bf16_close, cuda_dual.h: two f32 results within the tolerance may round to
// neighbouring bf16 values); kExact where the arithmetic is the same.
// - grouped_gemm into a bf16 C (fwd and dgrad layouts, one and two terms): the same call's f32 C
//   rounded to bf16 (same kernel, same bf16 inputs, same f32 accumulation; one bf16 step allowed
//   for a different summation order in a fallback path), and the CPU's bf16 C within the f32 GEMM
//   tolerance plus a step; rows past offsets[G] untouched; beta ≠ 0 and the f32 mode refused by
//   both backends.
// - swiglu_fwd/bwd on bf16 a, b, dh into bf16 outputs.
// - moe_gather from a bf16 x, moe_gather_bwd from a bf16 dx_perm, moe_combine_fwd/bwd from a bf16
//   y_perm and dy: bitwise the CPU's result (the kernels widen bf16 exactly and sum in double like
//   the CPU); vector (D = 24) and scalar (D = 23) paths.
// - rmsnorm_fwd's bf16 copy of y (the FFN's x_norm16) and rmsnorm_bwd's bf16 copy of dx (dx16: the
//   residual gradient for the next backward GEMMs): the f32 result of the same call rounded once,
//   bitwise, and the CPU's copy; mla_kv_split_bwd into a bf16 dkv: the CPU's, bitwise.
// - RoPE on a bf16 q in place, and mla_kv_split_fwd from a bf16 kv (both written in bf16 by their
//   GEMMs).
// - cross_entropy_fwd/bwd on bf16 logits (the head's output).
#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

// |got − round_bf16(want)| ≤ one bf16 step for every element (NaN fails).
int64_t count_off_bf16(const std::vector<double>& got, const std::vector<double>& want, size_t n) {
  int64_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const double w = bf16_to_f32(f32_to_bf16(static_cast<float>(want[i])));
    const double step = w == 0.0 ? 1e-30 : std::ldexp(1.0, std::ilogb(w) - 7);
    if (!(std::fabs(got[i] - w) <= step)) ++bad;
  }
  return bad;
}

// ---------------------------------------------------------------- grouped GEMM into bf16

// Empty groups first, in the middle and last, 1-row groups, groups over one 128-row m-tile, rows
// 330 … 340 past offsets[G].
const std::vector<double> kOffsets = {0, 0, 1, 150, 150, 169, 300, 300, 301, 330};
constexpr int64_t kRows = 341, kUsed = 330;

struct Bf16OutCase {
  int64_t n, k, k2;  // k2 = 0: one term
  bool trans_b;
};

void run_bf16_out_case(const Bf16OutCase& tc, uint64_t seed) {
  const Bf16Mode mode;
  const int64_t G = static_cast<int64_t>(kOffsets.size()) - 1, R = kRows;
  const auto b_shape = [&](int64_t k) { return tc.trans_b ? Shape{G, tc.n, k} : Shape{G, k, tc.n}; };
  const bool two = tc.k2 > 0;
  Dual a(Shape{R, tc.k}), b(b_shape(tc.k)), a2(Shape{R, two ? tc.k2 : 1}), b2(b_shape(two ? tc.k2 : 1));
  Dual off(Shape{G + 1}, DType::kI32), c32(Shape{R, tc.n}), c16(Shape{R, tc.n}, DType::kBF16);
  a.normal(seed);
  b.normal(seed + 1);
  a2.normal(seed + 2);
  b2.normal(seed + 3);
  off.set(kOffsets);
  // Rows in use: NaN (beta = 0 must not read them); rows past offsets[G]: values that must stay.
  std::vector<double> c0(static_cast<size_t>(R * tc.n));
  for (int64_t i = 0; i < R * tc.n; ++i)
    c0[static_cast<size_t>(i)] = i < kUsed * tc.n ? std::nan("") : 0.25 * static_cast<double>(i % 7 + 1);
  c32.set(c0);
  c16.set(c0);
  const auto args = [&](const Tensor& c, Side s) {
    GroupedGemmArgs g{.c = c, .a = a[s], .b = b[s], .offsets = off[s], .trans_b = tc.trans_b, .alpha = -0.75};
    if (two) {
      g.a2 = a2[s];
      g.b2 = b2[s];
    }
    return g;
  };
  gpu().grouped_gemm({}, args(c32[Side::kGpu], Side::kGpu));
  run_both([&](Backend& be, Side s) { be.grouped_gemm({}, args(c16[s], s)); });
  const std::string what = fmt::format("grouped_gemm into bf16, n={} k={}{} trans_b={}", tc.n, tc.k,
                                       two ? fmt::format("+{}", tc.k2) : "", tc.trans_b);
  const std::vector<double> got = c16.device_values(), same_call = c32.device_values();
  const size_t used = static_cast<size_t>(kUsed * tc.n);
  EXPECT_EQ(count_off_bf16(got, same_call, used), 0) << what << ": not the f32 C of the same call in bf16";
  // The CPU's bf16 C: exact bf16 products summed in f32 in another order (cuda_bf16_gemm.cpp), k + k2
  // terms, then one rounding on each side.
  const int64_t terms = tc.k + (two ? tc.k2 : 0);
  expect_bf16_close(c16, Tol{1e-5, 4e-6 * static_cast<double>(terms), "f32 sums of exact bf16 products, other order"},
                    what);
  int64_t changed = 0;
  for (size_t i = used; i < got.size(); ++i) changed += got[i] == c0[i] ? 0 : 1;
  EXPECT_EQ(changed, 0) << what << ": rows past offsets[G] were written";
}

TEST(CudaBf16Activations, GroupedGemmIntoBf16) {
  DIFFMOE_REQUIRE_CUDA();
  uint64_t seed = 2000;
  // n = 24, 200: bf16x2 stores, one and several n-tiles with a partial last one; n = 13: odd, so
  // element stores; k = 40 (one partial k-tile), 264 (several); two terms with k2 ≠ k.
  for (bool trans_b : {true, false})
    for (const auto& [n, k, k2] : {std::tuple<int64_t, int64_t, int64_t>{24, 40, 0},
                                   {200, 264, 0},
                                   {13, 19, 0},
                                   {24, 40, 19},
                                   {200, 264, 72},
                                   {13, 19, 40}})
      run_bf16_out_case({.n = n, .k = k, .k2 = k2, .trans_b = trans_b}, seed += 10);
}

TEST(CudaBf16Activations, Bf16OutputRules) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t R = 9, G = 2, k = 8, n = 8;
  Dual a(Shape{R, k}), b(Shape{G, n, k}), c16(Shape{R, n}, DType::kBF16), off(Shape{G + 1}, DType::kI32);
  a.normal(2100);
  b.normal(2101);
  off.set({0, 4, 9});
  const auto call = [&](Backend& be, Side s, double beta) {
    be.grouped_gemm({}, {.c = c16[s], .a = a[s], .b = b[s], .offsets = off[s], .trans_b = true, .beta = beta});
  };
  for (const Side s : {Side::kCpu, Side::kGpu}) {  // the same refusals on both backends
    Backend& be = s == Side::kCpu ? cpu() : gpu();
    {
      const Bf16Mode mode;
      expect_error([&] { call(be, s, 1.0); }, {"[grouped_gemm]", "c is bf16", "beta"});
    }
    expect_error([&] { call(be, s, 0.0); }, {"[grouped_gemm] c is bf16", "bf16 GEMM mode"});
  }
  gpu().synchronize({});
}

// ---------------------------------------------------------------- element-wise ops on bf16 inputs

TEST(CudaBf16Activations, SwigluOnBf16Inputs) {
  DIFFMOE_REQUIRE_CUDA();
  // width 40: 8-byte bf16 loads and stores; 41: and a scalar tail; 40 one element in: scalar path.
  // a holds the kernels' special cases (a < −80, the zero of silu'(a) near −1.278) after rounding.
  struct Case {
    int64_t width, offset;
  };
  for (const Case tc : {Case{40, 0}, Case{41, 0}, Case{40, 1}}) {
    const int64_t rows = 53, n = rows * tc.width;
    const Shape shape{rows, tc.width};
    Dual a(Shape{n}), b(Shape{n}), dh(Shape{n});
    a.normal(2200, 2.0);
    const float special[] = {-85.0f, -100.0f, -1.27846f, -1.2785f, -1.275f, 120.0f, -88.9f, -81.0f};
    for (size_t i = 0; i < std::size(special); ++i) a.host().ptr<float>()[i * 5 + 1] = special[i];
    a.to_gpu();
    b.normal(2201);
    dh.normal(2202);
    const Dual a16 = bf16_copy(a, Shape{n}, tc.offset), b16 = bf16_copy(b, Shape{n}, tc.offset),
               dh16 = bf16_copy(dh, Shape{n}, tc.offset);
    Dual h16(shape, DType::kBF16), da16(shape, DType::kBF16), db16(shape, DType::kBF16);
    for (Dual* d : {&h16, &da16, &db16}) d->poison();
    run_both([&](Backend& be, Side s) {  // the same bf16 views on both sides
      const auto in = [&](const Dual& d) { return offset_view(d, s, shape, tc.offset); };
      be.swiglu_fwd({}, {.h = h16[s], .a = in(a16), .b = in(b16)});
      be.swiglu_bwd({}, {.da = da16[s], .db = db16[s], .dh = in(dh16), .a = in(a16), .b = in(b16)});
    });
    const std::string what = fmt::format("width {}, offset {}", tc.width, tc.offset);
    // The kernels' f32 formulas against the CPU's double ones rounded to f32: a few f32 ulps
    // (swiglu_ops.cu), inside the bf16 step.
    const Tol tol{0.0, 0.0, "f32 vs double formula: a few f32 ulps, inside the bf16 step"};
    for (const auto& [got, name] :
         {std::pair{&h16, "swiglu_fwd h"}, std::pair{&da16, "swiglu_bwd da"}, std::pair{&db16, "swiglu_bwd db"}}) {
      expect_bf16_close(*got, tol, fmt::format("{} on bf16 inputs, {}", name, what));
    }
  }
}

// A plan of K = 3 slots per token, rows scattered: slot_pos[n,k] = (7·(3n + k)) mod (3N) (a
// permutation because 7 and 3N are coprime for N = 29).
std::vector<double> scattered_slots(int64_t N, int64_t K) {
  std::vector<double> sp(static_cast<size_t>(N * K));
  for (int64_t i = 0; i < N * K; ++i) sp[static_cast<size_t>(i)] = static_cast<double>((7 * i) % (N * K));
  return sp;
}

TEST(CudaBf16Activations, MoeRowsInBf16) {
  DIFFMOE_REQUIRE_CUDA();
  const Tol kDot{1e-6, 1e-7, "f64 dot rounded once on both sides"};
  for (const int64_t D : {int64_t{24}, int64_t{23}}) {
    const int64_t N = 29, K = 3, NK = N * K;
    const std::string what = fmt::format("D = {}", D);
    Dual slot(Shape{N, K}, DType::kI32), src(Shape{NK}, DType::kI32), w(Shape{N, K});
    slot.set(scattered_slots(N, K));
    src.ints(2300, 0, static_cast<int32_t>(N));
    w.normal(2301);

    // Gather from a bf16 x into bf16 and f32 rows: the rows moved exactly on both sides.
    Dual x(Shape{N, D});
    x.normal(2302);
    const Dual x16 = bf16_copy(x, Shape{N, D});
    Dual xp(Shape{NK, D}), xp16(Shape{NK, D}, DType::kBF16);
    xp.poison();
    xp16.poison();
    run_both([&](Backend& be, Side s) {
      be.moe_gather({}, {.x_perm = xp16[s], .x = x16[s], .src_row = src[s]});
      be.moe_gather({}, {.x_perm = xp[s], .x = x16[s], .src_row = src[s]});
    });
    expect_close(xp16, kExact, "moe_gather from a bf16 x into bf16 rows, " + what);
    expect_close(xp, kExact, "moe_gather from a bf16 x into f32 rows, " + what);

    // gather_bwd from a bf16 dx_perm; combine_fwd from a bf16 y_perm: dx, y accumulate (start non-zero).
    Dual rows(Shape{NK, D});
    rows.normal(2303);
    const Dual rows16 = bf16_copy(rows, Shape{NK, D});
    Dual dx(Shape{N, D}), y(Shape{N, D});
    dx.normal(2304);
    y.normal(2305);
    run_both([&](Backend& be, Side s) {
      be.moe_gather_bwd({}, {.dx = dx[s], .dx_perm = rows16[s], .slot_pos = slot[s]});
      be.moe_combine_fwd({}, {.y = y[s], .y_perm = rows16[s], .topk_w = w[s], .slot_pos = slot[s]});
    });
    expect_close(dx, kExact, "moe_gather_bwd from a bf16 dx_perm, " + what);
    expect_close(y, kExact, "moe_combine_fwd from a bf16 y_perm, " + what);

    // combine_bwd reading a bf16 y_perm: dy_perm = w·dy (no y_perm), dtopk_w = ⟨dy, y_perm⟩.
    Dual dy(Shape{N, D}), dyp(Shape{NK, D}), dtw(Shape{N, K}), dyp16(Shape{NK, D}, DType::kBF16);
    dy.normal(2306);
    dyp.poison();
    dtw.poison();
    run_both([&](Backend& be, Side s) {
      be.moe_combine_bwd({}, {.dy_perm = dyp[s],
                              .dtopk_w = dtw[s],
                              .dy = dy[s],
                              .y_perm = rows16[s],
                              .topk_w = w[s],
                              .slot_pos = slot[s]});
    });
    expect_close(dyp, kExact, "moe_combine_bwd dy_perm beside a bf16 y_perm, " + what);
    expect_close(dtw, kDot, "moe_combine_bwd dtopk_w from a bf16 y_perm, " + what);

    // ... and a bf16 dy too (the residual gradient's bf16 copy), into a bf16 dy_perm.
    const Dual dy16 = bf16_copy(dy, Shape{N, D});
    dyp16.poison();
    dtw.poison();
    run_both([&](Backend& be, Side s) {
      be.moe_combine_bwd({}, {.dy_perm = dyp16[s],
                              .dtopk_w = dtw[s],
                              .dy = dy16[s],
                              .y_perm = rows16[s],
                              .topk_w = w[s],
                              .slot_pos = slot[s]});
    });
    expect_bf16_close(dyp16, kExact, "moe_combine_bwd bf16 dy_perm from a bf16 dy, " + what);
    expect_close(dtw, kDot, "moe_combine_bwd dtopk_w from a bf16 dy, " + what);
  }
}

// rmsnorm_bwd's dx16: the final dx (after accumulation) rounded to bf16, bitwise; dx itself is what the
// same call without dx16 writes; and the CPU's dx16 from the same call within cuda_vs_cpu.cpp's
// kNormBwdTol plus one bf16 step. The vector path (widths 40 with a warp per row, 1536 with a
// block), and the general path (x_stride 41); overwrite and accumulate.
TEST(CudaBf16Activations, RmsNormBackwardWritesBf16Copy) {
  DIFFMOE_REQUIRE_CUDA();
  const Tol kNormBwdTol{1e-5, 1e-6, "f32 arithmetic on terms of size <= 10, a few roundings"};
  struct Case {
    int64_t rows, width, xs;
  };
  for (const Case c : {Case{31, 40, 40}, Case{9, 1536, 1536}, Case{31, 40, 41}})
    for (const bool accumulate : {false, true}) {
      Dual x(Shape{c.rows, c.xs}), dy(Shape{c.rows, c.xs}), w(Shape{c.width}), rstd(Shape{c.rows}),
          y(Shape{c.rows, c.width});
      Dual dx_plain(Shape{c.rows, c.xs}), dx(Shape{c.rows, c.xs}), dw(Shape{c.width}),
          dx16(Shape{c.rows, c.width}, DType::kBF16);
      x.normal(2500, 1.3);
      dy.normal(2501);
      w.normal(2502, 0.5, 1.0);
      dx_plain.normal(2503);  // the accumulate case adds onto these
      dx.normal(2503);
      dx16.poison();
      run_both([&](Backend& be, Side s) {
        be.rmsnorm_fwd({}, {.y = y[s],
                            .rstd = rstd[s],
                            .x = x[s],
                            .w = w[s],
                            .rows = c.rows,
                            .width = c.width,
                            .x_stride = c.xs,
                            .eps = 1e-6});
      });
      rstd.to_gpu();  // both backwards read the CPU's rstd
      const auto bwd = [&](Backend& be, Side s, const Dual& out, const Tensor& out16) {
        be.rmsnorm_bwd({}, {.dx = out[s],
                            .dw = dw[s],
                            .dy = dy[s],
                            .x = x[s],
                            .w = w[s],
                            .rstd = rstd[s],
                            .rows = c.rows,
                            .width = c.width,
                            .x_stride = c.xs,
                            .y_stride = c.xs,
                            .dx_accumulate = accumulate,
                            .dx16 = out16});
      };
      bwd(gpu(), Side::kGpu, dx_plain, Tensor{});
      run_both([&](Backend& be, Side s) { bwd(be, s, dx, dx16[s]); });
      const std::string what =
          fmt::format("rmsnorm_bwd dx16, width {}, x_stride {}, accumulate {}", c.width, c.xs, accumulate);
      const std::vector<double> got = dx.device_values(), plain = dx_plain.device_values(),
                                got16 = dx16.device_values();
      EXPECT_EQ(got, plain) << what << ": dx changed by writing dx16";
      int64_t bad = 0;
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.width; ++j) {
          const double want = bf16_to_f32(f32_to_bf16(static_cast<float>(got[static_cast<size_t>(r * c.xs + j)])));
          bad += got16[static_cast<size_t>(r * c.width + j)] == want ? 0 : 1;
        }
      EXPECT_EQ(bad, 0) << what << ": dx16 is not dx rounded to bf16";
      expect_bf16_close(dx16, kNormBwdTol, what + " against the CPU's");
    }
}

// mla_kv_split_bwd into a bf16 dkv (W_kvb's backward GEMM operand in the bf16 mode): the CPU's bf16
// dkv exactly (the split only moves values, each rounded once from the same f32); dkr stays f32 and
// equal to the CPU's sums.
TEST(CudaBf16Activations, KvSplitBackwardIntoBf16) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    int64_t N, H, dn, dr, dv, kr_stride, kr_offset;
  };
  for (const Case c : {Case{13, 3, 4, 2, 5, 9, 6}, Case{37, 3, 8, 4, 12, 20, 16}}) {
    const int64_t N = c.N, H = c.H, dqk = c.dn + c.dr;
    Dual dk(Shape{N, H, dqk}), dv(Shape{N, H, c.dv}), dkr(Shape{N, c.kr_stride});
    Dual dkv16(Shape{N, H * (c.dn + c.dv)}, DType::kBF16);
    dk.normal(2600);
    dv.normal(2601);
    dkr.normal(2602);
    dkv16.poison();
    run_both([&](Backend& be, Side s) {
      be.mla_kv_split_bwd({}, {.dkv = dkv16[s],
                               .dkr = dkr[s],
                               .dk = dk[s],
                               .dv = dv[s],
                               .n_heads = H,
                               .d_nope = c.dn,
                               .d_rope = c.dr,
                               .d_v = c.dv,
                               .kr_stride = c.kr_stride,
                               .kr_offset = c.kr_offset});
    });
    const std::string what = fmt::format("mla_kv_split_bwd into a bf16 dkv, dn={} dr={} dv={}", c.dn, c.dr, c.dv);
    expect_close(dkv16, kExact, what);
    expect_close(dkr, kExact, what + ": dkr");
  }
}

// RoPE in place on a bf16 x (the bf16 GEMM mode's q, written in bf16 by its GEMM): the CPU's rotation
// of the same bf16 x, within cuda_vs_cpu.cpp's kRopeTol (the GPU may fuse a multiply-add) plus one
// bf16 step; columns outside the rope range are untouched on both sides. The cases of
// cuda_vs_cpu.cpp: one pair per thread, and two pairs per thread (8-byte bf16 pieces).
TEST(CudaBf16Activations, RopeOnBf16) {
  DIFFMOE_REQUIRE_CUDA();
  const Tol kRopeTol{1e-6, 1e-6, "same f32 formula, FMA contraction"};
  struct Case {
    int64_t rows, width, heads, head_stride, col_offset, rope_dim, seq_len, pos_offset;
  };
  for (const Case c : {Case{45, 40, 3, 12, 2, 8, 7, 3}, Case{31, 14, 1, 14, 10, 4, 31, 0},
                       Case{45, 48, 3, 16, 4, 8, 7, 3}, Case{31, 36, 1, 3, 32, 4, 31, 0}})
    for (bool inverse : {false, true}) {
      const Shape shape{c.rows, c.width};
      Dual x(shape), cos(Shape{40, c.rope_dim / 2}), sin(Shape{40, c.rope_dim / 2});
      x.normal(2700);
      cos.normal(2701);
      sin.normal(2702);
      const Dual x16 = bf16_copy(x, shape);
      run_both([&](Backend& be, Side s) {
        be.rope({}, {.x = x16[s],
                     .cos = cos[s],
                     .sin = sin[s],
                     .n_heads = c.heads,
                     .head_stride = c.head_stride,
                     .col_offset = c.col_offset,
                     .rope_dim = c.rope_dim,
                     .seq_len = c.seq_len,
                     .pos_offset = c.pos_offset,
                     .inverse = inverse});
      });
      expect_bf16_close(x16, kRopeTol,
                        fmt::format("rope on bf16, heads={} width={} inverse={}", c.heads, c.width, inverse));
    }
}

// mla_kv_split_fwd from a bf16 kv (W_kvb's output in the bf16 mode) into bf16 k, v: kv's values moved
// exactly and kr's (f32) rounded once: bitwise the CPU's split of the same tensors.
TEST(CudaBf16Activations, KvSplitFromBf16Kv) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    int64_t N, H, dn, dr, dv, kr_stride, kr_offset;
  };
  for (const Case c : {Case{13, 3, 4, 2, 5, 9, 6}, Case{37, 3, 8, 4, 12, 20, 16}}) {
    const int64_t N = c.N, H = c.H, dqk = c.dn + c.dr;
    const Shape kv_shape{N, H * (c.dn + c.dv)}, k_shape{N, H, dqk}, v_shape{N, H, c.dv};
    Dual kv(kv_shape), kr(Shape{N, c.kr_stride}), k16(k_shape, DType::kBF16), v16(v_shape, DType::kBF16);
    Dual k(k_shape), v(v_shape);
    kv.normal(2800);
    kr.normal(2801);
    for (Dual* d : {&k16, &v16, &k, &v}) d->poison();
    const Dual kv16 = bf16_copy(kv, kv_shape);
    run_both([&](Backend& be, Side s) {
      const auto split = [&](const Tensor& kt, const Tensor& vt) {
        be.mla_kv_split_fwd({}, {.k = kt,
                                 .v = vt,
                                 .kv = kv16[s],
                                 .kr = kr[s],
                                 .n_heads = H,
                                 .d_nope = c.dn,
                                 .d_rope = c.dr,
                                 .d_v = c.dv,
                                 .kr_stride = c.kr_stride,
                                 .kr_offset = c.kr_offset});
      };
      split(k16[s], v16[s]);
      split(k[s], v[s]);
    });
    const std::string what = fmt::format("mla_kv_split_fwd from a bf16 kv, dn={} dr={} dv={}", c.dn, c.dr, c.dv);
    expect_close(k16, kExact, what + ": bf16 k");
    expect_close(v16, kExact, what + ": bf16 v");
    expect_close(k, kExact, what + ": f32 k");
    expect_close(v, kExact, what + ": f32 v");
  }
}

// Cross-entropy on bf16 logits (the head's GEMM output in the bf16 mode): the CPU's loss and gradient
// on the same bf16 logits, with cuda_vs_cpu_moe.cpp's tolerance (f32 exp against f64; both widen
// exactly), dlogits in f32 and in bf16 (plus one bf16 step). Paths: the row cached in shared memory
// as bf16 (V = 1000: 8-byte pieces by cp.async; V = 1001: element copies and −inf padding) and
// streamed from global memory (V = 120000 needs 240 KB of bf16, over an H100's 227 KB per block).
TEST(CudaBf16Activations, CrossEntropyOnBf16Logits) {
  DIFFMOE_REQUIRE_CUDA();
  const Tol kCeTol{1e-5, 1e-8, "f32 exp vs f64 exp, f64 sums (cuda_vs_cpu_moe.cpp)"};
  struct Case {
    int64_t N, V;
  };
  for (const Case c : {Case{57, 1001}, Case{57, 1000}, Case{3, 120000}}) {
    const int64_t N = c.N, V = c.V;
    const Shape shape{N, V};
    Dual logits(shape), targets(Shape{N}, DType::kI32), loss(Shape{1}), valid(Shape{1});
    logits.normal(2900, 3.0);
    const Dual l16 = bf16_copy(logits, shape);
    std::vector<double> t(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) t[static_cast<size_t>(n)] = n % 5 == 3 || n == 1 ? -1 : (n * 389) % V;
    targets.set(t);
    loss.set({1.5});
    valid.set({3});
    run_both([&](Backend& be, Side s) {
      be.cross_entropy_fwd({}, {.loss_sum = loss[s], .valid = valid[s], .logits = l16[s], .targets = targets[s]});
    });
    const std::string what = fmt::format("on bf16 logits, N={} V={}", N, V);
    expect_close(loss, kCeTol, "cross_entropy_fwd loss_sum " + what);
    expect_close(valid, kExact, "cross_entropy_fwd valid " + what);
    Dual dl(shape), dl16(shape, DType::kBF16);
    dl.poison();
    dl16.poison();
    run_both([&](Backend& be, Side s) {
      for (const Dual* out : {&dl, &dl16})
        be.cross_entropy_bwd(
            {}, {.dlogits = (*out)[s], .logits = l16[s], .targets = targets[s], .valid = valid[s], .grad_scale = 0.7});
    });
    expect_close(dl, kCeTol, "cross_entropy_bwd f32 dlogits " + what);
    expect_bf16_close(dl16, kCeTol, "cross_entropy_bwd bf16 dlogits " + what);
  }
}

// rmsnorm_fwd's y16: y rounded to bf16 (what a copy of y into bf16 gives), bitwise, with y itself as
// without it; and the CPU's y16 of the same call within kNormTol plus one bf16 step; the vector path
// (width 40, 1536) and the general one (x_stride 41).
TEST(CudaBf16Activations, RmsNormForwardWritesBf16Copy) {
  DIFFMOE_REQUIRE_CUDA();
  const Tol kNormTol{1e-6, 1e-7, "f64 arithmetic rounded once; r within an f32 ulp"};
  struct Case {
    int64_t rows, width, xs;
  };
  for (const Case c : {Case{31, 40, 40}, Case{9, 1536, 1536}, Case{31, 40, 41}}) {
    Dual x(Shape{c.rows, c.xs}), w(Shape{c.width}), y(Shape{c.rows, c.width}), y_plain(Shape{c.rows, c.width});
    Dual rstd(Shape{c.rows}), y16(Shape{c.rows, c.width}, DType::kBF16);
    x.normal(3000, 1.3);
    w.normal(3001, 0.5, 1.0);
    y16.poison();
    const auto fwd = [&](Backend& be, Side s, const Dual& out, const Tensor& out16) {
      be.rmsnorm_fwd({}, {.y = out[s],
                          .rstd = rstd[s],
                          .x = x[s],
                          .w = w[s],
                          .rows = c.rows,
                          .width = c.width,
                          .x_stride = c.xs,
                          .eps = 1e-6,
                          .y16 = out16});
    };
    fwd(gpu(), Side::kGpu, y_plain, Tensor{});
    run_both([&](Backend& be, Side s) { fwd(be, s, y, y16[s]); });
    const std::string what = fmt::format("rmsnorm_fwd y16, width {}, x_stride {}", c.width, c.xs);
    const std::vector<double> got = y.device_values(), got16 = y16.device_values();
    EXPECT_EQ(got, y_plain.device_values()) << what << ": y changed by writing y16";
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i)
      bad += got16[i] == bf16_to_f32(f32_to_bf16(static_cast<float>(got[i]))) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": y16 is not y rounded to bf16";
    expect_bf16_close(y16, kNormTol, what + " against the CPU's");
  }
}

// mla_kv_split_bwd from bf16 dk, dv (the attention's gradients in the bf16 mode) into a bf16 dkv: the
// CPU's split of the same tensors: dkv bitwise (values move), dkr the same f32 sums over heads in
// order (bitwise).
TEST(CudaBf16Activations, KvSplitBackwardFromBf16) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    int64_t N, H, dn, dr, dv, kr_stride, kr_offset;
  };
  for (const Case c : {Case{13, 3, 4, 2, 5, 9, 6}, Case{37, 3, 8, 4, 12, 20, 16}}) {
    const int64_t N = c.N, H = c.H, dqk = c.dn + c.dr;
    const Shape k_shape{N, H, dqk}, v_shape{N, H, c.dv}, kv_shape{N, H * (c.dn + c.dv)};
    Dual dk(k_shape), dv(v_shape), dkr(Shape{N, c.kr_stride}), dkv16(kv_shape, DType::kBF16);
    dk.normal(3100);
    dv.normal(3101);
    dkr.normal(3102);
    dkv16.poison();
    const Dual dk16 = bf16_copy(dk, k_shape), dv16 = bf16_copy(dv, v_shape);
    run_both([&](Backend& be, Side s) {
      be.mla_kv_split_bwd({}, {.dkv = dkv16[s],
                               .dkr = dkr[s],
                               .dk = dk16[s],
                               .dv = dv16[s],
                               .n_heads = H,
                               .d_nope = c.dn,
                               .d_rope = c.dr,
                               .d_v = c.dv,
                               .kr_stride = c.kr_stride,
                               .kr_offset = c.kr_offset});
    });
    const std::string what = fmt::format("mla_kv_split_bwd from bf16 dk, dv, dn={} dr={} dv={}", c.dn, c.dr, c.dv);
    expect_close(dkv16, kExact, what + ": dkv");
    expect_close(dkr, kExact, what + ": dkr");
  }
}

}  // namespace
}  // namespace diffmoe::cudatest
