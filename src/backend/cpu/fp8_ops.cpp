// The FP8 ops of the CPU reference backend (op_args.h's FP8 section; docs/model.md §7, docs/derivations.md §6): the
// quantisers written as the rule reads, one tile at a time with core/dtype.h's scalar conversions
// (which the CUDA kernels match bit for bit), and fp8_gemm as the exact dequantised product.
//
// fp8_gemm's arithmetic: every q·s is exact in f64 (a 4-bit e4m3 significand times a 24-bit f32 one),
// the dequantised operands are multiplied by OpenBLAS's dgemm (f64 products and sums), alpha and
// beta·addend are applied in f64, and the result is rounded once into C (through f32 for bf16, as
// every narrowing of this backend does). Its error against the exact product is at most
// K·2^-53·Σ_k|a_k·b_k| before that final rounding.
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// A value of an f32 or bf16 source, as f32 (bf16 widens exactly).
float source_value(const Tensor& t, int64_t i) {
  return t.dtype == DType::kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(t.data)[i])
                                 : static_cast<const float*>(t.data)[i];
}

// One tile of `count` values get(i): amax = max|x| (fmax: NaNs are skipped, as the GPU's fmaxf
// does), s = e4m3_scale(amax), put(i, e4m3(x_i · r)) with r = e4m3_inverse_scale(s) and the f32 product. Returns s.
template <class Get, class Put>
float quantise_tile(int64_t count, bool ue8m0, Get&& get, Put&& put) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::fmax(amax, std::fabs(get(i)));
  const float s = e4m3_scale(amax, ue8m0), r = e4m3_inverse_scale(s);
  for (int64_t i = 0; i < count; ++i) put(i, f32_to_e4m3(get(i) * r));
  return s;
}

uint8_t* codes(const Tensor& t) { return static_cast<uint8_t*>(t.data); }
const uint8_t* codes_of(const Tensor& t) { return static_cast<const uint8_t*>(t.data); }

// Stores a value computed in f64 into a float output (f32, f64, or bf16 through f32).
void store_float(const Tensor& t, int64_t i, double v) {
  switch (t.dtype) {
    case DType::kF64: static_cast<double*>(t.data)[i] = v; break;
    case DType::kBF16: static_cast<uint16_t*>(t.data)[i] = f32_to_bf16(static_cast<float>(v)); break;
    default: static_cast<float*>(t.data)[i] = static_cast<float>(v); break;
  }
}
double load_float(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case DType::kF64: return static_cast<const double*>(t.data)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    default: return static_cast<const float*>(t.data)[i];
  }
}

// The dequantised operand of an exact product: out[i·k + kk] = e4m3(q[i·ld + kk]) · scale(i, kk) for i < rows,
// kk < k, exact in f64 (a 4-bit e4m3 significand times a 24-bit f32 one).
template <class Scale>
std::vector<double> dequantised(const uint8_t* q, int64_t rows, int64_t k, int64_t ld, Scale&& scale) {
  std::vector<double> out(static_cast<size_t>(rows * k));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t kk = 0; kk < k; ++kk)
      out[static_cast<size_t>(i * k + kk)] = static_cast<double>(e4m3_to_f32(q[i * ld + kk])) * scale(i, kk);
  return out;
}

// c[m, n] = alpha·Â·B̂ᵀ + beta·c (row stride ldc) with f64 products and sums (OpenBLAS dgemm); Â [m, k], B̂ [n, k]
// from dequantised. Dimensions within the BLAS integer range (the callers check).
void product_nt(const double* a_hat, const double* b_hat, int64_t m, int64_t n, int64_t k, double alpha, double beta,
                double* c, int64_t ldc) {
  if (k == 0 || m == 0 || n == 0) return;
  const auto i = [](int64_t v) { return static_cast<blasint>(v); };
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i(m), i(n), i(k), alpha, a_hat, i(k), b_hat, i(k), beta, c,
              i(ldc));
}

}  // namespace

