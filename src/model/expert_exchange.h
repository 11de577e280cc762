// How an expert-parallel MoE layer reaches the other ranks of its EP group (docs/model.md §12,
// docs/parallelism.md): an all-to-all of row blocks. The model only sees this interface; the
// training layer implements it on a communicator (src/train/expert_exchange_comm.h), so the model
// depends on no communication library.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"

namespace diffmoe {

// Per peer of the EP group: how many rows, and where they start (rows, not elements).
struct RowBlocks {
  std::vector<int64_t> counts, offsets;
  int64_t total() const;
  static RowBlocks from_counts(std::vector<int64_t> counts);  // offsets = the exclusive prefix sums
};

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int size() const = 0;  // ranks of the EP group
  virtual int rank() const = 0;  // this rank's place in it (it holds experts [rank·E/size, (rank+1)·E/size))

  class Pending {
   public:
    virtual ~Pending() = default;
    // ctx's later work (and, on the CPU, the host) sees the received rows.
    virtual void wait(Context ctx) = 0;
  };
  // Sends rows [send.offsets[p], + send.counts[p]) of `in` to peer p and receives peer p's rows into
  // `out` at recv.offsets[p]; in and out are [rows, width] (the same width and dtype). Ordered after
  // ctx's work so far; returns at once: the caller overlaps other work until wait(). recv.counts[p]
  // must equal peer p's send.counts[this rank] (the caller exchanges the counts first).
  virtual std::unique_ptr<Pending> all_to_all(Context ctx, const Tensor& in, const Tensor& out, const RowBlocks& send,
                                              const RowBlocks& recv) = 0;
};

}  // namespace diffmoe
