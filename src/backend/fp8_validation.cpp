// Argument checks of the FP8 ops (op_args.h's FP8 section; op_validation.h), shared by both
// backends: every tensor on the backend's device, e4m3 data and f32 scales in the layouts cuBLASLt
// reads, and errors that name the op and the field.
#include <cstdint>
#include <string_view>

#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// A 2-D tensor of `dtype` on dev with exactly `shape` (the field's name in every message).
void expect(const Tensor& t, const Shape& shape, DType dtype, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_shape(t, shape, op, name);
  check_dtype(t, dtype, op, name);
}

// The source of a quantisation: a 2-D (or, for a stack of weights, 3-D) f32 or bf16 tensor.
void check_source(const Tensor& t, Device dev, std::string_view op, std::string_view name, bool stack = false) {
  check_device(t, dev, op, name);
  DIFFMOE_CHECK(t.rank() == 2 || (stack && t.rank() == 3), "[{}] {} must be 2-D{}, got {}", op, name,
                stack ? " (or a 3-D stack [G, N, K])" : "", t.describe());
  DIFFMOE_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kBF16,
                "[{}] {} must be f32 or bf16 (the values FP8 copies are made from, docs/model.md §7), got {}", op, name,
                dtype_name(t.dtype));
}

// A float output the backend writes: f32 or bf16, and on the CPU also f64.
void check_float_output(const Tensor& t, Device dev, std::string_view op, std::string_view name) {
  const bool ok = t.dtype == DType::kF32 || t.dtype == DType::kBF16 || (dev == Device::kCPU && t.dtype == DType::kF64);
  DIFFMOE_CHECK(ok, "[{}] {} must be f32 or bf16{}, got {}", op, name,
                dev == Device::kCPU ? " (or f64 on the cpu)" : "", dtype_name(t.dtype));
}

// Which of an op's two (data, scale) output pairs are given; a pair is both or neither.
bool pair_given(const Tensor& q, const Tensor& s, std::string_view op, std::string_view q_name,
                std::string_view s_name) {
  DIFFMOE_CHECK(q.defined() == s.defined(), "[{}] {} and {} come together: {} is given, {} is not", op, q_name, s_name,
                q.defined() ? q_name : s_name, q.defined() ? s_name : q_name);
  return q.defined();
}

// The outputs of a quantiser whose source has the dims d: which pairs are given (at least one), each
// checked against the shapes of the row-wise copy (q, scale) and the transposed one (q_t, scale_t).
Fp8QuantDims check_quant_outputs(std::string_view op, Fp8QuantDims d, const Tensor& q, const Tensor& scale,
                                 const Tensor& q_t, const Tensor& scale_t, const Shape& q_shape,
                                 const Shape& scale_shape, const Shape& q_t_shape, const Shape& scale_t_shape,
                                 Device dev) {
  d.row_wise = pair_given(q, scale, op, "q", "scale");
  d.col_wise = pair_given(q_t, scale_t, op, "q_t", "scale_t");
  DIFFMOE_CHECK(d.row_wise || d.col_wise,
                "[{}] no output: give q and scale (the row-wise copy), q_t and scale_t (the transposed copy), or both",
                op);
  if (d.row_wise) {
    expect(q, q_shape, DType::kF8E4M3, dev, op, "q");
    expect(scale, scale_shape, DType::kF32, dev, op, "scale");
  }
  if (d.col_wise) {
    expect(q_t, q_t_shape, DType::kF8E4M3, dev, op, "q_t");
    expect(scale_t, scale_t_shape, DType::kF32, dev, op, "scale_t");
  }
  return d;
}

}  // namespace

