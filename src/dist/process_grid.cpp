#include "dist/process_grid.h"

#include "core/error.h"

namespace diffmoe::dist {

ProcessGrid::ProcessGrid(Communicator& world, int ep_size) : world_(&world), ep_size_(ep_size) {
  DIFFMOE_CHECK(
      ep_size >= 1 && world.size() % ep_size == 0,
      "[dist] expert-parallel degree {} does not divide the world size {} (docs/model.md §12: world = DP x EP)",
      ep_size, world.size());
  // Every rank makes both splits in the same order (splits are collective over the world).
  dp_ = world.split(/*color=*/ep_rank(), /*key=*/dp_rank(), "dp");
  ep_ = world.split(/*color=*/dp_rank(), /*key=*/ep_rank(), "ep");
  DIFFMOE_CHECK(
      dp_->size() == dp_size() && dp_->rank() == dp_rank() && ep_->size() == ep_size_ && ep_->rank() == ep_rank(),
      "[dist] process grid: split gave dp {}/{} and ep {}/{}, expected {}/{} and {}/{}", dp_->rank(), dp_->size(),
      ep_->rank(), ep_->size(), dp_rank(), dp_size(), ep_rank(), ep_size_);
}

std::vector<int> ProcessGrid::dp_group() const {
  std::vector<int> r;
  for (int d = 0; d < dp_size(); ++d) r.push_back(rank_of(d, ep_rank(), ep_size_));
  return r;
}

std::vector<int> ProcessGrid::ep_group() const {
  std::vector<int> r;
  for (int e = 0; e < ep_size_; ++e) r.push_back(rank_of(dp_rank(), e, ep_size_));
  return r;
}

}  // namespace diffmoe::dist
