// A world of one rank with no communication library: every collective is the identity (out = in;
// all_to_all_v copies the block to itself), done at the call. With a backend the copies are the
// backend's copy op on the call's ctx (any device: on CUDA they queue on ctx.stream); without one
// they are memmoves of host memory. Work::wait does nothing.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"
#include "dist/communicator.h"

namespace diffmoe::dist {

class SingleRankCommunicator final : public Communicator {
 public:
  // backend: null for host tensors (memmove), else the backend whose memory the tensors are in.
  explicit SingleRankCommunicator(std::string name = "world", Backend* backend = nullptr);
  std::string_view kind() const override { return "single"; }
  Device device() const override;

 protected:
  WorkPtr do_all_reduce(Context ctx, const Tensor& in, const Tensor& out, ReduceOp op) override;
  WorkPtr do_reduce_scatter(Context ctx, const Tensor& in, const Tensor& out) override;
  WorkPtr do_all_gather(Context ctx, const Tensor& in, const Tensor& out) override;
  WorkPtr do_all_to_all_v(Context ctx, const AllToAllVArgs& a) override;
  WorkPtr do_broadcast(Context ctx, const Tensor& t, int root) override;
  WorkPtr do_barrier(Context ctx) override;
  std::unique_ptr<Communicator> do_split(int color, int key, const std::string& name) override;

 private:
  void copy(Context ctx, const Tensor& dst, const Tensor& src);
  Backend* backend_;
};

}  // namespace diffmoe::dist