Fp8QuantDims validate_act_quant(const ActQuantArgs& a, Device dev) {
  constexpr std::string_view kOp = "act_quant";
  check_source(a.x, dev, kOp, "x");
  const int64_t m = a.x.dim(0), k = a.x.dim(1);
  if (a.offsets.defined()) {
    // The grouped transposed copy: tiles restart at each group's first row, padded to whole tiles (op_args.h).
    DIFFMOE_CHECK(a.q_t.defined() && a.scale_t.defined(),
                  "[{}] offsets given without q_t and scale_t (the grouped transposed copy)", kOp);
    const bool rows = pair_given(a.q, a.scale, kOp, "q", "scale");
    if (rows) {  // the row-wise copy beside it, as without offsets
      expect(a.q, Shape{m, k}, DType::kF8E4M3, dev, kOp, "q");
      expect(a.scale, Shape{fp8_tiles(k), m}, DType::kF32, dev, kOp, "scale");
    }
    check_device(a.offsets, dev, kOp, "offsets");
    DIFFMOE_CHECK(a.offsets.rank() == 1 && a.offsets.dim(0) >= 2, "[{}] offsets must be [G+1] with G ≥ 1, got {}", kOp,
                  a.offsets.describe());
    check_dtype(a.offsets, DType::kI32, kOp, "offsets");
    const int64_t g = a.offsets.dim(0) - 1, slots = fp8_group_tiles(m, g);
    expect(a.q_t, Shape{k, kFp8Tile * slots}, DType::kF8E4M3, dev, kOp, "q_t (grouped: [K, 128·(ceil(M/128) + G)])");
    expect(a.scale_t, Shape{slots, k}, DType::kF32, dev, kOp, "scale_t (grouped: [ceil(M/128) + G, K])");
    return Fp8QuantDims{.rows = m, .cols = k, .row_wise = rows, .col_wise = true, .groups = g, .grouped = true};
  }
  // 1×128 tiles along each copy's rows: scale [ceil(K/128), M], scale_t [ceil(M/128), K] (op_args.h).
  return check_quant_outputs(kOp, Fp8QuantDims{.rows = m, .cols = k}, a.q, a.scale, a.q_t, a.scale_t, Shape{m, k},
                             Shape{fp8_tiles(k), m}, Shape{k, m}, Shape{fp8_tiles(m), k}, dev);
}

Fp8QuantDims validate_weight_quant(const WeightQuantArgs& a, Device dev) {
  constexpr std::string_view kOp = "weight_quant";
  check_source(a.w, dev, kOp, "w", /*stack=*/true);
  // A stack [G, N, K]: every output with a leading G (op_args.h).
  const bool stack = a.w.rank() == 3;
  const int64_t g = stack ? a.w.dim(0) : 1, n = a.w.dim(-2), k = a.w.dim(-1);
  const auto shape = [&](int64_t rows, int64_t cols) { return stack ? Shape{g, rows, cols} : Shape{rows, cols}; };
  return check_quant_outputs(kOp, Fp8QuantDims{.rows = n, .cols = k, .groups = g}, a.q, a.scale, a.q_t, a.scale_t,
                             shape(n, k), shape(fp8_tiles(n), fp8_block_scale_cols(k)), shape(k, n),
                             shape(fp8_tiles(k), fp8_block_scale_cols(n)), dev);
}

Fp8QuantDims validate_weight_dequant(const WeightDequantArgs& a, Device dev) {
  constexpr std::string_view kOp = "weight_dequant";
  check_device(a.w, dev, kOp, "w");
  DIFFMOE_CHECK(a.w.rank() == 2, "[{}] w must be 2-D [N, K], got {}", kOp, a.w.describe());
  check_float_output(a.w, dev, kOp, "w");
  const int64_t n = a.w.dim(0), k = a.w.dim(1);
  expect(a.q, Shape{n, k}, DType::kF8E4M3, dev, kOp, "q");
  expect(a.scale, Shape{fp8_tiles(n), fp8_block_scale_cols(k)}, DType::kF32, dev, kOp, "scale");
  return Fp8QuantDims{.rows = n, .cols = k, .row_wise = true};
}

