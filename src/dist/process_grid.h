// The data-parallel x expert-parallel grid of docs/model.md §12: world = DP x EP ranks, EP innermost (a node
// holds whole EP groups when EP divides the ranks per node).
//
//   rank    = dp_rank · ep_size + ep_rank        ep_rank = rank % ep_size, dp_rank = rank / ep_size
//   ep group of rank: the ep_size consecutive ranks [dp_rank · ep_size, (dp_rank + 1) · ep_size),
//           ranked by ep_rank. Experts are split over it (rank e holds routed experts
//           [e·E/ep_size, (e+1)·E/ep_size)); the all_to_all_v dispatch/combine runs on it.
//   dp group of rank: the dp_size ranks with the same ep_rank, {ep_rank + d · ep_size : d < dp_size},
//           ranked by dp_rank. Expert weights (replicated only across it) are reduced over it.
//   world:  everything else (attention, norms, embeddings, router: replicated over DP and EP) is
//           reduced over all ranks.
// Example, 8 ranks, EP 4: ep groups {0,1,2,3} {4,5,6,7}; dp groups {0,4} {1,5} {2,6} {3,7}.
#pragma once
#include <memory>
#include <vector>

#include "dist/communicator.h"

namespace diffmoe::dist {

class ProcessGrid {
 public:
  // Collective over `world` (two splits). ep_size must divide world.size(). `world` must outlive
  // the grid.
  ProcessGrid(Communicator& world, int ep_size);

  static int rank_of(int dp_rank, int ep_rank, int ep_size) { return dp_rank * ep_size + ep_rank; }

  int rank() const { return world_->rank(); }
  int world_size() const { return world_->size(); }
  int ep_size() const { return ep_size_; }
  int dp_size() const { return world_->size() / ep_size_; }
  int ep_rank() const { return rank() % ep_size_; }
  int dp_rank() const { return rank() / ep_size_; }

  Communicator& world() const { return *world_; }
  Communicator& dp() const { return *dp_; }  // named "dp"
  Communicator& ep() const { return *ep_; }  // named "ep"

  // World ranks of this rank's groups, in group-rank order.
  std::vector<int> dp_group() const;
  std::vector<int> ep_group() const;

 private:
  Communicator* world_;
  int ep_size_;
  std::unique_ptr<Communicator> dp_;
  std::unique_ptr<Communicator> ep_;
};

}  // namespace diffmoe::dist
