#include <gtest/gtest.h>

#include "core/arena.h"

namespace diffmoe {
namespace {

TEST(Tensor, ShapeAndViews) {
  Arena a;
  a.add("x", Shape{4, 3}, DType::kF32);
  a.add("y", Shape{5}, DType::kI32);
  a.allocate(cpu_allocator());
  Tensor x = a.get("x");
  EXPECT_EQ(x.numel(), 12);
  EXPECT_EQ(x.nbytes(), 48u);
  EXPECT_EQ(x.dim(-1), 3);
  for (int i = 0; i < 12; ++i) x.ptr<float>()[i] = static_cast<float>(i);
  Tensor r = x.rows(1, 3);
  EXPECT_EQ(r.shape, (Shape{2, 3}));
  EXPECT_EQ(r.ptr<float>()[0], 3.0f);
  EXPECT_EQ(x[2].ptr<float>()[1], 7.0f);
  EXPECT_EQ(x.reshape(Shape{2, 6}).dim(1), 6);
  EXPECT_THROW(x.reshape(Shape{5}), Error);
  EXPECT_THROW(x.ptr<double>(), Error);
  EXPECT_THROW(x.rows(2, 5), Error);
  EXPECT_THROW(check_shape(x, Shape{3, 4}, "op", "x"), Error);
}

TEST(Arena, OneAllocationAlignedNamedViews) {
  Arena a;
  a.add("a", Shape{3}, DType::kF32);
  a.add("b", Shape{7, 2}, DType::kF64);
  EXPECT_THROW(a.add("a", Shape{1}, DType::kF32), Error);
  EXPECT_THROW(a.get("a"), Error);  // before allocate()
  a.allocate(cpu_allocator());
  EXPECT_THROW(a.add("c", Shape{1}, DType::kF32), Error);
  Tensor b = a.get("b");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data) % Arena::kAlign, 0u);
  EXPECT_EQ(static_cast<char*>(b.data) - static_cast<char*>(a.base()), 256);
  EXPECT_EQ(b.ptr<double>()[13], 0.0);  // zero-filled
  EXPECT_TRUE(a.has("a"));
  EXPECT_FALSE(a.has("zz"));
  try {
    a.get("zz");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("zz"), std::string::npos);
  }
  Arena moved = std::move(a);
  EXPECT_EQ(moved.get("b").data, b.data);
  EXPECT_THROW(moved.flat(), Error);  // f32 and f64 views
}

TEST(Arena, FlatViewCoversEveryViewAndThePadding) {
  Arena a;
  a.add("a", Shape{3}, DType::kF32);
  a.add("b", Shape{100}, DType::kF32);
  EXPECT_THROW(a.flat(), Error);  // before allocate()
  a.allocate(cpu_allocator());
  const Tensor f = a.flat();
  EXPECT_EQ(f.data, a.base());
  EXPECT_EQ(f.dtype, DType::kF32);
  EXPECT_EQ(f.rank(), 1);
  EXPECT_EQ(f.numel(), 64 + 128);  // "a": 12 bytes padded to 256; "b": 400 bytes padded to 512
  a.get("b").ptr<float>()[0] = 2.5f;
  EXPECT_EQ(f.ptr<float>()[64], 2.5f);  // the same memory
  EXPECT_EQ(f.ptr<float>()[3], 0.0f);   // padding: zero-filled
}

TEST(Arena, FlatRangeCoversItsViewsAndTheirPadding) {
  Arena a;
  a.add("a", Shape{3}, DType::kF64);
  a.add("b", Shape{100}, DType::kF32);
  a.add("c", Shape{70}, DType::kF32);
  a.add("d", Shape{5}, DType::kF32);
  a.allocate(cpu_allocator());
  const Tensor bc = a.flat(1, 3);  // "b": 400 bytes padded to 512; "c": 280 bytes padded to 512
  EXPECT_EQ(bc.data, a.get("b").data);
  EXPECT_EQ(bc.dtype, DType::kF32);
  EXPECT_EQ(bc.numel(), 128 + 128);
  EXPECT_EQ(static_cast<char*>(bc.data) + bc.nbytes(), a.get("d").data);  // ends where "d" starts
  const Tensor d = a.flat(3, 4);  // the last view: up to the end of the allocation
  EXPECT_EQ(d.data, a.get("d").data);
  EXPECT_EQ(d.numel(), 64);
  EXPECT_THROW(a.flat(0, 2), Error);  // f64 and f32 views
  EXPECT_THROW(a.flat(2, 2), Error);  // empty range
  EXPECT_THROW(a.flat(3, 5), Error);  // past the last view
}

}  // namespace
TEST(Arena, AliasesShareTheBytesOfAPlannedView) {
  Arena a;
  a.add("host", Shape{200}, DType::kF32);  // 800 bytes padded to 1024
  a.alias("lo", Shape{64}, DType::kBF16, "host", 0);
  a.alias("hi", Shape{300}, DType::kU8, "host", 512);
  a.add("after", Shape{2}, DType::kF32);  // a view planned after the aliases keeps its own bytes
  EXPECT_EQ(a.bytes(), 1024u + 256u);     // the aliases take none
  EXPECT_EQ(a.entries().size(), 2u);
  EXPECT_EQ(a.aliases().size(), 2u);
  EXPECT_THROW(a.alias("lo", Shape{1}, DType::kU8, "host", 0), Error);     // duplicate name
  EXPECT_THROW(a.alias("x", Shape{1}, DType::kU8, "nothing", 0), Error);   // no such view
  EXPECT_THROW(a.alias("x", Shape{1}, DType::kU8, "lo", 0), Error);        // not over another alias
  EXPECT_THROW(a.alias("x", Shape{1}, DType::kU8, "host", 100), Error);    // not 256-aligned
  EXPECT_THROW(a.alias("x", Shape{513}, DType::kU8, "host", 512), Error);  // past the host's bytes
  EXPECT_THROW(a.alias("x", Shape{257}, DType::kF32, "host", 0), Error);   // past the host's bytes
  a.alias("whole", Shape{256}, DType::kF32, "host", 0);                    // exactly the host's bytes
  a.allocate(cpu_allocator());
  EXPECT_THROW(a.alias("y", Shape{1}, DType::kU8, "host", 0), Error);  // after allocate()
  const Tensor host = a.get("host"), lo = a.get("lo"), hi = a.get("hi");
  EXPECT_EQ(lo.data, host.data);
  EXPECT_EQ(lo.dtype, DType::kBF16);
  EXPECT_EQ(lo.shape, Shape{64});
  EXPECT_EQ(static_cast<char*>(hi.data) - static_cast<char*>(host.data), 512);
  EXPECT_EQ(a.get("after").data, static_cast<char*>(a.base()) + 1024);
  host.ptr<float>()[128] = 1.0f;  // bytes 512..515: 0x3f800000 little-endian
  EXPECT_EQ(hi.ptr<uint8_t>()[3], 0x3f);
  Arena moved = std::move(a);
  EXPECT_EQ(moved.get("hi").data, hi.data);
  EXPECT_EQ(moved.flat(0, 1).numel(), 256);  // flat() covers the planned views only
}

}  // namespace diffmoe
