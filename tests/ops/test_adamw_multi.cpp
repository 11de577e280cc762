// CPU adamw_multi (op_args.h AdamWMultiArgs): bitwise the per-tensor adamw over every entry (odd
// and empty sizes, with and without bf16 copies, each entry's own weight decay, f32 and f64, two
// steps), and its validation: every entry checked before any is updated, errors naming the entry.
// bf16 moments (AdamWArgs): the update with moments of the param's dtype holding the same values,
// the new moments rounded to f32 and then to bf16 (nearest even), the params bitwise the same.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::expect_error;
using test::Owned;

class AdamWMulti : public test::CpuOpsTest {};

// One parameter tensor's state: p, m, v, grad and an optional bf16 copy, filled from `seed`.
struct ParamState {
  Owned p, m, v, g, copy;
  double weight_decay = 0.0;
  ParamState(const Shape& shape, DType dt, bool with_copy, double wd, uint64_t seed)
      : p(shape, dt), m(shape, dt), v(shape, dt), g(shape, dt), weight_decay(wd) {
    if (with_copy) copy = Owned(shape, DType::kBF16);
    test::fill_normal(p, seed);
    test::fill_normal(m, seed + 1, 0.1);
    test::fill_normal(v, seed + 2, 0.01, 0.05);  // positive second moments
    test::fill_normal(g, seed + 3);
  }
  AdamWEntry entry() const {
    return {.param = p, .m = m, .v = v, .grad = g, .param_bf16 = copy.t(), .weight_decay = weight_decay};
  }
};

// Bytes of a tensor (an empty or undefined one has none).
std::vector<char> bytes_of(const Tensor& t) {
  std::vector<char> b(t.defined() ? t.nbytes() : 0);
  if (!b.empty()) std::memcpy(b.data(), t.data, b.size());
  return b;
}

// Sizes: empty, one element, odd, a float4 multiple (chunk sizes are the CUDA test's concern: the
// CPU twin loops over entries); bf16 copies on some; weight decay 0, 0.1 or 0.05.
struct EntrySpec {
  Shape shape;
  bool copy;
  double wd;
};
const std::vector<EntrySpec> kSpecs = {
    {Shape{0}, false, 0.0},   {Shape{1}, true, 0.1},       {Shape{3, 5}, false, 0.1}, {Shape{4}, true, 0.0},
    {Shape{0, 7}, true, 0.1}, {Shape{17, 13}, true, 0.05}, {Shape{1003}, false, 0.0}, {Shape{64, 65}, true, 0.1},
};

TEST_F(AdamWMulti, EqualsPerTensorAdamWBitwise) {
  for (DType dt : {DType::kF32, DType::kF64}) {
    for (const double max_norm : {0.0, 0.5}) {
      std::vector<std::unique_ptr<ParamState>> multi, single;
      for (size_t i = 0; i < kSpecs.size(); ++i) {
        const EntrySpec& e = kSpecs[i];
        for (auto* list : {&multi, &single})
          list->push_back(std::make_unique<ParamState>(e.shape, dt, e.copy, e.wd, 900 + 10 * i));
      }
      Owned gsq({1}, dt);
      for (int64_t step = 1; step <= 2; ++step) {
        be.fill(ctx, {.out = gsq, .value = 0.0});
        for (const auto& s : multi) {
          test::fill_normal(s->g, 950 + static_cast<uint64_t>(step) + static_cast<uint64_t>(s->p.numel()));
          be.sum_squares(ctx, {.out = gsq, .x = s->g});
        }
        for (size_t i = 0; i < multi.size(); ++i) test::copy_values(single[i]->g, multi[i]->g);
        AdamWMultiArgs args{
            .grad_sq = gsq, .lr = 0.02, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .max_norm = max_norm, .step = step};
        for (const auto& s : multi) args.entries.push_back(s->entry());
        be.adamw_multi(ctx, args);
        for (const auto& s : single) {
          be.adamw(ctx, {.param = s->p,
                         .m = s->m,
                         .v = s->v,
                         .grad = s->g,
                         .grad_sq = gsq,
                         .lr = 0.02,
                         .beta1 = 0.8,
                         .beta2 = 0.99,
                         .eps = 1e-6,
                         .weight_decay = s->weight_decay,
                         .max_norm = max_norm,
                         .step = step,
                         .param_bf16 = s->copy.t()});
        }
      }
      for (size_t i = 0; i < multi.size(); ++i) {
        const ParamState &a = *multi[i], &b = *single[i];
        const std::string what =
            fmt::format("{} max_norm={} entry {} ({})", dtype_name(dt), max_norm, i, kSpecs[i].shape.str());
        EXPECT_EQ(bytes_of(a.p), bytes_of(b.p)) << what << " param";
        EXPECT_EQ(bytes_of(a.m), bytes_of(b.m)) << what << " m";
        EXPECT_EQ(bytes_of(a.v), bytes_of(b.v)) << what << " v";
        EXPECT_EQ(bytes_of(a.copy), bytes_of(b.copy)) << what << " bf16 copy";
        if (a.p.numel() > 0) {  // the update did something (never test on zeros)
          ParamState fresh(kSpecs[i].shape, dt, false, 0.0, 900 + 10 * i);
          EXPECT_NE(bytes_of(a.p), bytes_of(fresh.p)) << what << " param unchanged";
        }
      }
    }
  }
}

