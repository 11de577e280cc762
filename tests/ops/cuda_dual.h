// Harness of the CUDA-vs-CPU op checks (tests/ops/cuda_vs_cpu*.cpp; docs/style.md habit 5, numerics
// policy): a Dual is one tensor on both backends, the CPU's copy in host memory and the CUDA's in
// device memory followed by guard bytes. Inputs are filled on the host and uploaded, so both ops
// see the same values; outputs an op overwrites are poisoned (NaN, or a sentinel integer) on both
// sides first; then each op runs on its own copy and the results are compared element-wise with a
// per-op tolerance |cuda − cpu| ≤ atol + rtol·|cpu|, NaN never passing, and the guard bytes after
// every device tensor are checked untouched.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend_registry.h"
#include "cuda_test_util.h"
#include "test_util.h"

namespace diffmoe::cudatest {

// The two backends, created once. gpu() throws (naming why) when no CUDA device is usable: tests
// call DIFFMOE_REQUIRE_CUDA() before anything reaches it.
inline Backend& cpu() {
  static std::unique_ptr<Backend> be = make_backend("cpu");
  return *be;
}
inline Backend& gpu() {
  static std::unique_ptr<Backend> be = make_backend("cuda");
  return *be;
}

enum class Side { kCpu, kGpu };

// Both backends in the bf16 GEMM mode for the scope, back to f32 after (also when a check fails):
// the CPU implements the mode (cpu/bf16_staging.h), so a bf16-mode op runs the same call on both
// sides and the CUDA result is compared with the CPU's bf16 result.
class Bf16Mode {
 public:
  Bf16Mode() {
    cpu().set_gemm_precision(GemmPrecision::kBF16);
    gpu().set_gemm_precision(GemmPrecision::kBF16);
  }
  ~Bf16Mode() {
    cpu().set_gemm_precision(GemmPrecision::kF32);
    gpu().set_gemm_precision(GemmPrecision::kF32);
  }
  Bf16Mode(const Bf16Mode&) = delete;
  Bf16Mode& operator=(const Bf16Mode&) = delete;
};

class Dual {
 public:
  static constexpr int64_t kGuard = 64;          // elements after every device tensor
  static constexpr uint8_t kGuardByte = 0xA5;    // their bytes
  static constexpr int32_t kIntPoison = -77777;  // what an overwritten i32 output starts as

  explicit Dual(Shape shape, DType dtype = DType::kF32) : dtype_(dtype) {
    host_.add("t", shape, dtype);
    host_.allocate(cpu_allocator());
    dev_.add("t", Shape{shape.numel() + kGuard}, dtype);
    dev_.allocate(gpu().allocator());
    cpu_ = host_.get("t");
    gpu_ = dev_.get("t");
    gpu_.shape = shape;
    std::vector<uint8_t> guard(static_cast<size_t>(kGuard) * dtype_size(dtype), kGuardByte);
    gpu().upload(guard_view(), guard.data());
  }

  const Tensor& operator[](Side s) const { return s == Side::kCpu ? cpu_ : gpu_; }
  const Tensor& host() const { return cpu_; }
  int64_t numel() const { return cpu_.numel(); }

  // Host values → device (the guard stays).
  void to_gpu() const { gpu().upload(gpu_, cpu_.data); }
  // mean + std·N(0,1) keyed by seed on both sides.
  Dual& normal(uint64_t seed, double std = 1.0, double mean = 0.0) {
    test::fill_normal(cpu_, seed, std, mean);
    to_gpu();
    return *this;
  }
  // Uniform integers in [lo, hi) on both sides (i32 tensors).
  Dual& ints(uint64_t seed, int32_t lo, int32_t hi) {
    test::fill_int(cpu_, seed, lo, hi);
    to_gpu();
    return *this;
  }
  Dual& set(const std::vector<double>& v) {
    EXPECT_EQ(static_cast<int64_t>(v.size()), numel());
    for (int64_t i = 0; i < numel(); ++i) set_host(i, v[static_cast<size_t>(i)]);
    to_gpu();
    return *this;
  }
  // What an overwritten output starts as: NaN (floats) or kIntPoison (i32), on both sides.
  Dual& poison() {
    for (int64_t i = 0; i < numel(); ++i)
      set_host(i, dtype_ == DType::kI32 ? static_cast<double>(kIntPoison) : std::numeric_limits<double>::quiet_NaN());
    to_gpu();
    return *this;
  }