// Row-wise copy: the tiles x[m, 128·kb ...] → q[m, ...], scale[kb, m]. Transposed copy: the tiles
// x[128·mb ..., k] → q_t[k, 128·mb ...], scale_t[mb, k]. Both from x.
// Grouped (offsets): the transposed copy's tiles restart at each group's first row, slot by slot,
// each padded with zero codes to 128 (op_args.h); the row-wise copy, if asked for, of rows < offsets[G].
void CpuBackend::act_quant(Context, const ActQuantArgs& a) {
  const Fp8QuantDims d = validate_act_quant(a, Device::kCPU);
  const int64_t m_rows = d.rows, k_cols = d.cols;
  const Tensor& x = a.x;
  const auto row_wise = [&](int64_t rows) {
    float* scale = a.scale.ptr<float>();
    uint8_t* q = codes(a.q);
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t kb = 0; kb < fp8_tiles(k_cols); ++kb) {
        const int64_t k0 = kb * kFp8Tile, count = std::min(kFp8Tile, k_cols - k0);
        scale[kb * m_rows + m] = quantise_tile(
            count, a.ue8m0, [&](int64_t i) { return source_value(x, m * k_cols + k0 + i); },
            [&](int64_t i, uint8_t c) { q[m * k_cols + k0 + i] = c; });
      }
  };
  // x[r0 …, k] (count rows) as one 128×1 tile into dst[0 …); returns its scale.
  const auto column_tile = [&](int64_t r0, int64_t count, int64_t k, uint8_t* dst) {
    return quantise_tile(
        count, a.ue8m0, [&](int64_t i) { return source_value(x, (r0 + i) * k_cols + k); },
        [&](int64_t i, uint8_t c) { dst[i] = c; });
  };
  if (d.grouped) {
    const std::vector<int64_t> off = check_group_offsets(a.offsets.ptr<int32_t>(), d.groups, m_rows, "act_quant");
    const int64_t width = a.q_t.dim(1);  // 128 · slots
    float* scale_t = a.scale_t.ptr<float>();
    uint8_t* q_t = codes(a.q_t);
    int64_t slot = 0;
    for (int64_t g = 0; g < d.groups; ++g)
      for (int64_t r0 = off[static_cast<size_t>(g)]; r0 < off[static_cast<size_t>(g) + 1]; r0 += kFp8Tile, ++slot) {
        const int64_t count = std::min(kFp8Tile, off[static_cast<size_t>(g) + 1] - r0);
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < k_cols; ++k) {
          uint8_t* dst = q_t + k * width + slot * kFp8Tile;
          scale_t[slot * k_cols + k] = column_tile(r0, count, k, dst);
          std::memset(dst + count, 0, static_cast<size_t>(kFp8Tile - count));  // past the group's last row
        }
      }
    if (d.row_wise) row_wise(off.back());
    return;
  }
  if (d.row_wise) row_wise(m_rows);
  if (d.col_wise) {
    float* scale_t = a.scale_t.ptr<float>();
    uint8_t* q_t = codes(a.q_t);
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < k_cols; ++k)
      for (int64_t mb = 0; mb < fp8_tiles(m_rows); ++mb) {
        const int64_t m0 = mb * kFp8Tile, count = std::min(kFp8Tile, m_rows - m0);
        scale_t[mb * k_cols + k] = column_tile(m0, count, k, q_t + k * m_rows + m0);
      }
  }
}

// One scale per 128×128 block of w [N, K]; q and q_t hold the same codes, scale and scale_t the
// same scales transposed; the scale rows' padding (op_args.h) is written 0. A stack [G, N, K]: each
// matrix on its own, at its offsets in every tensor.
void CpuBackend::weight_quant(Context, const WeightQuantArgs& a) {
  const Fp8QuantDims d = validate_weight_quant(a, Device::kCPU);
  const int64_t n_rows = d.rows, k_cols = d.cols;
  const int64_t n_blocks = fp8_tiles(n_rows), k_blocks = fp8_tiles(k_cols);
  const int64_t scale_ld = fp8_block_scale_cols(k_cols), scale_t_ld = fp8_block_scale_cols(n_rows);
  if (d.row_wise) std::memset(a.scale.data, 0, a.scale.nbytes());
  if (d.col_wise) std::memset(a.scale_t.data, 0, a.scale_t.nbytes());
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t w0 = g * n_rows * k_cols;  // the matrix's first element in w, q and q_t
    float* scale = d.row_wise ? a.scale.ptr<float>() + g * n_blocks * scale_ld : nullptr;
    float* scale_t = d.col_wise ? a.scale_t.ptr<float>() + g * k_blocks * scale_t_ld : nullptr;
    uint8_t* q = d.row_wise ? codes(a.q) + w0 : nullptr;
    uint8_t* q_t = d.col_wise ? codes(a.q_t) + w0 : nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n_blocks; ++nb)
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int64_t n0 = nb * kFp8Tile, k0 = kb * kFp8Tile;
        const int64_t rows = std::min(kFp8Tile, n_rows - n0), cols = std::min(kFp8Tile, k_cols - k0);
        // The block read row by row as one tile of rows·cols values: i → (n0 + i / cols, k0 + i % cols).
        const float s = quantise_tile(
            rows * cols, a.ue8m0,
            [&](int64_t i) {
              const float v = source_value(a.w, w0 + (n0 + i / cols) * k_cols + k0 + i % cols);
              return a.bf16_source ? bf16_to_f32(f32_to_bf16(v)) : v;
            },
            [&](int64_t i, uint8_t c) {
              const int64_t n = n0 + i / cols, k = k0 + i % cols;
              if (q != nullptr) q[n * k_cols + k] = c;
              if (q_t != nullptr) q_t[k * n_rows + n] = c;
            });
        if (scale != nullptr) scale[nb * scale_ld + kb] = s;
        if (scale_t != nullptr) scale_t[kb * scale_t_ld + nb] = s;
      }
  }
}

