// Shared test helpers: owned host tensors, seeded random fills, the finite-difference gradient
// check every op test uses (docs/style.md habit 5, numerics policy) and checks of diffmoe::Error messages.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace diffmoe::test {

// A path in the repository, from the fixtures folder the tests are given (DIFFMOE_FIXTURES, set by
// tests/CMakeLists.txt to <repo>/tests/fixtures; else relative to the repository root).
inline std::string repo_path(const std::string& rel) {
  const char* f = std::getenv("DIFFMOE_FIXTURES");
  const std::filesystem::path fixtures = f ? f : "tests/fixtures";
  return (fixtures.parent_path().parent_path() / rel).string();
}

// A host tensor that owns its (zeroed, 256-aligned) memory.
class Owned {
 public:
  Owned() = default;
  Owned(Shape shape, DType dtype) {
    arena_ = std::make_unique<Arena>();
    arena_->add("t", shape, dtype);
    arena_->allocate(cpu_allocator());
    t_ = arena_->get("t");
  }
  const Tensor& t() const { return t_; }
  operator const Tensor&() const { return t_; }  // NOLINT: pass straight into op args
  template <class T>
  T* ptr() const {
    return t_.ptr<T>();
  }
  template <class T>
  T& at(int64_t i) const {
    return t_.ptr<T>()[i];
  }
  int64_t numel() const { return t_.numel(); }

 private:
  std::unique_ptr<Arena> arena_;
  Tensor t_;
};

// Fills a float tensor (f32, f64, bf16 or e4m3) with mean + std·N(0,1), keyed by seed (never all zeros).
inline void fill_normal(const Tensor& t, uint64_t seed, double std = 1.0, double mean = 0.0) {
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = mean + std * normal_at(seed, 0x7e57, static_cast<uint64_t>(i));
    switch (t.dtype) {  // storage dtypes hold the value rounded to nearest even, as the device's conversions
      case DType::kF64: t.ptr<double>()[i] = v; break;
      case DType::kBF16: static_cast<uint16_t*>(t.data)[i] = f32_to_bf16(static_cast<float>(v)); break;
      case DType::kF8E4M3: static_cast<uint8_t*>(t.data)[i] = f32_to_e4m3(static_cast<float>(v)); break;
      default: t.ptr<float>()[i] = static_cast<float>(v); break;
    }
  }
}

// Fills an i32 tensor with uniform integers in [lo, hi).
inline void fill_int(const Tensor& t, uint64_t seed, int32_t lo, int32_t hi) {
  for (int64_t i = 0; i < t.numel(); ++i)
    t.ptr<int32_t>()[i] =
        lo + static_cast<int32_t>(uniform_at(seed, 0x1d, static_cast<uint64_t>(i)) * (hi - lo - 1e-9));
}

inline double get(const Tensor& t, int64_t i) {
  return t.dtype == DType::kF64 ? t.ptr<double>()[i] : static_cast<double>(t.ptr<float>()[i]);
}
inline void set(const Tensor& t, int64_t i, double v) {
  if (t.dtype == DType::kF64) t.ptr<double>()[i] = v;
  else t.ptr<float>()[i] = static_cast<float>(v);
}

// Σ_i out_i · proj_i : the scalar whose gradient w.r.t. `out` is `proj`.
inline double dot(const Tensor& out, const Tensor& proj) {
  double s = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) s += get(out, i) * get(proj, i);
  return s;
}

// Norm-wise relative error ‖a − b‖ / max(‖a‖, ‖b‖, tiny) over all elements.
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0.0, na = 0.0, nb = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return std::sqrt(diff) / std::max({std::sqrt(na), std::sqrt(nb), 1e-300});
}

// dst = src elementwise (a local loop, so tests that use it depend on no op of the backend).
inline void copy_values(const Tensor& dst, const Tensor& src) {
  for (int64_t i = 0; i < src.numel(); ++i) set(dst, i, get(src, i));
}

inline std::vector<double> to_vector(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = get(t, i);
  return v;
}

// Central finite differences of `loss()` w.r.t. every element of `x` (an f64 tensor), with step h.
// `loss` recomputes the forward from the current contents of x. Returns the numerical gradient.
inline std::vector<double> numerical_grad(const Tensor& x, const std::function<double()>& loss, double h = 1e-6) {
  std::vector<double> g(static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double x0 = get(x, i);
    set(x, i, x0 + h);
    const double lp = loss();
    set(x, i, x0 - h);
    const double lm = loss();
    set(x, i, x0);
    g[static_cast<size_t>(i)] = (lp - lm) / (2.0 * h);
  }
  return g;
}

// The FP64 gradient-check tolerance of the numerics policy (docs/style.md): relative error ≤ 1e-6.
// Central differences with h = 1e-6 have truncation error O(h²·f''') ≈ 1e-12 relative and rounding
// error O(ε/h) ≈ 1e-10 relative, so 1e-6 leaves four orders of margin while still catching any
// wrong term (a missing term is O(1) relative).
constexpr double kGradTol = 1e-6;

// Checks a finite-difference gradient and prints the measured error (for the record); the
// tolerance is kGradTol.
inline void expect_grad(const std::string& what, const std::vector<double>& analytic,
                        const std::vector<double>& numeric) {
  const double err = rel_error(analytic, numeric);
  std::printf("[fd] %-28s rel_error = %.3e\n", what.c_str(), err);
  EXPECT_LE(err, kGradTol) << what;
}

// Runs fn and expects a diffmoe::Error whose message contains every one of `parts` (usually the
// op's name first); a single needle is written {"[op] ..."}.
inline void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
    return;
  }
  std::string wanted;
  for (const auto& p : parts) wanted += " '" + p + "'";
  ADD_FAILURE() << "expected a diffmoe::Error mentioning" << wanted;
}

// The message of the diffmoe::Error thrown by `f`, or a failure (and "") if nothing was thrown.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected diffmoe::Error";
  return {};
}

}  // namespace diffmoe::test
