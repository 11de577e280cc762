// CPU adamw_multi (op_args.h AdamWMultiArgs): bitwise the per-tensor adamw over every entry (odd
// and empty sizes, with and without bf16 copies, each entry's own weight decay, f32 and f64, two
// steps), and its validation: every entry checked before any is updated, errors naming the entry.
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
    {Shape{0}, false, 0.0},  {Shape{1}, true, 0.1},     {Shape{3, 5}, false, 0.1}, {Shape{4}, true, 0.0},
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
        AdamWMultiArgs args{.grad_sq = gsq, .lr = 0.02, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .max_norm = max_norm,
                            .step = step};
        for (const auto& s : multi) args.entries.push_back(s->entry());
        be.adamw_multi(ctx, args);
        for (const auto& s : single) {
          be.adamw(ctx, {.param = s->p, .m = s->m, .v = s->v, .grad = s->g, .grad_sq = gsq, .lr = 0.02, .beta1 = 0.8,
                         .beta2 = 0.99, .eps = 1e-6, .weight_decay = s->weight_decay, .max_norm = max_norm,
                         .step = step, .param_bf16 = s->copy.t()});
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
    be.adamw_multi(ctx, {.entries = {a.entry(), second}, .grad_sq = grad_sq.defined() ? grad_sq : gsq.t(),
                         .max_norm = max_norm, .step = step});
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