// w = q · scale: one f32 product per element (exact in f64 for an f64 w).
void CpuBackend::weight_dequant(Context, const WeightDequantArgs& a) {
  const Fp8QuantDims d = validate_weight_dequant(a, Device::kCPU);
  const int64_t scale_ld = fp8_block_scale_cols(d.cols);
  const float* scale = a.scale.ptr<float>();
  const uint8_t* q = codes_of(a.q);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < d.rows; ++n)
    for (int64_t k = 0; k < d.cols; ++k) {
      const int64_t i = n * d.cols + k;
      const float s = scale[(n / kFp8Tile) * scale_ld + k / kFp8Tile];
      const float v = e4m3_to_f32(q[i]);
      if (a.w.dtype == DType::kF64) {
        static_cast<double*>(a.w.data)[i] = static_cast<double>(v) * static_cast<double>(s);
      } else {
        store_float(a.w, i, v * s);  // the f32 product, then (bf16) rounded once more
      }
    }
}

// C = alpha·Â·B̂ᵀ + beta·addend in f64 (the file comment), Â, B̂ dequantised exactly.
void CpuBackend::fp8_gemm(Context, const Fp8GemmArgs& a) {
  constexpr std::string_view kOp = "fp8_gemm";
  const auto [m, n, k] = validate_fp8_gemm(a, Device::kCPU);
  if (m == 0 || n == 0) return;
  for (int64_t v : {m, n, k}) DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the BLAS integer range", kOp, v);
  // Â[i, kk] = A[i, kk] · a_scale[kk/128, i]; B̂[j, kk] = B[j, kk] · (its block's or tile's scale).
  const float* sa = a.a_scale.ptr<float>();
  const float* sb = a.b_scale.ptr<float>();
  const bool b_blocks = a.b_scaling == Fp8Scaling::kBlock128x128;
  const int64_t b_block_ld = fp8_block_scale_cols(k);
  const std::vector<double> a_hat =
      dequantised(codes_of(a.a), m, k, k, [&](int64_t i, int64_t kk) { return sa[(kk / kFp8Tile) * m + i]; });
  const std::vector<double> b_hat = dequantised(codes_of(a.b), n, k, k, [&](int64_t j, int64_t kk) {
    return b_blocks ? sb[(j / kFp8Tile) * b_block_ld + kk / kFp8Tile] : sb[(kk / kFp8Tile) * n + j];
  });
  std::vector<double> prod(static_cast<size_t>(m * n), 0.0);
  product_nt(a_hat.data(), b_hat.data(), m, n, k, a.alpha, 0.0, prod.data(), n);
  // beta·addend (C itself when no addend is given), not read when beta = 0 (BLAS rule).
  const Tensor& addend = a.addend.defined() ? a.addend : a.c;
  for (int64_t idx = 0; idx < m * n; ++idx) {
    const double add = a.beta == 0.0 ? 0.0 : a.beta * load_float(addend, idx);
    store_float(a.c, idx, prod[static_cast<size_t>(idx)] + add);
  }
}