GemmDims validate_fp8_gemm(const Fp8GemmArgs& a, Device dev) {
  constexpr std::string_view kOp = "fp8_gemm";
  check_device(a.c, dev, kOp, "c");
  DIFFMOE_CHECK(a.c.rank() == 2, "[{}] c must be 2-D [M, N], got {}", kOp, a.c.describe());
  check_float_output(a.c, dev, kOp, "c");
  for (const auto& [t, name] : {std::pair{&a.a, "a"}, std::pair{&a.b, "b"}}) {
    check_device(*t, dev, kOp, name);
    DIFFMOE_CHECK(t->rank() == 2, "[{}] {} must be 2-D (K-major: [M, K] for a, [N, K] for b), got {}", kOp, name,
                  t->describe());
    check_dtype(*t, DType::kF8E4M3, kOp, name);
  }
  GemmDims d{.m = a.a.dim(0), .n = a.b.dim(0), .k = a.a.dim(1)};
  DIFFMOE_CHECK(a.b.dim(1) == d.k && a.c.dim(0) == d.m && a.c.dim(1) == d.n,
                "[{}] shapes do not match: a is {}, b is {}, c is {}; need a [M, K], b [N, K] (both K-major), c [M, N]",
                kOp, a.a.shape.str(), a.b.shape.str(), a.c.shape.str());
  expect(a.a_scale, Shape{fp8_tiles(d.k), d.m}, DType::kF32, dev, kOp, "a_scale");
  const Shape b_scale_shape = a.b_scaling == Fp8Scaling::kBlock128x128
                                  ? Shape{fp8_tiles(d.n), fp8_block_scale_cols(d.k)}
                                  : Shape{fp8_tiles(d.k), d.n};
  expect(a.b_scale, b_scale_shape, DType::kF32, dev, kOp,
         a.b_scaling == Fp8Scaling::kBlock128x128 ? "b_scale (128×128 blocks)" : "b_scale (1×128 tiles)");
  // A bf16 C is only written: no beta·C term, which would read it in bf16 (GemmArgs' rule).
  DIFFMOE_CHECK(a.c.dtype != DType::kBF16 || a.beta == 0.0,
                "[{}] c is bf16: needs beta = 0, got beta = {} (a GEMM that adds to its output writes f32)", kOp,
                a.beta);
  if (a.addend.defined()) {
    check_device(a.addend, dev, kOp, "addend");
    check_shape(a.addend, a.c.shape, kOp, "addend");
    check_dtype(a.addend, a.c.dtype, kOp, "addend");
    const auto c0 = reinterpret_cast<uintptr_t>(a.c.data), r0 = reinterpret_cast<uintptr_t>(a.addend.data);
    const uintptr_t bytes = a.c.nbytes();
    DIFFMOE_CHECK(r0 == c0 || r0 + bytes <= c0 || c0 + bytes <= r0,
                  "[{}] addend {} partly overlaps c {}: pass c itself or a separate tensor", kOp, a.addend.describe(),
                  a.c.describe());
  }
  return d;
}

Fp8GroupedGemmDims validate_fp8_grouped_gemm(const Fp8GroupedGemmArgs& a, Device dev) {
  constexpr std::string_view kOp = "fp8_grouped_gemm";
  check_device(a.c, dev, kOp, "c");
  DIFFMOE_CHECK(a.c.rank() == 2, "[{}] c must be 2-D [R, N], got {}", kOp, a.c.describe());
  check_float_output(a.c, dev, kOp, "c");
  check_device(a.a, dev, kOp, "a");
  DIFFMOE_CHECK(a.a.rank() == 2, "[{}] a must be 2-D [R, K] (K-major), got {}", kOp, a.a.describe());
  check_dtype(a.a, DType::kF8E4M3, kOp, "a");
  check_device(a.b, dev, kOp, "b");
  DIFFMOE_CHECK(a.b.rank() == 3, "[{}] b must be a 3-D stack [G, N, K] (K-major), got {}", kOp, a.b.describe());
  check_dtype(a.b, DType::kF8E4M3, kOp, "b");
  Fp8GroupedGemmDims d{.rows = a.a.dim(0), .n = a.b.dim(1), .k = a.a.dim(1), .groups = a.b.dim(0)};
  DIFFMOE_CHECK(a.b.dim(2) == d.k && a.c.dim(0) == d.rows && a.c.dim(1) == d.n,
                "[{}] shapes do not match: a is {}, b is {}, c is {}; need a [R, K], b [G, N, K], c [R, N]", kOp,
                a.a.shape.str(), a.b.shape.str(), a.c.shape.str());
  DIFFMOE_CHECK(d.k > 0, "[{}] K = 0 (a is {}): an empty product; the expert GEMMs always have one", kOp,
                a.a.describe());
  expect(a.a_scale, Shape{fp8_tiles(d.k), d.rows}, DType::kF32, dev, kOp, "a_scale");
  expect(a.b_scale, Shape{d.groups, fp8_tiles(d.n), fp8_block_scale_cols(d.k)}, DType::kF32, dev, kOp, "b_scale");
  expect(a.offsets, Shape{d.groups + 1}, DType::kI32, dev, kOp, "offsets");
  d.two_terms = a.a2.defined() || a.b2.defined() || a.a2_scale.defined() || a.b2_scale.defined();
  if (!d.two_terms) return d;
  DIFFMOE_CHECK(a.a2.defined() && a.b2.defined() && a.a2_scale.defined() && a.b2_scale.defined(),
                "[{}] the second term needs a2, a2_scale, b2 and b2_scale together: a2 is {}, b2 is {}", kOp,
                a.a2.defined() ? a.a2.describe() : "not given", a.b2.defined() ? a.b2.describe() : "not given");
  check_device(a.a2, dev, kOp, "a2");
  DIFFMOE_CHECK(a.a2.rank() == 2 && a.a2.dim(0) == d.rows, "[{}] a2 must be [R = {}, K2], got {}", kOp, d.rows,
                a.a2.describe());
  check_dtype(a.a2, DType::kF8E4M3, kOp, "a2");
  d.k2 = a.a2.dim(1);
  DIFFMOE_CHECK(d.k2 > 0, "[{}] K2 = 0 (a2 is {}): leave the second term out instead", kOp, a.a2.describe());
  expect(a.b2, Shape{d.groups, d.n, d.k2}, DType::kF8E4M3, dev, kOp, "b2 ([G, N, K2] as b and a2)");
  expect(a.a2_scale, Shape{fp8_tiles(d.k2), d.rows}, DType::kF32, dev, kOp, "a2_scale");
  expect(a.b2_scale, Shape{d.groups, fp8_tiles(d.n), fp8_block_scale_cols(d.k2)}, DType::kF32, dev, kOp, "b2_scale");
  return d;
}

