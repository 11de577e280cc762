// The device table of CudaBackend::adamw_multi (op_args.h AdamWMultiArgs; methods in optim_ops.cu):
// one row per non-empty entry (pointers, size, weight decay, whether it moves in vectors of four, the
// moments' dtype) and a flat
// list of work items (row, chunk of kAdamWChunk elements) that the one launch's blocks walk.
//
// The optimizer passes the same arena views at every step, so the table is built on the host each
// call (a few hundred rows) but uploaded only when its rows differ from the cached copy: no
// allocation and no copy on the hot path after the first step. The upload is a cudaMemcpyAsync on
// the op's stream (ordered before the kernel) from host vectors that stay alive until the next
// change, and it first waits for the last kernel that read the old table (an event, since that
// kernel may have run on another stream). The source is pageable memory, so the driver may wait
// for the stream while it stages the copy: that happens at the first step (or a changed list) only.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/cuda_allocator.h"
#include "backend/op_args.h"

namespace diffmoe {

// Elements per work item: a 256-thread block moves 64 float4 per thread. A multiple of 4, so every
// chunk of a 16-byte-aligned tensor starts 16-byte aligned (and its bf16 copy 8-byte aligned).
constexpr int64_t kAdamWChunk = int64_t{1} << 16;
static_assert(kAdamWChunk % 4 == 0, "chunks of an aligned tensor must start on a float4 boundary");

class AdamWMultiTable {
 public:
  struct Row {  // one non-empty entry; fields ordered so that there is no padding
    float* p;
    void* m;  // float, or __nv_bfloat16 where bf16_moments
    void* v;
    const float* grad;
    void* p16;  // the bf16 copy (__nv_bfloat16), or null
    int64_t n;  // elements
    double weight_decay;
    int32_t vec4;          // 1: p, grad 16-byte aligned, m, v aligned to four moments, p16 8-byte aligned
    int32_t bf16_moments;  // 1: m and v are bf16 (AdamWArgs), 0: f32
  };
  static_assert(sizeof(Row) == 5 * sizeof(void*) + 2 * 8 + 2 * 4, "Row has no hidden padding");
  struct Item {  // elements [chunk·kAdamWChunk, min(n, (chunk + 1)·kAdamWChunk)) of row
    int32_t row;
    int32_t chunk;
  };
  struct View {  // device pointers into the uploaded table
    const Row* rows = nullptr;
    const Item* items = nullptr;
    int64_t n_items = 0;
  };

  AdamWMultiTable() = default;
  ~AdamWMultiTable();
  AdamWMultiTable(const AdamWMultiTable&) = delete;
  AdamWMultiTable& operator=(const AdamWMultiTable&) = delete;

  // The table of `entries` (validated f32 tensors, moments f32 or bf16) on the device, uploaded on s
  // first if it changed.
  // n_items = 0 (nothing uploaded, the cached table kept) when every entry is empty.
  View prepare(const std::vector<AdamWEntry>& entries, cudaStream_t s);
  // After the launch that reads the table, on its stream: the next upload waits for it.
  void mark_read(cudaStream_t s);
  // How many times a table was uploaded (tests: the same list twice uploads once).
  int64_t uploads() const { return uploads_; }

 private:
  std::vector<Row> rows_;       // the uploaded rows (host copy, the upload's source)
  std::vector<Item> items_;     // the uploaded work items (host copy, the upload's source)
  std::vector<Row> candidate_;  // this call's rows, compared with rows_
  DeviceBuffer device_;         // rows, then items at items_offset_
  size_t items_offset_ = 0;
  cudaEvent_t read_done_ = nullptr;  // recorded by mark_read (created on first use)
  bool read_recorded_ = false;
  bool current_ = false;  // the device holds rows_ and items_
  int64_t uploads_ = 0;
};

}  // namespace diffmoe