// Each group's rows as fp8_gemm computes them: Â[rows_g]·B̂[g]ᵀ (+ Â2[rows_g]·B̂2[g]ᵀ) with f64
// products and sums, rounded once into C.
void CpuBackend::fp8_grouped_gemm(Context, const Fp8GroupedGemmArgs& a) {
  constexpr std::string_view kOp = "fp8_grouped_gemm";
  const Fp8GroupedGemmDims d = validate_fp8_grouped_gemm(a, Device::kCPU);
  const std::vector<int64_t> off = check_group_offsets(a.offsets.ptr<int32_t>(), d.groups, d.rows, kOp);
  for (int64_t v : {d.rows, d.n, d.k, d.k2})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the BLAS integer range", kOp, v);
  const int64_t used = off[static_cast<size_t>(d.groups)];
  std::vector<double> prod(static_cast<size_t>(used * d.n), 0.0);
  // prod[rows_g] += Â[rows_g]·B̂[g]ᵀ for every group, of one term (a, a_scale [ceil(k/128), R], b, b_scale).
  const auto add_term = [&](const Tensor& ta, const Tensor& ta_scale, const Tensor& tb, const Tensor& tb_scale,
                            int64_t k) {
    if (k == 0 || used == 0) return;
    const float* sa = ta_scale.ptr<float>();
    const std::vector<double> a_hat =
        dequantised(codes_of(ta), used, k, k, [&](int64_t i, int64_t kk) { return sa[(kk / kFp8Tile) * d.rows + i]; });
    const int64_t b_ld = fp8_block_scale_cols(k), b_blocks = fp8_tiles(d.n) * b_ld;
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g) + 1];
      if (r1 == r0) continue;
      const float* sb = tb_scale.ptr<float>() + g * b_blocks;
      const std::vector<double> b_hat = dequantised(codes_of(tb) + g * d.n * k, d.n, k, k, [&](int64_t j, int64_t kk) {
        return sb[(j / kFp8Tile) * b_ld + kk / kFp8Tile];
      });
      product_nt(a_hat.data() + r0 * k, b_hat.data(), r1 - r0, d.n, k, 1.0, 1.0, prod.data() + r0 * d.n, d.n);
    }
  };
  add_term(a.a, a.a_scale, a.b, a.b_scale, d.k);
  if (d.two_terms) add_term(a.a2, a.a2_scale, a.b2, a.b2_scale, d.k2);
  for (int64_t idx = 0; idx < used * d.n; ++idx) store_float(a.c, idx, prod[static_cast<size_t>(idx)]);
}

// Each group's C[g] = Â_g·B̂_gᵀ over its tile slots (f64 products and sums) + beta·C[g], rounded once.
void CpuBackend::fp8_grouped_gemm_wgrad(Context ctx, const Fp8GroupedGemmWgradArgs& a) {
  constexpr std::string_view kOp = "fp8_grouped_gemm_wgrad";
  const Fp8GroupedWgradDims d = validate_fp8_grouped_gemm_wgrad(a, Device::kCPU);
  const int64_t rows = a.offsets.ptr<int32_t>()[d.groups];
  const std::vector<int64_t> off =
      check_group_offsets(a.offsets.ptr<int32_t>(), d.groups, std::max<int64_t>(rows, 0), kOp);
  for (int64_t v : {d.m, d.n, d.slots * kFp8Tile})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the BLAS integer range", kOp, v);
  const int64_t width = d.slots * kFp8Tile, mn = d.m * d.n;
  const float* sa = a.a_scale.ptr<float>();
  const float* sb = a.b_scale.ptr<float>();
  const uint8_t* qa = codes_of(a.a);
  const uint8_t* qb = codes_of(a.b);
  int64_t slot = 0;
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t tiles = fp8_tiles(off[static_cast<size_t>(g) + 1] - off[static_cast<size_t>(g)]);
    DIFFMOE_CHECK(slot + tiles <= d.slots, "[{}] group {} needs tile slots up to {}, the copies have {}", kOp, g,
                  slot + tiles, d.slots);
    const int64_t kk_n = tiles * kFp8Tile, c0 = slot * kFp8Tile;  // the group's columns of A and B
    std::vector<double> prod(static_cast<size_t>(mn), 0.0);
    if (tiles > 0) {
      // Each operand's values at the group's columns, each with its own tile's scale (per row i).
      const auto operand = [&](const uint8_t* q, const float* s, int64_t outer) {
        return dequantised(q + c0, outer, kk_n, width,
                           [&](int64_t i, int64_t kk) { return s[(slot + kk / kFp8Tile) * outer + i]; });
      };
      product_nt(operand(qa, sa, d.m).data(), operand(qb, sb, d.n).data(), d.m, d.n, kk_n, 1.0, 0.0, prod.data(), d.n);
    }
    for (int64_t idx = 0; idx < mn; ++idx) {
      const double old = a.beta == 0.0 ? 0.0 : a.beta * load_float(a.c, g * mn + idx);  // not read when beta = 0
      store_float(a.c, g * mn + idx, prod[static_cast<size_t>(idx)] + old);
    }
    slot += tiles;
  }
  if (a.sum_sq.defined()) sum_squares(ctx, {.out = a.sum_sq, .x = a.c});  // Σ C² of the values just written
}

}  // namespace diffmoe
