// A model config's router options (docs/model.md §5): the training layers, the generator and the
// serving engine route with the same ones.
#pragma once
#include "backend/op_args.h"
#include "model/config.h"

namespace diffmoe {

RouterOptions router_options(const ModelConfig& c);

}  // namespace diffmoe
