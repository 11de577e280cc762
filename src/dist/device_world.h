// The world communicator on a backend's memory, for the training loop: the CPU backend uses the
// DistContext's host world (single rank, MPI or Gloo); the CUDA backend uses NCCL on its device
// when there are several ranks, and a single-rank communicator that copies on the backend's
// streams when there is one (no NCCL communicator is made for a world of one).
#pragma once
#include <memory>

#include "backend/backend.h"
#include "dist/dist_context.h"

namespace diffmoe::dist {

class DeviceWorld {
 public:
  // device: the CUDA device the backend uses (launch.local_rank); ignored on the CPU.
  DeviceWorld(DistContext& dist, Backend& backend, int device);
  Communicator& comm() const { return *comm_; }

 private:
  std::unique_ptr<Communicator> owned_;
  Communicator* comm_ = nullptr;
};

}  // namespace diffmoe::dist
