// ZeRO-2 gradient slots (ParamLayout: assign_grad_slots, auto_grad_slots; GradBuffer): the
// assignment's order and reuse and its error when too few slots are given, on hand-made bucket
// spans; then a real backward into the slots of a model laid out for 2 data-parallel ranks, with
// every slot poisoned with NaN first: each bucket, when announced complete, must hold exactly the
// gradients (and zero padding) that a ZeRO-1 model computes for the same micro-batch alone, in
// every backward of a step (each writes its slots anew: accumulation happens in the reduced chunks),
// for the untied and the tied-embedding micro configs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "micro_config.h"

namespace diffmoe {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(GradSlots, OneBucketPerStageReusesTheLeastRecentSlot) {
  const std::vector<BucketSpan> spans = {{0, 0}, {1, 1}, {2, 2}, {3, 3}, {4, 4}};
  EXPECT_EQ(assign_grad_slots(spans, 2, "t"), (std::vector<int>{0, 1, 0, 1, 0}));
  EXPECT_EQ(assign_grad_slots(spans, 3, "t"), (std::vector<int>{0, 1, 2, 0, 1}));
  EXPECT_EQ(assign_grad_slots(spans, 1, "t"), (std::vector<int>{0, 0, 0, 0, 0}));
  // Automatic: the bucket being written and the one whose reduce-scatter is in flight.
  EXPECT_EQ(auto_grad_slots(spans), 2);
}

TEST(GradSlots, BucketsOpenTogetherTakeSlotsInLayoutOrder) {
  // Stage 0 and 1 each have two buckets (a layer larger than a bucket), stage 2 one.
  const std::vector<BucketSpan> spans = {{0, 0}, {0, 0}, {1, 1}, {1, 1}, {2, 2}};
  EXPECT_EQ(assign_grad_slots(spans, 2, "t"), (std::vector<int>{0, 1, 0, 1, 0}));
  EXPECT_EQ(assign_grad_slots(spans, 4, "t"), (std::vector<int>{0, 1, 2, 3, 0}));
  EXPECT_EQ(auto_grad_slots(spans), 4);
  const std::string e = error_of([&] { assign_grad_slots(spans, 1, "dense group 1"); });
  EXPECT_NE(e.find("dense group 1: gradient bucket 1 (stages 0..0) needs a slot while all 1 slots hold incomplete "
                   "buckets (0)"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("parallel.grad_slots"), std::string::npos) << e;
}

TEST(GradSlots, ABucketOpenTheWholeBackwardKeepsItsSlot) {
  // A tied embedding's bucket: written by the head's GEMM first (stage 0), complete last.
  const std::vector<BucketSpan> spans = {{0, 0}, {1, 1}, {2, 2}, {0, 3}};
  EXPECT_EQ(assign_grad_slots(spans, 2, "t"), (std::vector<int>{0, 0, 0, 1}));
  EXPECT_EQ(assign_grad_slots(spans, 3, "t"), (std::vector<int>{0, 2, 0, 1}));
  EXPECT_NE(error_of([&] { assign_grad_slots(spans, 1, "t"); }).find("bucket 3 (stages 0..3)"), std::string::npos);
  EXPECT_EQ(auto_grad_slots(spans), 3);
  EXPECT_NE(error_of([&] { assign_grad_slots({{2, 1}}, 1, "t"); }).find("open from stage 2 to 1"), std::string::npos);
}

ParallelLayoutOptions two_ranks(int zero_stage, int64_t grad_slots = 0) {
  return ParallelLayoutOptions{
      .dense_dp = 2, .expert_dp = 2, .bucket_elems = 97, .zero_stage = zero_stage, .grad_slots = grad_slots};
}

// The fewest slots per group the layout can run with (more would reuse the slots less).
int64_t fewest_slots(const ModelConfig& cfg) {
  const PrecisionPlan plan(Precision::kF32, DType::kF64);
  for (int64_t n = 1;; ++n) {
    try {
      ParamLayout(cfg, plan, two_ranks(2, n));
      return n;
    } catch (const Error&) {
    }
  }
}

std::vector<double> host(const Tensor& t) { return std::vector<double>(t.ptr<double>(), t.ptr<double>() + t.numel()); }

void check_backward_into_slots(const ModelConfig& cfg) {
  CpuBackend be;
  const int64_t B = 2, T = cfg.max_seq_len;
  Model full(cfg, be, DType::kF64, ModelOptions{.parallel = two_ranks(1)});
  Model slots(cfg, be, DType::kF64, ModelOptions{.parallel = two_ranks(2, fewest_slots(cfg))});
  for (Model* m : {&full, &slots}) {
    m->set_batch_shape(B, T);
    test::randomize_for_test(*m, 7);
  }
  const ParamLayout& lay = slots.layout();
  ASSERT_EQ(lay.groups().size(), full.layout().groups().size());
  // The assignment: buckets that share a slot are never open at the same time, and fit it.
  size_t reused = 0;
  for (const ParamLayout::Group& g : lay.groups()) {
    ASSERT_TRUE(g.slotted());
    reused += g.buckets.size() - g.slot_len.size();
    for (size_t a = 0; a < g.buckets.size(); ++a) {
      const ParamLayout::Bucket& x = g.buckets[a];
      ASSERT_GE(x.slot, 0);
      EXPECT_LE(x.length, g.slot_len[static_cast<size_t>(x.slot)]);
      for (size_t b = a + 1; b < g.buckets.size(); ++b) {
        const ParamLayout::Bucket& y = g.buckets[b];
        if (x.slot == y.slot) {
          EXPECT_TRUE(x.stage < y.open_stage || y.stage < x.open_stage) << a << " " << b;
        }
      }
    }
  }
  EXPECT_GT(reused, 0u);
  GradBuffer& grads = slots.grads();
  // Poison every slot: what the backward does not write (zeroed runs, padding) must not leak.
  for (size_t g = 0; g < lay.groups().size(); ++g)
    for (size_t b = 0; b < lay.groups()[g].buckets.size(); ++b)
      be.fill({}, {.out = grads.slot_bucket(g, b), .value = std::numeric_limits<double>::quiet_NaN()});
  std::map<std::pair<size_t, size_t>, std::vector<double>> seen;
  int announced = 0;
  grads.set_on_bucket_ready([&](size_t g, size_t b, Context) {
    seen[{g, b}] = host(grads.slot_bucket(g, b));
    ++announced;
  });
  const std::string name = lay.entries().front().spec.name;
  EXPECT_NE(error_of([&] { grads.get(name); }).find("parallel.zero_stage 2"), std::string::npos);

  slots.zero_grads({});
  for (int micro = 0; micro < 2; ++micro) {
    SCOPED_TRACE(fmt::format("micro-batch {}", micro));
    const test::Batch batch = test::make_batch(cfg, B, T, 100 + micro, {1});
    announced = 0;
    seen.clear();
    slots.zero_expert_counts({});
    slots.forward({}, batch.tokens, batch.targets);
    slots.backward({}, 0.5);
    EXPECT_EQ(slots.grads().backwards_since_zero(), micro + 1);
    // The reference: this micro-batch's gradient alone.
    full.zero_grads({});
    full.zero_expert_counts({});
    full.forward({}, batch.tokens, batch.targets);
    full.backward({}, 0.5);
    size_t n_buckets = 0;
    for (size_t g = 0; g < lay.groups().size(); ++g) {
      for (size_t b = 0; b < lay.groups()[g].buckets.size(); ++b, ++n_buckets) {
        const std::vector<double> want = host(full.grads().buffers().bucket(g, b));
        const std::vector<double>& got = seen[{g, b}];
        ASSERT_EQ(got.size(), want.size());
        size_t bad = 0;
        for (size_t i = 0; i < got.size(); ++i) bad += got[i] == want[i] ? 0 : 1;  // bitwise: same ops, same order
        EXPECT_EQ(bad, 0u) << "group " << g << " bucket " << b << " (slot " << lay.groups()[g].buckets[b].slot << ")";
      }
    }
    EXPECT_EQ(static_cast<size_t>(announced), n_buckets);
  }
  EXPECT_NE(error_of([&] { grads.get(name); }).find("parallel.zero_stage 2"), std::string::npos);
  grads.set_on_bucket_ready(nullptr);
}

TEST(GradSlots, EachBackwardWritesItsSlotsAnew) { check_backward_into_slots(test::micro_diff_config()); }

TEST(GradSlots, EachBackwardWritesItsSlotsAnewTiedEmbeddings) {
  ModelConfig cfg = test::micro_plain_config();
  ASSERT_TRUE(cfg.tie_embeddings);
  check_backward_into_slots(cfg);
}

TEST(GradSlots, BadOptionsNameTheKey) {
  const ModelConfig cfg = test::micro_diff_config();
  CpuBackend be;
  ParallelLayoutOptions o = two_ranks(3);
  EXPECT_NE(error_of([&] { Model(cfg, be, DType::kF32, ModelOptions{.parallel = o}); }).find("parallel.zero_stage"),
            std::string::npos);
  o = two_ranks(2);
  o.grad_slots = 1;
  EXPECT_NE(error_of([&] { Model(cfg, be, DType::kF32, ModelOptions{.parallel = o}); }).find("parallel.grad_slots"),
            std::string::npos);
}

// More slots than a group has buckets: the same layout as one slot per bucket (the extra ones would
// stay unused), without sizing anything by the request (2^40 slots once ran out of memory).
TEST(GradSlots, MoreSlotsThanBucketsAreOnePerBucket) {
  const ModelConfig cfg = test::micro_diff_config();
  const PrecisionPlan plan(Precision::kF32, DType::kF64);
  const ParamLayout huge(cfg, plan, two_ranks(2, int64_t{1} << 40));
  size_t most = 0;
  for (const ParamLayout::Group& g : huge.groups()) most = std::max(most, g.buckets.size());
  const ParamLayout each(cfg, plan, two_ranks(2, static_cast<int64_t>(most)));
  ASSERT_EQ(huge.groups().size(), each.groups().size());
  for (size_t g = 0; g < huge.groups().size(); ++g) {
    EXPECT_EQ(huge.groups()[g].slot_len, each.groups()[g].slot_len) << "group " << g;
    EXPECT_LE(huge.groups()[g].slot_len.size(), huge.groups()[g].buckets.size()) << "group " << g;
    for (size_t b = 0; b < huge.groups()[g].buckets.size(); ++b)
      EXPECT_EQ(huge.groups()[g].buckets[b].slot, each.groups()[g].buckets[b].slot) << "group " << g << " bucket " << b;
  }
}

}  // namespace
}  // namespace diffmoe
