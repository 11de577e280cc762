#include "core/tensor.h"

#include <fmt/format.h>

namespace diffmoe {

std::string_view device_name(Device d) { return d == Device::kCPU ? "cpu" : "cuda"; }

Shape::Shape(std::initializer_list<int64_t> dims) {
  DIFFMOE_CHECK(dims.size() <= kMaxDims, "[shape] rank {} > {}", dims.size(), kMaxDims);
  for (int64_t d : dims) {
    DIFFMOE_CHECK(d >= 0, "[shape] negative dimension {}", d);
    dims_[rank_++] = d;
  }
}

int64_t Shape::operator[](int i) const {
  const int j = i < 0 ? rank_ + i : i;
  DIFFMOE_CHECK(j >= 0 && j < rank_, "[shape] dim {} out of range for {}", i, str());
  return dims_[j];
}

int64_t Shape::numel() const {
  int64_t n = 1;
  // Checked: a shape from a hostile config (dims of 2^32) must fail, not wrap to a small size.
  for (int i = 0; i < rank_; ++i)
    if (__builtin_mul_overflow(n, dims_[i], &n))
      DIFFMOE_FAIL("[tensor] shape {} has more elements than int64 holds", str());
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (rank_ != o.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < rank_; ++i) s += fmt::format("{}{}", i ? ", " : "", dims_[i]);
  return s + "]";
}

Tensor Tensor::reshape(Shape s) const {
  DIFFMOE_CHECK(s.numel() == numel(), "[tensor] cannot reshape {} to {}", describe(), s.str());
  Tensor t = *this;
  t.shape = s;
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  DIFFMOE_CHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= dim(0), "[tensor] rows({}, {}) of {}", begin, end,
                describe());
  const int64_t row = dim(0) == 0 ? 0 : numel() / dim(0);
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(begin * row) * dtype_size(dtype);
  Shape s;
  switch (rank()) {
    case 1: s = Shape{end - begin}; break;
    case 2: s = Shape{end - begin, dim(1)}; break;
    case 3: s = Shape{end - begin, dim(1), dim(2)}; break;
    case 4: s = Shape{end - begin, dim(1), dim(2), dim(3)}; break;
    default: s = Shape{end - begin, dim(1), dim(2), dim(3), dim(4)}; break;
  }
  t.shape = s;
  return t;
}

Tensor Tensor::operator[](int64_t i) const {
  DIFFMOE_CHECK(rank() >= 2, "[tensor] cannot index rank-{} {}", rank(), describe());
  Tensor t = rows(i, i + 1);
  Shape s;
  switch (rank()) {
    case 2: s = Shape{dim(1)}; break;
    case 3: s = Shape{dim(1), dim(2)}; break;
    case 4: s = Shape{dim(1), dim(2), dim(3)}; break;
    default: s = Shape{dim(1), dim(2), dim(3), dim(4)}; break;
  }
  t.shape = s;
  return t;
}

std::string Tensor::describe() const {
  return fmt::format("{}{}@{}", dtype_name(dtype), shape.str(), device_name(device));
}

void check_shape(const Tensor& t, const Shape& s, std::string_view op, std::string_view name) {
  DIFFMOE_CHECK(t.shape == s, "[{}] {}: expected shape {}, got {}", op, name, s.str(), t.shape.str());
}

void check_dtype(const Tensor& t, DType d, std::string_view op, std::string_view name) {
  DIFFMOE_CHECK(t.dtype == d, "[{}] {}: expected dtype {}, got {}", op, name, dtype_name(d), dtype_name(t.dtype));
}

}  // namespace diffmoe