  std::vector<double> host_values() const { return values(cpu_.data); }
  std::vector<double> device_values() const {
    std::vector<uint8_t> raw(cpu_.nbytes());
    gpu().download(raw.data(), gpu_);
    return values(raw.data());
  }
  bool guard_intact() const {
    std::vector<uint8_t> raw(static_cast<size_t>(kGuard) * dtype_size(dtype_));
    gpu().download(raw.data(), guard_view());
    for (uint8_t b : raw)
      if (b != kGuardByte) return false;
    return true;
  }

 private:
  Tensor guard_view() const {
    Tensor g = dev_.get("t");
    g.data = static_cast<char*>(g.data) + cpu_.nbytes();
    g.shape = Shape{kGuard};
    return g;
  }
  void set_host(int64_t i, double v) const {
    switch (dtype_) {
      case DType::kF32: cpu_.ptr<float>()[i] = static_cast<float>(v); break;
      case DType::kF64: cpu_.ptr<double>()[i] = v; break;
      case DType::kI32: cpu_.ptr<int32_t>()[i] = static_cast<int32_t>(v); break;
      case DType::kI64: cpu_.ptr<int64_t>()[i] = static_cast<int64_t>(v); break;
      case DType::kBF16: static_cast<uint16_t*>(cpu_.data)[i] = f32_to_bf16(static_cast<float>(v)); break;
      case DType::kF8E4M3: static_cast<uint8_t*>(cpu_.data)[i] = f32_to_e4m3(static_cast<float>(v)); break;
      default: FAIL() << "Dual: unsupported dtype";
    }
  }
  std::vector<double> values(const void* p) const {
    std::vector<double> v(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) {
      double x = 0.0;
      switch (dtype_) {
        case DType::kF32: x = static_cast<const float*>(p)[i]; break;
        case DType::kF64: x = static_cast<const double*>(p)[i]; break;
        case DType::kI32: x = static_cast<const int32_t*>(p)[i]; break;
        case DType::kI64: x = static_cast<double>(static_cast<const int64_t*>(p)[i]); break;
        case DType::kBF16: x = bf16_to_f32(static_cast<const uint16_t*>(p)[i]); break;
        case DType::kF8E4M3: x = e4m3_to_f32(static_cast<const uint8_t*>(p)[i]); break;
        default: break;
      }
      v[static_cast<size_t>(i)] = x;
    }
    return v;
  }

  DType dtype_;
  Arena host_, dev_;
  Tensor cpu_, gpu_;
};

// The view of d's side s that starts `offset` elements in, with `shape` (d holds at least
// offset + shape.numel() elements): an unaligned tensor for the kernels' scalar paths (a kernel that
// takes 16-byte accesses checks alignment and falls back). The elements before it stay as filled.
inline Tensor offset_view(const Dual& d, Side s, const Shape& shape, int64_t offset) {
  Tensor t = d[s];
  EXPECT_LE(offset + shape.numel(), d.numel());
  t.data = static_cast<char*>(t.data) + offset * static_cast<int64_t>(dtype_size(t.dtype));
  t.shape = shape;
  return t;
}

// d's values rounded to bf16 once (nearest even, on the host: the device's rounding), as the bf16
// GEMM mode's weight copies and saved activations are: the GPU side of an op reads this bf16 tensor
// where the CPU reads the f32 original. With offset > 0 the values start `offset` elements in (after
// zeros; read them through offset_view), so a view can start off a 16-byte boundary.
inline Dual bf16_copy(const Dual& d, const Shape& shape, int64_t offset = 0) {
  Dual r(offset == 0 ? shape : Shape{offset + shape.numel()}, DType::kBF16);
  std::vector<double> v(static_cast<size_t>(offset), 0.0);
  const std::vector<double> values = d.host_values();
  v.insert(v.end(), values.begin(), values.end());
  r.set(v);
  return r;
}

// Runs op(backend, side) on the CPU and on the GPU, then synchronizes the GPU (which also reports
// the device-side index checks).
inline void run_both(const std::function<void(Backend&, Side)>& op) {
  op(cpu(), Side::kCpu);
  op(gpu(), Side::kGpu);
  gpu().synchronize({});
}

// A tolerance and the reason for it (the numerics policy: no tolerance tuned by eye).
struct Tol {
  double rtol = 0.0, atol = 0.0;
  const char* why = "";
};

// Bitwise-equal values (after conversion to double, so NaN never passes): integer outputs and ops
// whose GPU arithmetic is the CPU's.
constexpr Tol kExact{0.0, 0.0, "same arithmetic on both sides"};

// |cuda − cpu| ≤ atol + rtol·|cpu| for every element; prints the worst element for the record.
inline void expect_close(const Dual& d, const Tol& tol, const std::string& what) {
  const std::vector<double> got = d.device_values(), want = d.host_values();
  int64_t bad = 0, worst_i = -1;
  double worst_excess = -1.0, max_abs = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = want[i], diff = std::fabs(a - b);
    const bool ok = !std::isnan(a) && !std::isnan(b) && diff <= tol.atol + tol.rtol * std::fabs(b);
    if (!std::isnan(diff)) max_abs = std::max(max_abs, diff);
    const double excess =
        std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff - tol.atol - tol.rtol * std::fabs(b);
    if (!ok) ++bad;
    if (excess > worst_excess || worst_i < 0) {
      worst_excess = excess;
      worst_i = static_cast<int64_t>(i);
    }
  }
  std::printf("[cuda-vs-cpu] %-44s n=%-7zu max|diff| %.3e  (rtol %.0e, atol %.0e: %s)\n", what.c_str(), got.size(),
              max_abs, tol.rtol, tol.atol, tol.why);
  if (worst_i >= 0) {
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements out of tolerance; worst at "
                      << worst_i << ": cuda " << got[static_cast<size_t>(worst_i)] << ", cpu "
                      << want[static_cast<size_t>(worst_i)];
  }
  EXPECT_TRUE(d.guard_intact()) << what << ": the guard bytes after the device tensor were overwritten";
}

