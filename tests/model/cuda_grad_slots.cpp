// ZeRO-2 gradient slots on CUDA (GradBuffer, docs/parallelism.md §4): a model laid out for 2
// data-parallel ranks with parallel.zero_stage 2 writes every bucket into a reused slot (poisoned
// with NaN first): the slot's zeroing (fills on the stream) and the beta = 0 weight-gradient GEMMs
// into it must give, when each bucket is announced complete, the gradients a ZeRO-1 model on the
// same device computes for the same micro-batch alone, in both backwards of a 2-micro-batch step,
// for the untied and the tied-embedding micro configs. Skips without a usable CUDA device
// (tests/cuda_test_util.h). The multi-GPU reduction (NCCL) runs in bench_step --data-parallel
// --zero-stage 2 and `diffmoe train` under mpirun.
//
// Tolerance: both models run the same kernels on the same inputs; only reductions whose order is
// not fixed (atomic adds in the norm-weight and embedding backwards) may differ, by f32 rounding
// (~1e-7 relative). 1e-5 relative L2 per bucket; a missing zero fill leaves NaN, a GEMM that adds
// to the previous bucket's values differs by O(1).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <vector>

#include "backend/backend_registry.h"
#include "cuda_test_util.h"
#include "micro_config.h"

namespace diffmoe {
namespace {

std::vector<float> host(Backend& be, const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  be.download(v.data(), t);
  return v;
}

void check(const ModelConfig& cfg) {
  std::unique_ptr<Backend> be = make_backend("cuda");
  const int64_t B = 2, T = cfg.max_seq_len;
  auto layout = [](int stage) {
    return ParallelLayoutOptions{.dense_dp = 2, .expert_dp = 2, .bucket_elems = 97, .zero_stage = stage};
  };
  Model full(cfg, *be, DType::kF32, ModelOptions{.parallel = layout(1)});
  Model slots(cfg, *be, DType::kF32, ModelOptions{.parallel = layout(2)});
  for (Model* m : {&full, &slots}) {
    m->set_batch_shape(B, T);
    m->init_weights(5);
  }
  const ParamLayout& lay = slots.layout();
  GradBuffer& grads = slots.grads();
  for (size_t g = 0; g < lay.groups().size(); ++g) {
    ASSERT_TRUE(lay.groups()[g].slotted());
    for (size_t b = 0; b < lay.groups()[g].buckets.size(); ++b)
      be->fill({}, {.out = grads.slot_bucket(g, b), .value = std::numeric_limits<double>::quiet_NaN()});
  }
  std::map<std::pair<size_t, size_t>, std::vector<float>> seen;
  grads.set_on_bucket_ready([&](size_t g, size_t b, Context ctx) {
    be->synchronize(ctx);  // the bucket's writes are queued on ctx's stream
    seen[{g, b}] = host(*be, grads.slot_bucket(g, b));
  });
  Arena io;
  io.add("tokens", Shape{B, T}, DType::kI32);
  io.add("targets", Shape{B, T}, DType::kI32);
  io.allocate(be->allocator());
  slots.zero_grads({});
  for (int micro = 0; micro < 2; ++micro) {
    SCOPED_TRACE(fmt::format("micro-batch {}", micro));
    const test::Batch batch = test::make_batch(cfg, B, T, 200 + micro, {1});
    be->upload(io.get("tokens"), batch.tokens.t().data);
    be->upload(io.get("targets"), batch.targets.t().data);
    seen.clear();
    slots.zero_expert_counts({});
    slots.forward({}, io.get("tokens"), io.get("targets"));
    slots.backward({}, 0.5);
    full.zero_grads({});
    full.zero_expert_counts({});
    full.forward({}, io.get("tokens"), io.get("targets"));
    full.backward({}, 0.5);
    be->synchronize({});
    for (size_t g = 0; g < lay.groups().size(); ++g)
      for (size_t b = 0; b < lay.groups()[g].buckets.size(); ++b) {
        const std::vector<float> want = host(*be, full.grads().buffers().bucket(g, b));
        ASSERT_TRUE(seen.contains({g, b})) << "bucket " << b << " of group " << g << " not announced";
        const std::vector<float>& got = seen[{g, b}];
        ASSERT_EQ(got.size(), want.size());
        double d = 0, r = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_TRUE(std::isfinite(got[i])) << "group " << g << " bucket " << b << " element " << i;
          d += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
          r += static_cast<double>(want[i]) * want[i];
        }
        EXPECT_LE(std::sqrt(d / std::max(r, 1e-300)), 1e-5) << "group " << g << " bucket " << b;
      }
  }
  grads.set_on_bucket_ready(nullptr);
}

TEST(CudaGradSlots, EachBackwardWritesItsSlotsAnew) {
  DIFFMOE_REQUIRE_CUDA();
  check(test::micro_diff_config());
}

TEST(CudaGradSlots, EachBackwardWritesItsSlotsAnewTiedEmbeddings) {
  DIFFMOE_REQUIRE_CUDA();
  check(test::micro_plain_config());
}

}  // namespace
}  // namespace diffmoe
