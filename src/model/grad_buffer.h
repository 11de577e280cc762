// The model's gradients and their bookkeeping (docs/style.md habit 2: weight gradients accumulate):
// one flat buffer per ParamLayout group (master dtype: f32, or f64 for gradient checks), zeroing,
// and the notice that a bucket's gradients are final, which data parallelism uses to start the
// bucket's reduce-scatter while the backward goes on.
//
// Zeroing without a pass over every byte: most of the bytes belong to GEMM weights, whose first
// gradient GEMM after zero() runs at beta = 0 (LayerContext::dw_beta) and overwrites them; zero()
// fills only the gradients that the backward adds into (norms, λ vectors, an untied embedding;
// ParamLayout::Entry::grad_added), one fill per run of them in layout order, and marks the rest
// stale. Reading the gradients through get() or buffers() before the next backward has written
// them would see stale values: materialize() zeroes them first (Model::grads does).
#pragma once
#include <functional>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "model/layout_buffers.h"

namespace diffmoe {

class GradBuffer {
 public:
  GradBuffer(const ParamLayout& layout, DType dtype, Allocator& alloc);
  // The gradient buffers of `layout` in `dtype`, planned and not allocated (memory planning): the
  // constructor allocates exactly these.
  static LayoutBuffers plan(const ParamLayout& layout, DType dtype);

  bool has(std::string_view name) const { return buf_.has(name); }
  Tensor get(std::string_view name) const { return buf_.get(name); }
  const LayoutBuffers& buffers() const { return buf_; }
  const ParamLayout& layout() const { return buf_.layout(); }

  // Every gradient reads as zero to the next backward (which then writes the stale ones at beta = 0)
  // and, through materialize(), to anyone else.
  void zero(Backend& be, Context ctx);
  // Whether the GEMM-written gradients still hold values from before zero() (the next backward
  // overwrites them), and the fill that makes them read as zero now.
  bool stale() const { return stale_; }
  void materialize(Backend& be, Context ctx);
  // The backward has written every gradient: nothing is stale any more.
  void backward_written() { stale_ = false; }
  size_t zero_bytes() const;  // bytes zero() fills (benchmarks, tests)

  // Called (in bucket order) for every bucket that stage_done(stage) completes.
  using BucketReady = std::function<void(size_t group, size_t bucket, Context ctx)>;
  void set_on_bucket_ready(BucketReady fn) { on_ready_ = std::move(fn); }
  // The backward calls this after each stage (ParamLayout::stage_of_layer); buckets whose last
  // stage it is are then final for this backward.
  void stage_done(int stage, Context ctx) const;

 private:
  struct Run {
    size_t group;
    int64_t offset, count;
  };
  LayoutBuffers buf_;
  std::vector<Run> zero_runs_;  // the added-into gradients (and small gaps between them)
  bool stale_ = false;
  BucketReady on_ready_;
};

}  // namespace diffmoe