// A bf16 output against the CPU's f32 result: each device value is the CPU value rounded to bf16, to
// within one bf16 step (the CUDA f32 value before the rounding can differ from the CPU's in the last
// f32 bits, which can move a tie); guard bytes intact. Outputs the bf16 GEMM mode plans in bf16
// (element-wise ops' outputs that only GEMMs read, a GEMM's bf16 output).
inline void expect_bf16_of(const Dual& got16, const Dual& ref32, const std::string& what) {
  const std::vector<double> got = got16.device_values(), ref = ref32.host_values();
  ASSERT_EQ(got.size(), ref.size());
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double want = bf16_to_f32(f32_to_bf16(static_cast<float>(ref[i])));
    // One bf16 step at want: 2^(e − 7) for |want| in [2^e, 2^(e+1)) (8 significant bits).
    const double step = want == 0.0 ? 1e-30 : std::ldexp(1.0, std::ilogb(want) - 7);
    if (!(std::fabs(got[i] - want) <= step)) ++bad;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements are not the f32 result in bf16";
  EXPECT_TRUE(got16.guard_intact()) << what;
}

// One bf16 step (unit in the last place) at |v|: 2^(e − 7) for |v| in [2^e, 2^(e+1)).
inline double bf16_step(double v) { return v == 0.0 ? 0.0 : std::ldexp(1.0, std::ilogb(v) - 7); }

// A bf16 output against the CPU's bf16 output of the same call: the two f32 results before the
// rounding agree within `tol` (the op's f32 tolerance, its reason in tol.why; kExact where the
// arithmetic is the same), and each side rounds once to nearest, so the bf16 values may differ by
// that plus one bf16 step (two results on either side of a rounding boundary). NaN never passes;
// guard bytes intact.
inline void expect_bf16_close(const Dual& d16, const Tol& tol, const std::string& what) {
  const std::vector<double> got = d16.device_values(), want = d16.host_values();
  int64_t bad = 0, worst_i = -1, differ = 0;
  double worst_excess = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = want[i], diff = std::fabs(a - b);
    const double allowed = tol.atol + tol.rtol * std::fabs(b) + bf16_step(std::max(std::fabs(a), std::fabs(b)));
    differ += diff != 0.0 ? 1 : 0;
    const double excess = std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff - allowed;
    if (!(diff <= allowed)) ++bad;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst_i = static_cast<int64_t>(i);
    }
  }
  std::printf("[cuda-vs-cpu] %-44s n=%-7zu bf16: %lld differ (allowed: one bf16 step + rtol %.0e, atol %.0e: %s)\n",
              what.c_str(), got.size(), static_cast<long long>(differ), tol.rtol, tol.atol, tol.why);
  if (worst_i >= 0) {
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " bf16 elements out of tolerance; worst at "
                      << worst_i << ": cuda " << got[static_cast<size_t>(worst_i)] << ", cpu "
                      << want[static_cast<size_t>(worst_i)];
  }
  EXPECT_TRUE(d16.guard_intact()) << what << ": the guard bytes after the device tensor were overwritten";
}

// Runs fn and expects a diffmoe::Error whose message contains every part.
inline void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

}  // namespace diffmoe::cudatest
