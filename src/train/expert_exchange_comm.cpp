#include "train/expert_exchange_comm.h"

namespace diffmoe {

namespace {

class WorkPending final : public ExpertExchange::Pending {
 public:
  explicit WorkPending(dist::WorkPtr w) : w_(std::move(w)) {}
  void wait(Context ctx) override { w_->wait(ctx); }

 private:
  dist::WorkPtr w_;
};

std::vector<int64_t> scaled(const std::vector<int64_t>& rows, int64_t width) {
  std::vector<int64_t> v(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) v[i] = rows[i] * width;
  return v;
}

}  // namespace

std::unique_ptr<ExpertExchange::Pending> CommExpertExchange::all_to_all(Context ctx, const Tensor& in,
                                                                        const Tensor& out, const RowBlocks& send,
                                                                        const RowBlocks& recv) {
  DIFFMOE_CHECK(in.rank() == 2 && out.rank() == 2 && in.dim(1) == out.dim(1),
                "[expert parallel] all_to_all of {} into {}", in.describe(), out.describe());
  const int64_t width = in.dim(1);
  const std::vector<int64_t> sc = scaled(send.counts, width), so = scaled(send.offsets, width);
  const std::vector<int64_t> rc = scaled(recv.counts, width), ro = scaled(recv.offsets, width);
  return std::make_unique<WorkPending>(ep_->all_to_all_v(
      ctx, dist::AllToAllVArgs{
               .in = in, .out = out, .send_counts = sc, .send_offsets = so, .recv_counts = rc, .recv_offsets = ro}));
}

}  // namespace diffmoe
