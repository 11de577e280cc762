// The finite check of the training state (weights and AdamW moments) before a checkpoint is
// written and after one is loaded: a checkpoint that holds NaN or ±inf is never written, `latest`
// never moves to one, and "the last good checkpoint" in messages is always one that passed.
// One count_nonfinite per arena (its flat view, one launch on CUDA) into a device counter; the
// host reads the two counts once. Only when they are not zero is every tensor counted on its
// own, to name the first bad one.
#pragma once
#include <optional>
#include <string>

#include "core/arena.h"
#include "model/model.h"
#include "train/optimizer.h"

namespace diffmoe {

struct NonFiniteState {
  int64_t weights = 0;    // non-finite values among the model's parameters (balancing biases included)
  int64_t optimizer = 0;  // ... among the AdamW moments
  std::string first;      // the first tensor holding one, e.g. "layers.1.ffn.gate.bias" or "v.embed.weight"
  // "12 non-finite values in the weights (first in 'layers.1.ffn.gate.bias') and 0 in the optimizer state"
  std::string describe() const;
};

class FiniteCheck {
 public:
  FiniteCheck(Model& model, AdamW& optim);
  // nullopt when every weight and moment is finite. Synchronises the host with the device once.
  std::optional<NonFiniteState> find(Context ctx);

 private:
  int64_t count(Context ctx, const Tensor& x);  // one tensor on its own (the failure path)

  Model* model_;
  AdamW* optim_;
  Arena counts_;  // "weights", "optimizer", "one": [1] i64 on the backend
};

}  // namespace diffmoe
