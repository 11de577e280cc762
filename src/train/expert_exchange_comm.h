// The model's ExpertExchange (model/expert_exchange.h) on a communicator: the expert-parallel
// group's all_to_all_v (dist/communicator.h), rows converted to elements.
#pragma once
#include "dist/communicator.h"
#include "model/expert_exchange.h"

namespace diffmoe {

class CommExpertExchange final : public ExpertExchange {
 public:
  explicit CommExpertExchange(dist::Communicator& ep) : ep_(&ep) {}
  int size() const override { return ep_->size(); }
  int rank() const override { return ep_->rank(); }
  std::unique_ptr<Pending> all_to_all(Context ctx, const Tensor& in, const Tensor& out, const RowBlocks& send,
                                      const RowBlocks& recv) override;

 private:
  dist::Communicator* ep_;
};

}  // namespace diffmoe
