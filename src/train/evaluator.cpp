#include "train/evaluator.h"

#include <cmath>

#include "train/token_buffers.h"

namespace diffmoe {

EvalResult evaluate(Model& model, data::TokenLoader& loader, int64_t max_batches, int rank, int world) {
  Backend& be = model.backend();
  TokenBuffers tb(be, model.batch(), model.seq());
  loader.reset();
  double loss_sum = 0;
  int64_t tokens = 0, batches = 0;
  for (int64_t b = 0; max_batches <= 0 || b < max_batches; ++b) {
    const bool mine = b % world == rank;
    if (!(mine ? tb.next(loader, be) : tb.skip(loader))) break;
    if (!mine) continue;
    model.forward({}, tb.inputs(), tb.targets());
    const LossValues l = model.losses();
    loss_sum += l.lm_loss * static_cast<double>(l.valid);
    tokens += l.valid;
    ++batches;
  }
  EvalResult r;
  r.loss_sum = loss_sum;
  r.tokens = tokens;
  r.batches = batches;
  r.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::nan("");
  r.perplexity = std::exp(r.loss);
  return r;
}

}  // namespace diffmoe
