// Basic tensor ops and the token embedding (docs/model.md §1) of the CPU reference backend.
//
// Numerics: element-wise ops compute in double and round to the tensor's type once. Reductions
// (sum_squares, the embedding's dtable) accumulate in double in a fixed order that does not depend
// on the number of OpenMP threads, so results are bitwise reproducible. Index tensors are checked
// serially before any parallel loop: an exception must never leave an OpenMP region.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;
// Element access for the storage types copy() converts between. Every value passes through
// double, which holds f32, bf16 and e4m3 values exactly; narrowing from f64 to bf16/e4m3 rounds
// through f32 first (the shared scalar converters in core/dtype.h take f32).
struct F32Io {
  static double load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static void store(void* p, int64_t i, double v) { static_cast<float*>(p)[i] = static_cast<float>(v); }
};
struct F64Io {
  static double load(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
  static void store(void* p, int64_t i, double v) { static_cast<double*>(p)[i] = v; }
};
struct Bf16Io {
  static double load(const void* p, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }
  static void store(void* p, int64_t i, double v) { static_cast<uint16_t*>(p)[i] = f32_to_bf16(static_cast<float>(v)); }
};
struct E4m3Io {  // saturating to ±448 (dtype.h's default), the FP8 training convention
  static double load(const void* p, int64_t i) { return e4m3_to_f32(static_cast<const uint8_t*>(p)[i]); }
  static void store(void* p, int64_t i, double v) { static_cast<uint8_t*>(p)[i] = f32_to_e4m3(static_cast<float>(v)); }
};

// Calls fn(Io{}) with the accessor of a floating storage type; other types are an error.
template <class Fn>
void with_float_io(DType d, std::string_view field, Fn&& fn) {
  switch (d) {
    case DType::kF32: fn(F32Io{}); return;
    case DType::kF64: fn(F64Io{}); return;
    case DType::kBF16: fn(Bf16Io{}); return;
    case DType::kF8E4M3: fn(E4m3Io{}); return;
    default:
      DIFFMOE_FAIL(
          "[copy] {}: cannot convert dtype {} (f32, f64, bf16, f8e4m3 convert; "
          "other types copy only to the same type)",
          field, dtype_name(d));
  }
}

template <class T>
void fill_with(void* data, int64_t n, T v) {
  T* p = static_cast<T*>(data);
#pragma omp parallel for if (n >= kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

// Every token id must index a table row; reports the first bad one (row and value).
void check_tokens(const Tensor& tokens, int64_t vocab, std::string_view op) {
  const int32_t* tok = tokens.ptr<int32_t>();
  for (int64_t n = 0; n < tokens.numel(); ++n)
    DIFFMOE_CHECK(tok[n] >= 0 && tok[n] < vocab, "[{}] tokens[{}] = {} is outside the table's [0, {})", op, n, tok[n],
                  vocab);
}

}  // namespace

void CpuBackend::fill(Context, const FillArgs& a) {
  validate_fill(a, Device::kCPU);
  const int64_t n = a.out.numel();
  switch (a.out.dtype) {
    case DType::kBF16: fill_with<uint16_t>(a.out.data, n, f32_to_bf16(static_cast<float>(a.value))); return;
    case DType::kF8E4M3: fill_with<uint8_t>(a.out.data, n, f32_to_e4m3(static_cast<float>(a.value))); return;
    case DType::kI32: fill_with<int32_t>(a.out.data, n, static_cast<int32_t>(a.value)); return;  // integral: validated
    default:
      dispatch_float(a.out.dtype, "fill", [&]<class T>() { fill_with<T>(a.out.data, n, static_cast<T>(a.value)); });
  }
}

void CpuBackend::copy(Context, const CopyArgs& a) {
  validate_copy(a, Device::kCPU);
  const int64_t n = a.src.numel();
  if (a.dst.dtype == a.src.dtype) {  // any type, i32 included: a byte copy (memmove: may alias)
    if (n > 0 && a.dst.data != a.src.data) std::memmove(a.dst.data, a.src.data, a.src.nbytes());
    return;
  }
  with_float_io(a.src.dtype, "src", [&](auto src_io) {
    with_float_io(a.dst.dtype, "dst", [&](auto dst_io) {
      using Src = decltype(src_io);
      using Dst = decltype(dst_io);
#pragma omp parallel for if (n >= kParallelMinWork)
      for (int64_t i = 0; i < n; ++i) Dst::store(a.dst.data, i, Src::load(a.src.data, i));
    });
  });
}

void CpuBackend::axpy(Context, const AxpyArgs& a) {
  validate_axpy(a, Device::kCPU);
  dispatch_float(a.y.dtype, "axpy", [&]<class T>() {
    T* y = a.y.ptr<T>();
    const T* x = a.x.ptr<T>();
    const int64_t n = a.y.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(static_cast<double>(y[i]) + a.alpha * x[i]);
  });
}

void CpuBackend::scale(Context, const ScaleArgs& a) {
  validate_scale(a, Device::kCPU);
  dispatch_float(a.y.dtype, "scale", [&]<class T>() {
    T* y = a.y.ptr<T>();
    const int64_t n = a.y.numel();
#pragma omp parallel for if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(a.alpha * y[i]);
  });
}

void CpuBackend::sum_squares(Context, const SumSquaresArgs& a) {
  validate_sum_squares(a, Device::kCPU);
  dispatch_float(a.out.dtype, "sum_squares", [&]<class T>() {
    // Fixed-size chunks summed in double, then the chunk sums added in chunk order: the result
    // does not depend on the thread count (the numerics policy's bitwise resume needs that).
    constexpr int64_t kChunk = int64_t{1} << 14;
    const T* x = a.x.ptr<T>();
    const int64_t n = a.x.numel();
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
#pragma omp parallel for if (n_chunks > 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t end = std::min(n, (c + 1) * kChunk);
      double s = 0.0;
      for (int64_t i = c * kChunk; i < end; ++i) s += static_cast<double>(x[i]) * x[i];
      partial[static_cast<size_t>(c)] = s;
    }
    double total = 0.0;
    for (double p : partial) total += p;
    T* out = a.out.ptr<T>();
    out[0] = static_cast<T>(out[0] + total);
  });
}