// The bits of a bf16 tensor.
uint16_t* bf16_bits(const Tensor& t) { return static_cast<uint16_t*>(t.data); }
// A bf16 tensor holding bf16(x) of a float tensor's values (rounded to nearest even), and back.
void round_to_bf16(const Tensor& dst16, const Tensor& src) {
  for (int64_t i = 0; i < src.numel(); ++i) bf16_bits(dst16)[i] = f32_to_bf16(static_cast<float>(test::get(src, i)));
}
void widen_bf16(const Tensor& dst, const Tensor& src16) {
  for (int64_t i = 0; i < src16.numel(); ++i) test::set(dst, i, bf16_to_f32(bf16_bits(src16)[i]));
}

TEST_F(AdamWMulti, Bf16MomentsAreTheUpdateRoundedToNearestEven) {
  for (DType dt : {DType::kF32, DType::kF64}) {
    for (const double max_norm : {0.0, 0.5}) {
      // ref: moments in dt; low: the same params and gradients with bf16 moments.
      std::vector<std::unique_ptr<ParamState>> ref, low;
      std::vector<Owned> m16, v16;
      for (size_t i = 0; i < kSpecs.size(); ++i) {
        const EntrySpec& e = kSpecs[i];
        for (auto* list : {&ref, &low})
          list->push_back(std::make_unique<ParamState>(e.shape, dt, e.copy, e.wd, 700 + 10 * i));
        m16.emplace_back(e.shape, DType::kBF16);
        v16.emplace_back(e.shape, DType::kBF16);
        round_to_bf16(m16.back(), low.back()->m);
        round_to_bf16(v16.back(), low.back()->v);
      }
      Owned gsq({1}, dt);
      int64_t rounded = 0, moved = 0;  // moments the rounding changed; bf16 moments the update changed
      for (int64_t step = 1; step <= 3; ++step) {
        be.fill(ctx, {.out = gsq, .value = 0.0});
        for (size_t i = 0; i < ref.size(); ++i) {
          test::fill_normal(ref[i]->g, 750 + static_cast<uint64_t>(step) + 7 * i);
          test::copy_values(low[i]->g, ref[i]->g);
          be.sum_squares(ctx, {.out = gsq, .x = ref[i]->g});
          // The reference starts from the values the bf16 moments hold.
          widen_bf16(ref[i]->m, m16[i]);
          widen_bf16(ref[i]->v, v16[i]);
        }
        AdamWMultiArgs a{
            .grad_sq = gsq, .lr = 0.02, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .max_norm = max_norm, .step = step};
        AdamWMultiArgs b = a;
        for (size_t i = 0; i < ref.size(); ++i) {
          a.entries.push_back(ref[i]->entry());
          AdamWEntry e = low[i]->entry();
          e.m = m16[i];
          e.v = v16[i];
          b.entries.push_back(e);
        }
        std::vector<std::vector<char>> m_before;
        for (const Owned& m : m16) m_before.push_back(bytes_of(m));
        be.adamw_multi(ctx, a);
        be.adamw_multi(ctx, b);
        for (size_t i = 0; i < ref.size(); ++i) {
          const std::string what = fmt::format("{} max_norm={} step {} entry {} ({})", dtype_name(dt), max_norm, step,
                                               i, kSpecs[i].shape.str());
          ASSERT_EQ(bytes_of(ref[i]->p), bytes_of(low[i]->p)) << what << " param";
          ASSERT_EQ(bytes_of(ref[i]->copy), bytes_of(low[i]->copy)) << what << " bf16 copy";
          for (int64_t k = 0; k < ref[i]->p.numel(); ++k) {
            const uint16_t want_m = f32_to_bf16(static_cast<float>(test::get(ref[i]->m, k)));
            const uint16_t want_v = f32_to_bf16(static_cast<float>(test::get(ref[i]->v, k)));
            ASSERT_EQ(bf16_bits(m16[i])[k], want_m) << what << " m[" << k << "]";
            ASSERT_EQ(bf16_bits(v16[i])[k], want_v) << what << " v[" << k << "]";
            rounded += test::get(ref[i]->m, k) != bf16_to_f32(want_m) ? 1 : 0;
          }
          if (m16[i].numel() > 0 && bytes_of(m16[i]) != m_before[i]) ++moved;
        }
      }
      // Not vacuous: the moments moved, and bf16 storage dropped bits of them.
      EXPECT_GT(moved, 0) << dtype_name(dt);
      EXPECT_GT(rounded, 0) << dtype_name(dt);
    }
  }
}

