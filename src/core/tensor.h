// Tensor views: a pointer plus shape, dtype and device. A Tensor never owns memory; arenas do
// (arena.h). Views are dense row-major; ops that read a column slice take explicit strides.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace diffmoe {

enum class Device : uint8_t { kCPU, kCUDA };
std::string_view device_name(Device d);

constexpr int kMaxDims = 5;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  int rank() const { return rank_; }
  int64_t operator[](int i) const;  // negative i counts from the back
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[2, 3]"

 private:
  std::array<int64_t, kMaxDims> dims_{};
  int rank_ = 0;
};

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::kF32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::kF64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::kI32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::kI64;
}
template <>
constexpr DType dtype_of<uint8_t>() {
  return DType::kU8;
}

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCPU;
  Shape shape;

  bool defined() const { return data != nullptr || shape.numel() == 0; }
  int rank() const { return shape.rank(); }
  int64_t dim(int i) const { return shape[i]; }
  int64_t numel() const { return shape.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }

  // Typed pointer; throws if the element type does not match.
  template <class T>
  T* ptr() const {
    DIFFMOE_CHECK(dtype == dtype_of<T>(), "[tensor] {} accessed as {}", describe(), dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }

  Tensor reshape(Shape s) const;                  // same numel, same memory
  Tensor rows(int64_t begin, int64_t end) const;  // slice along dim 0
  Tensor operator[](int64_t i) const;             // index dim 0, drops it
  std::string describe() const;                   // "f32[2, 3]@cpu"
};

// Throws "[op] name: expected shape X, got Y" unless t has exactly this shape and dtype.
void check_shape(const Tensor& t, const Shape& s, std::string_view op, std::string_view name);
void check_dtype(const Tensor& t, DType d, std::string_view op, std::string_view name);

}  // namespace diffmoe
