#include "dist/single_rank_communicator.h"

#include <cstring>

#include "dist/comm_util.h"

namespace diffmoe::dist {

SingleRankCommunicator::SingleRankCommunicator(std::string name, Backend* backend)
    : Communicator(0, 1, std::move(name)), backend_(backend) {}

Device SingleRankCommunicator::device() const { return backend_ != nullptr ? backend_->device() : Device::kCPU; }

void SingleRankCommunicator::copy(Context ctx, const Tensor& dst, const Tensor& src) {
  if (dst.numel() == 0 || dst.data == src.data) return;
  if (backend_ != nullptr) {
    backend_->copy(ctx, CopyArgs{.dst = dst, .src = src});
  } else {
    std::memmove(dst.data, src.data, src.nbytes());
  }
}

WorkPtr SingleRankCommunicator::do_all_reduce(Context ctx, const Tensor& in, const Tensor& out, ReduceOp) {
  copy(ctx, flat_view(out, 0, out.numel()), flat_view(in, 0, in.numel()));
  return std::make_unique<DoneWork>();
}

WorkPtr SingleRankCommunicator::do_reduce_scatter(Context ctx, const Tensor& in, const Tensor& out) {
  copy(ctx, flat_view(out, 0, out.numel()), flat_view(in, 0, in.numel()));
  return std::make_unique<DoneWork>();
}

WorkPtr SingleRankCommunicator::do_all_gather(Context ctx, const Tensor& in, const Tensor& out) {
  copy(ctx, flat_view(out, 0, out.numel()), flat_view(in, 0, in.numel()));
  return std::make_unique<DoneWork>();
}

WorkPtr SingleRankCommunicator::do_all_to_all_v(Context ctx, const AllToAllVArgs& a) {
  copy(ctx, flat_view(a.out, a.recv_offsets[0], a.recv_counts[0]),
       flat_view(a.in, a.send_offsets[0], a.send_counts[0]));
  return std::make_unique<DoneWork>();
}

WorkPtr SingleRankCommunicator::do_broadcast(Context, const Tensor&, int) { return std::make_unique<DoneWork>(); }

WorkPtr SingleRankCommunicator::do_barrier(Context) { return std::make_unique<DoneWork>(); }

std::unique_ptr<Communicator> SingleRankCommunicator::do_split(int, int, const std::string& name) {
  return std::make_unique<SingleRankCommunicator>(name, backend_);
}

}  // namespace diffmoe::dist
