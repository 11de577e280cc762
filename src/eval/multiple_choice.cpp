#include "eval/multiple_choice.h"

#include <algorithm>

#include "core/error.h"

namespace diffmoe::eval {

namespace {

// Python's str.isspace() over ASCII (rstrip() without arguments strips these).
bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r' || (c >= '\x1c' && c <= '\x1f');
}

}  // namespace

EncodedPair encode_pair(const data::Tokenizer& tokenizer, std::string_view context, std::string_view continuation,
                        int32_t eot) {
  EncodedPair p;
  if (context.empty()) {
    p.context = {eot};
    p.continuation = tokenizer.encode(continuation);
    return p;
  }
  size_t keep = context.size();
  while (keep > 0 && is_space(context[keep - 1])) --keep;
  const std::string ctx(context.substr(0, keep));
  const std::string cont = std::string(context.substr(keep)) + std::string(continuation);
  const std::vector<int32_t> whole = tokenizer.encode(ctx + cont);
  const size_t n = std::min(tokenizer.encode(ctx).size(), whole.size());
  p.context.assign(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(n));
  p.continuation.assign(whole.begin() + static_cast<std::ptrdiff_t>(n), whole.end());
  return p;
}

ScoreRow loglikelihood_row(const EncodedPair& pair, int64_t seq, std::string_view where) {
  const int64_t n_cont = static_cast<int64_t>(pair.continuation.size());
  DIFFMOE_CHECK(n_cont <= seq, "{}: the answer is {} tokens, more than the sequence length {}", where, n_cont, seq);
  std::vector<int32_t> whole = pair.context;
  whole.insert(whole.end(), pair.continuation.begin(), pair.continuation.end());
  const int64_t total = static_cast<int64_t>(whole.size());
  const int64_t start = std::max<int64_t>(0, total - (seq + 1));  // (ctx + cont)[-(seq + 1):]
  ScoreRow r;
  for (int64_t i = start; i + 1 < total; ++i) {
    r.inputs.push_back(whole[static_cast<size_t>(i)]);
    r.targets.push_back(i + 1 >= total - n_cont ? whole[static_cast<size_t>(i + 1)] : -1);
  }
  if (r.inputs.empty()) {  // a lone token (empty continuation of a one-token context): nothing to score
    r.inputs.push_back(whole.back());
    r.targets.push_back(-1);
  }
  return r;
}

int64_t choice_length(std::string_view choice) {
  int64_t n = 0;
  for (const char c : choice) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
  return n;
}

int64_t argmax(std::span<const double> values) {
  DIFFMOE_CHECK(!values.empty(), "[eval] argmax of nothing");
  int64_t best = 0;
  for (size_t i = 1; i < values.size(); ++i)
    if (values[i] > values[static_cast<size_t>(best)]) best = static_cast<int64_t>(i);
  return best;
}

McRequests encode_requests(const data::Tokenizer& tokenizer, std::span<const McDoc> docs,
                           std::string_view target_delimiter, int32_t eot) {
  McRequests r;
  for (const McDoc& d : docs) {
    DIFFMOE_CHECK(!d.choices.empty(), "{}: no choices", d.where);
    DIFFMOE_CHECK(d.gold >= 0 && d.gold < static_cast<int64_t>(d.choices.size()),
                  "{}: the answer index {} is not one of the {} choices", d.where, d.gold, d.choices.size());
    r.first.push_back(r.pairs.size());
    for (const std::string& c : d.choices) {
      DIFFMOE_CHECK(!c.empty(), "{}: an empty choice (acc_norm divides by its length)", d.where);
      EncodedPair p = encode_pair(tokenizer, d.context, std::string(target_delimiter) + c, eot);
      r.longest = std::max<int64_t>(r.longest, static_cast<int64_t>(p.context.size() + p.continuation.size()));
      r.pairs.push_back(std::move(p));
    }
  }
  r.first.push_back(r.pairs.size());
  return r;
}

std::vector<double> McResult::acc_values() const {
  std::vector<double> v;
  for (const McDocScore& d : docs) v.push_back(d.acc ? 1.0 : 0.0);
  return v;
}

std::vector<double> McResult::acc_norm_values() const {
  std::vector<double> v;
  for (const McDocScore& d : docs) v.push_back(d.acc_norm ? 1.0 : 0.0);
  return v;
}

McResult score_multiple_choice(BatchScorer& scorer, std::span<const McDoc> docs, const McRequests& requests,
                               const std::function<void(int64_t, int64_t)>& progress) {
  DIFFMOE_CHECK(requests.first.size() == docs.size() + 1, "[eval] {} documents but requests for {}", docs.size(),
                requests.first.size() - 1);
  std::vector<ScoreRow> rows;
  rows.reserve(requests.pairs.size());
  for (size_t d = 0; d < docs.size(); ++d)
    for (size_t i = requests.first[d]; i < requests.first[d + 1]; ++i)
      rows.push_back(loglikelihood_row(requests.pairs[i], scorer.seq(), docs[d].where));
  const int64_t forwards0 = scorer.forwards();
  const std::vector<RowScore> scores = scorer.score(rows, progress);
  McResult r;
  r.requests = static_cast<int64_t>(rows.size());
  r.forwards = scorer.forwards() - forwards0;
  for (size_t d = 0; d < docs.size(); ++d) {
    McDocScore s;
    std::vector<double> normed;
    for (size_t i = requests.first[d]; i < requests.first[d + 1]; ++i) {
      const double ll = scores[i].logprob;
      s.loglikelihoods.push_back(ll);
      normed.push_back(ll / static_cast<double>(choice_length(docs[d].choices[i - requests.first[d]])));
    }
    s.pred = argmax(s.loglikelihoods);
    s.pred_norm = argmax(normed);
    s.acc = s.pred == docs[d].gold;
    s.acc_norm = s.pred_norm == docs[d].gold;
    r.docs.push_back(std::move(s));
  }
  return r;
}

}  // namespace diffmoe::eval
