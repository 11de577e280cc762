// One micro-batch of token ids: host staging (what the loader fills) and backend buffers (what the
// model reads), [batch, seq] i32 each. Shared by the trainer and the evaluator.
#pragma once
#include "backend/backend.h"
#include "data/loader.h"

namespace diffmoe {

struct TokenBuffers {
  Arena host, dev;

  TokenBuffers(Backend& be, int64_t batch, int64_t seq) : host(plan(batch, seq)), dev(plan(batch, seq)) {
    host.allocate(cpu_allocator());
    dev.allocate(be.allocator());
  }
  // The views of either buffer, planned and not allocated (memory planning).
  static Arena plan(int64_t batch, int64_t seq) {
    Arena a;
    a.add("inputs", Shape{batch, seq}, DType::kI32);
    a.add("targets", Shape{batch, seq}, DType::kI32);
    return a;
  }
  // Fills the host buffers from the loader and uploads them; false at the end of a pass.
  bool next(data::TokenLoader& loader, Backend& be) {
    if (!loader.next(host.get("inputs"), host.get("targets"))) return false;
    be.upload(dev.get("inputs"), host.get("inputs").data);
    be.upload(dev.get("targets"), host.get("targets").data);
    return true;
  }
  // Reads the loader's next batch into the host buffers only (another rank's micro-batch): the
  // loader moves on exactly as next() would. False at the end of a pass.
  bool skip(data::TokenLoader& loader) { return loader.next(host.get("inputs"), host.get("targets")); }
  Tensor inputs() const { return dev.get("inputs"); }
  Tensor targets() const { return dev.get("targets"); }
};

}  // namespace diffmoe
