// AdamW over a Model's parameters (decoupled weight decay on matrices only — never on norms, λ
// vectors, biases or embeddings: ParamSpec::decayed), global-norm gradient clipping, and the
// once-per-step MoE balancing-bias update (spec §5). State: first and second moments in one arena
// with the parameters' names, plus the step count. No host synchronisation: the global norm stays
// on the device and the AdamW op reads it. All parameters are updated by one adamw_multi call (one
// launch on CUDA).
#pragma once
#include <string>

#include "model/model.h"
#include "train/train_config.h"

namespace diffmoe {

class AdamW {
 public:
  AdamW(Model& model, const OptimConfig& cfg);

  // One optimizer step at learning rate `lr`: compute_grad_sq() then apply().
  void step(Context ctx, double lr);
  // Σ g² over all gradients into grad_sq() — the global norm for clipping and logging.
  void compute_grad_sq(Context ctx);
  // With grad_sq() computed: clip by the global norm, update every trainable parameter, then the
  // balancing biases from this step's expert counts. Increments steps_taken().
  void apply(Context ctx, double lr);
  Tensor grad_sq() const { return state_.get("grad_sq"); }
  double grad_norm() const;  // downloads grad_sq (a host sync: logging only)

  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  Arena& state() { return state_; }  // "m.<name>", "v.<name>", "grad_sq"

  // The optimizer state as safetensors ("m.<name>", "v.<name>") and back (exact, f32/f64 as stored).
  void save(const std::string& path) const;
  void load(const std::string& path);

 private:
  Model* model_;
  OptimConfig cfg_;
  Arena state_;
  int64_t step_ = 0;
  AdamWMultiArgs multi_;  // apply()'s call, kept so that its entry list is not reallocated per step
};

}  // namespace diffmoe