TEST_F(AdamWMulti, Bf16MomentsPerTensorOpEqualsTheListOp) {
  const Shape shape{37, 5};
  ParamState a(shape, DType::kF32, true, 0.1, 1200), b(shape, DType::kF32, true, 0.1, 1200);
  Owned am(shape, DType::kBF16), av(shape, DType::kBF16), bm(shape, DType::kBF16), bv(shape, DType::kBF16);
  for (const Owned* m : {&am, &bm}) round_to_bf16(*m, a.m);
  for (const Owned* v : {&av, &bv}) round_to_bf16(*v, a.v);
  Owned gsq({1}, DType::kF32);
  test::fill_normal(gsq, 1210, 0.1, 2.0);
  for (int64_t step = 1; step <= 2; ++step) {
    be.adamw(ctx, {.param = a.p,
                   .m = am,
                   .v = av,
                   .grad = a.g,
                   .grad_sq = gsq,
                   .lr = 0.01,
                   .weight_decay = 0.1,
                   .max_norm = 1.0,
                   .step = step,
                   .param_bf16 = a.copy.t()});
    AdamWEntry e = b.entry();
    e.m = bm;
    e.v = bv;
    be.adamw_multi(ctx, {.entries = {e}, .grad_sq = gsq, .lr = 0.01, .max_norm = 1.0, .step = step});
  }
  EXPECT_EQ(bytes_of(a.p), bytes_of(b.p));
  EXPECT_EQ(bytes_of(am), bytes_of(bm));
  EXPECT_EQ(bytes_of(av), bytes_of(bv));
  EXPECT_EQ(bytes_of(a.copy), bytes_of(b.copy));
  ParamState fresh(shape, DType::kF32, false, 0.0, 1200);
  EXPECT_NE(bytes_of(a.p), bytes_of(fresh.p));
}

TEST_F(AdamWMulti, EmptyListIsANoOp) {
  Owned gsq({1}, DType::kF32);
  be.adamw_multi(ctx, {.grad_sq = gsq, .max_norm = 1.0});
  be.adamw_multi(ctx, {});
}

TEST_F(AdamWMulti, ErrorsNameTheEntryAndNothingIsUpdated) {
  const DType f32 = DType::kF32;
  ParamState a(Shape{3, 5}, f32, true, 0.1, 1000), b(Shape{7}, f32, false, 0.0, 1010);
  Owned gsq({1}, f32), wrong_shape({5, 3}, f32), f64({7}, DType::kF64), copy32({7}, f32);
  test::fill_normal(gsq, 1020, 0.1, 2.0);
  const std::vector<char> p_before = bytes_of(a.p);
  const auto call = [&](AdamWEntry second, int64_t step = 1, double max_norm = 1.0, Tensor grad_sq = {}) {
    be.adamw_multi(ctx, {.entries = {a.entry(), second},
                         .grad_sq = grad_sq.defined() ? grad_sq : gsq.t(),
                         .max_norm = max_norm,
                         .step = step});
  };
  AdamWEntry e = b.entry();
  e.m = wrong_shape;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].m", "shape"});
  e = b.entry();
  e.grad = Tensor{};
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].grad"});
  e = b.entry();
  e.param = f64;
  e.m = e.v = e.grad = f64;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].param", "dtype"});
  e = b.entry();
  e.param_bf16 = copy32;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].param_bf16", "bf16"});
  // Moments: the param's dtype or bf16, both the same.
  Owned m16({7}, DType::kBF16), v16({7}, DType::kBF16);
  e = b.entry();
  e.m = m16;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].v", "bf16", "one dtype"});
  e = b.entry();
  e.m = e.v = f64;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].m", "f64", "bf16"});
  e = b.entry();
  e.v = v16;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].v", "f32", "bf16"});
  Owned m16_wrong({8}, DType::kBF16);
  e = b.entry();
  e.m = m16_wrong;
  e.v = v16;
  expect_error([&] { call(e); }, {"[adamw_multi]", "entries[1].m", "shape"});
  expect_error([&] { be.adamw(ctx, {.param = b.p, .m = m16, .v = b.v, .grad = b.g, .grad_sq = gsq}); },
               {"[adamw]", "v", "bf16"});
  expect_error([&] { call(b.entry(), 0); }, {"[adamw_multi]", "step"});
  Owned gsq_wrong({2}, f32);
  expect_error([&] { call(b.entry(), 1, 1.0, gsq_wrong); }, {"[adamw_multi]", "grad_sq"});
  // The first entry is valid, but no entry is updated when a later one is not.
  EXPECT_EQ(bytes_of(a.p), p_before);
  call(b.entry(), 1, 0.0, gsq_wrong);  // grad_sq is not read without clipping
  EXPECT_NE(bytes_of(a.p), p_before);
}

}  // namespace
}  // namespace diffmoe