Fp8GroupedWgradDims validate_fp8_grouped_gemm_wgrad(const Fp8GroupedGemmWgradArgs& a, Device dev) {
  constexpr std::string_view kOp = "fp8_grouped_gemm_wgrad";
  check_device(a.c, dev, kOp, "c");
  DIFFMOE_CHECK(a.c.rank() == 3, "[{}] c must be [G, M, N], got {}", kOp, a.c.describe());
  DIFFMOE_CHECK(a.c.dtype == DType::kF32 || (dev == Device::kCPU && a.c.dtype == DType::kF64),
                "[{}] c must be f32{} (a weight gradient accumulates), got {}", kOp,
                dev == Device::kCPU ? " or f64" : "", dtype_name(a.c.dtype));
  for (const auto& [t, name] : {std::pair{&a.a, "a"}, std::pair{&a.b, "b"}}) {
    check_device(*t, dev, kOp, name);
    DIFFMOE_CHECK(t->rank() == 2 && t->dim(1) % kFp8Tile == 0,
                  "[{}] {} must be act_quant's grouped transposed copy [rows, 128·T], got {}", kOp, name,
                  t->describe());
    check_dtype(*t, DType::kF8E4M3, kOp, name);
  }
  Fp8GroupedWgradDims d{.m = a.c.dim(1), .n = a.c.dim(2), .groups = a.c.dim(0), .slots = a.a.dim(1) / kFp8Tile};
  DIFFMOE_CHECK(a.a.dim(0) == d.m && a.b.dim(0) == d.n && a.b.dim(1) == a.a.dim(1),
                "[{}] shapes do not match: a is {}, b is {}, c is {}; need a [M, 128·T], b [N, 128·T], c [G, M, N]",
                kOp, a.a.shape.str(), a.b.shape.str(), a.c.shape.str());
  expect(a.a_scale, Shape{d.slots, d.m}, DType::kF32, dev, kOp, "a_scale");
  expect(a.b_scale, Shape{d.slots, d.n}, DType::kF32, dev, kOp, "b_scale");
  expect(a.offsets, Shape{d.groups + 1}, DType::kI32, dev, kOp, "offsets");
  if (a.sum_sq.defined()) expect(a.sum_sq, Shape{1}, a.c.dtype, dev, kOp, "sum_sq");
  return d;
}

}  // namespace diffmoe
