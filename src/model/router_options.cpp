#include "model/router_options.h"

namespace diffmoe {

RouterOptions router_options(const ModelConfig& c) {
  return RouterOptions{.score_func = c.score_func,
                       .n_groups = c.n_expert_groups,
                       .n_limited_groups = c.n_limited_groups,
                       .top_k = c.n_activated_experts,
                       .route_scale = c.route_scale,
                       .use_bias = c.balance_bias};
}

}  // namespace diffmoe
