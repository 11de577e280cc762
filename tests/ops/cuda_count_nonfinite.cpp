// count_nonfinite on the GPU against the CPU reference and against the number of values planted:
// NaN, +inf and -inf at the start, in the 16-byte-vector body and in the scalar tail, in f32 and
// bf16, aligned and unaligned, and across many blocks (the per-block atomics). Counts are integers,
// so the comparison is exact.
#include <limits>

#include "ops/cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

TEST(CudaBasic, CountNonfinite) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    int64_t n;
    int64_t offset;  // elements before the view: > 0 takes the scalar (unaligned) path
    DType dtype;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  // 7: one vector and a tail (f32); 100003: 25+ blocks and a tail; 9000001: the block cap, several
  // grid-stride rounds per thread; offset 1: the unaligned path; bf16: 8 values per vector.
  for (const Case c : {Case{7, 0, DType::kF32}, Case{100003, 0, DType::kF32}, Case{9000001, 0, DType::kF32},
                       Case{100003, 1, DType::kF32}, Case{100003, 0, DType::kBF16}, Case{5, 0, DType::kBF16},
                       Case{100003, 3, DType::kBF16}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << c.n << " offset=" << c.offset << " " << dtype_name(c.dtype));
    Dual src(Shape{c.offset + c.n});
    src.normal(70 + static_cast<uint64_t>(c.n), 3.0);
    std::vector<double> v = src.host_values();
    int64_t planted = 0;
    const auto plant = [&](int64_t i, double x) {
      if (i < 0 || i >= c.n) return;
      if (std::isfinite(v[static_cast<size_t>(c.offset + i)])) ++planted;
      v[static_cast<size_t>(c.offset + i)] = x;
    };
    plant(0, nan);
    plant(c.n - 1, -inf);  // the tail
    plant(c.n / 2, inf);
    for (int64_t i = 13; i < c.n; i += 9973) plant(i, (i / 9973) % 3 == 0 ? nan : (i / 9973) % 3 == 1 ? inf : -inf);
    if (c.offset > 0) v[0] = nan;  // before the view: must not be counted
    src.set(v);
    const Dual x = c.dtype == DType::kBF16 ? bf16_copy(src, Shape{c.offset + c.n}) : std::move(src);
    Dual count(Shape{1}, DType::kI64);
    count.set({5});  // overwritten
    run_both([&](Backend& be, Side s) {
      be.count_nonfinite({}, {.count = count[s], .x = offset_view(x, s, Shape{c.n}, c.offset)});
    });
    expect_close(count, kExact, "count_nonfinite");
    EXPECT_EQ(count.device_values()[0], static_cast<double>(planted));
    EXPECT_TRUE(count.guard_intact());
  }
  // Finite data of large magnitude: nothing counted.
  Dual big(Shape{4099});
  big.normal(90, 1e37);  // far above bf16/f32 everyday values, 34 sigma below their max
  Dual count(Shape{1}, DType::kI64);
  count.set({3});
  run_both([&](Backend& be, Side s) { be.count_nonfinite({}, {.count = count[s], .x = big[s]}); });
  EXPECT_EQ(count.device_values()[0], 0.0);
  expect_close(count, kExact, "count_nonfinite of finite data");
}

}  // namespace
}  // namespace diffmoe::cudatest
