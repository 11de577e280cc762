#include "eval/batch_scorer.h"

#include <algorithm>

#include "core/error.h"

namespace diffmoe::eval {

BatchScorer::BatchScorer(Model& model, int32_t pad_id)
    : model_(model), pad_id_(pad_id), batch_(model.batch()), seq_(model.seq()) {
  DIFFMOE_CHECK(batch_ > 0 && seq_ > 0, "[eval] the model has no batch shape (call set_batch_shape first)");
  DIFFMOE_CHECK(pad_id >= 0 && pad_id < model.config().vocab_size,
                "[eval] padding id {} is outside the model's vocabulary of {}", pad_id, model.config().vocab_size);
  const DType logits = model.logits().dtype;
  sum_dtype_ = logits == DType::kBF16 ? DType::kF32 : logits;  // op_args.h CrossEntropyFwdArgs
  dev_.add("tokens", Shape{batch_, seq_}, DType::kI32);
  dev_.add("targets", Shape{batch_, seq_}, DType::kI32);
  dev_.add("sums", Shape{batch_}, sum_dtype_);
  dev_.add("counts", Shape{batch_}, sum_dtype_);
  dev_.allocate(model.backend().allocator());
  host_tokens_.resize(static_cast<size_t>(batch_ * seq_));
  host_targets_.resize(host_tokens_.size());
}

namespace {

std::vector<double> download_values(Backend& be, const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kF64) {
    be.download(out.data(), t);
  } else {
    std::vector<float> f(out.size());
    be.download(f.data(), t);
    std::copy(f.begin(), f.end(), out.begin());
  }
  return out;
}

}  // namespace

std::vector<RowScore> BatchScorer::score(std::span<const ScoreRow> rows,
                                         const std::function<void(int64_t, int64_t)>& progress) {
  Backend& be = model_.backend();
  const int64_t vocab = model_.config().vocab_size;
  for (size_t i = 0; i < rows.size(); ++i) {
    const ScoreRow& r = rows[i];
    DIFFMOE_CHECK(!r.inputs.empty() && r.inputs.size() == r.targets.size(),
                  "[eval] row {}: {} inputs and {} targets (need as many, at least one)", i, r.inputs.size(),
                  r.targets.size());
    DIFFMOE_CHECK(static_cast<int64_t>(r.inputs.size()) <= seq_,
                  "[eval] row {}: {} tokens do not fit the sequence length {}", i, r.inputs.size(), seq_);
    for (size_t t = 0; t < r.inputs.size(); ++t)
      DIFFMOE_CHECK(r.inputs[t] >= 0 && r.inputs[t] < vocab && r.targets[t] >= -1 && r.targets[t] < vocab,
                    "[eval] row {} position {}: token {} / target {} outside the model's vocabulary of {}", i, t,
                    r.inputs[t], r.targets[t], vocab);
  }
  const Tensor tokens = dev_.get("tokens"), targets = dev_.get("targets"), sums = dev_.get("sums"),
               counts = dev_.get("counts");
  const Tensor logits = model_.logits();
  std::vector<RowScore> out(rows.size());
  const int64_t n = static_cast<int64_t>(rows.size());
  for (int64_t first = 0; first < n; first += batch_) {
    const int64_t used = std::min(batch_, n - first);
    std::fill(host_tokens_.begin(), host_tokens_.end(), pad_id_);
    std::fill(host_targets_.begin(), host_targets_.end(), -1);
    for (int64_t b = 0; b < used; ++b) {
      const ScoreRow& r = rows[static_cast<size_t>(first + b)];
      std::copy(r.inputs.begin(), r.inputs.end(), host_tokens_.begin() + b * seq_);
      std::copy(r.targets.begin(), r.targets.end(), host_targets_.begin() + b * seq_);
    }
    be.upload(tokens, host_tokens_.data());
    be.upload(targets, host_targets_.data());
    model_.forward({}, tokens, Tensor{});  // logits only
    be.fill({}, {.out = sums, .value = 0.0});
    be.fill({}, {.out = counts, .value = 0.0});
    for (int64_t b = 0; b < used; ++b)
      be.cross_entropy_fwd({}, {.loss_sum = sums.rows(b, b + 1),
                                .valid = counts.rows(b, b + 1),
                                .logits = logits.rows(b * seq_, (b + 1) * seq_),
                                .targets = targets[b]});
    const std::vector<double> s = download_values(be, sums), c = download_values(be, counts);
    for (int64_t b = 0; b < used; ++b)
      out[static_cast<size_t>(first + b)] =
          RowScore{.logprob = -s[static_cast<size_t>(b)], .tokens = static_cast<int64_t>(c[static_cast<size_t>(b)])};
    ++forwards_;
    if (progress) progress(first + used, n);
  }
  return out;
}

}  // namespace diffmoe::eval
