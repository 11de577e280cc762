#include "dist/device_world.h"

#include "core/error.h"
#include "dist/single_rank_communicator.h"
#ifdef DIFFMOE_HAVE_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace diffmoe::dist {

DeviceWorld::DeviceWorld(DistContext& dist, Backend& backend, int device) {
  if (backend.device() == Device::kCPU) {
    comm_ = &dist.cpu_world();
    return;
  }
  if (dist.world_size() == 1) {
    owned_ = std::make_unique<SingleRankCommunicator>("world", &backend);
    comm_ = owned_.get();
    return;
  }
#ifdef DIFFMOE_HAVE_NCCL
  owned_ = make_nccl_world(dist, device);
  comm_ = owned_.get();
#else
  (void)device;
  DIFFMOE_FAIL("[dist] {} ranks on the {} backend need NCCL, which this binary was built without", dist.world_size(),
               backend.name());
#endif
}

}  // namespace diffmoe::dist
