#include "train/evaluator.h"

#include <cmath>

namespace diffmoe {

EvalResult evaluate(Model& model, data::TokenLoader& loader, int64_t max_batches) {
  Backend& be = model.backend();
  Arena io;
  io.add("host.inputs", Shape{model.batch(), model.seq()}, DType::kI32);
  io.add("host.targets", Shape{model.batch(), model.seq()}, DType::kI32);
  io.allocate(cpu_allocator());
  Arena dev;
  dev.add("inputs", Shape{model.batch(), model.seq()}, DType::kI32);
  dev.add("targets", Shape{model.batch(), model.seq()}, DType::kI32);
  dev.allocate(be.allocator());

  loader.reset();
  double loss_sum = 0;
  int64_t tokens = 0, batches = 0;
  while ((max_batches <= 0 || batches < max_batches) && loader.next(io.get("host.inputs"), io.get("host.targets"))) {
    be.upload(dev.get("inputs"), io.get("host.inputs").data);
    be.upload(dev.get("targets"), io.get("host.targets").data);
    model.forward({}, dev.get("inputs"), dev.get("targets"));
    const LossValues l = model.losses();
    loss_sum += l.lm_loss * static_cast<double>(l.valid);
    tokens += l.valid;
    ++batches;
  }
  EvalResult r;
  r.tokens = tokens;
  r.batches = batches;
  r.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::nan("");
  r.perplexity = std::exp(r.loss);
  return r;
}

}  // namespace diffmoe