void CpuBackend::count_nonfinite(Context, const CountNonfiniteArgs& a) {
  validate_count_nonfinite(a, Device::kCPU);
  const int64_t n = a.x.numel();
  int64_t bad = 0;
  // Integer counts: the sum does not depend on the order, so the threads may share it freely.
  with_float_io(a.x.dtype, "x", [&](auto io) {
    using Io = decltype(io);
#pragma omp parallel for reduction(+ : bad) if (n >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) bad += std::isfinite(Io::load(a.x.data, i)) ? 0 : 1;
  });
  a.count.ptr<int64_t>()[0] = bad;
}

// out[n, :] = scale · table[tokens[n], :]   (docs/model.md §1)
void CpuBackend::embedding_fwd(Context, const EmbeddingFwdArgs& a) {
  constexpr std::string_view kOp = "embedding_fwd";
  const EmbeddingDims d = validate_embedding_fwd(a, Device::kCPU);
  const int64_t n_rows = d.rows, vocab = d.vocab, dim = d.dim;
  check_tokens(a.tokens, vocab, kOp);
  dispatch_float(a.table.dtype, kOp, [&]<class T>() {
    T* out = a.out.ptr<T>();
    const T* table = a.table.ptr<T>();
    const int32_t* tok = a.tokens.ptr<int32_t>();
#pragma omp parallel for if (n_rows * dim >= kParallelMinWork)
    for (int64_t n = 0; n < n_rows; ++n) {
      const T* src = table + tok[n] * dim;
      T* dst = out + n * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(a.scale * src[d]);
    }
  });
}

// dtable[tokens[n], :] += scale · dout[n, :]   (weight gradient: accumulates)
void CpuBackend::embedding_bwd(Context, const EmbeddingBwdArgs& a) {
  constexpr std::string_view kOp = "embedding_bwd";
  const EmbeddingDims d = validate_embedding_bwd(a, Device::kCPU);
  const int64_t n_rows = d.rows, vocab = d.vocab, dim = d.dim;
  check_tokens(a.tokens, vocab, kOp);
  dispatch_float(a.dtable.dtype, kOp, [&]<class T>() {
    // Repeated token ids add into the same row, so rows cannot be split across threads without a
    // race. Threads own blocks of columns instead and walk the tokens in order: deterministic.
    constexpr int64_t kColBlock = 64;
    T* dtable = a.dtable.ptr<T>();
    const T* dout = a.dout.ptr<T>();
    const int32_t* tok = a.tokens.ptr<int32_t>();
    const int64_t n_blocks = (dim + kColBlock - 1) / kColBlock;
#pragma omp parallel for if (n_rows * dim >= kParallelMinWork)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t d0 = blk * kColBlock, d1 = std::min(dim, d0 + kColBlock);
      for (int64_t n = 0; n < n_rows; ++n) {
        T* dst = dtable + tok[n] * dim;
        const T* src = dout + n * dim;
        for (int64_t d = d0; d < d1; ++d) dst[d] = static_cast<T>(dst[d] + a.scale * src[d]);
      }
    }
  });
}

}  // namespace diffmoe
