// Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores its
// `multiple_choice` tasks (HellaSwag, ARC, PIQA, ...).
//
// Each document has a context and N choices; request i is (context, target_delimiter + choice_i)
// and its score the sum of the continuation tokens' log-probabilities given the context:
//   ll_i     = Σ_{t ∈ continuation} log p(x_t | x_<t)
//   acc      = [argmax_i ll_i == gold]
//   acc_norm = [argmax_i ll_i / len(choice_i) == gold]
// len(choice) is lm-eval's Python len() of the choice text without the delimiter: its Unicode code
// points (the UTF-8 byte count for ASCII text). argmax takes the first of equal values (numpy).
//
// Tokenisation (lm-eval's _encode_pair): trailing whitespace of the context moves to the start of
// the continuation ("Answer: " + "Paris" → "Answer:" + " Paris"); then whole = encode(context +
// continuation), n = |encode(context)|, and the continuation tokens are whole[n:]; the context
// tokens whole[:n]. An empty context is the end-of-text token, the continuation encoded alone.
// A request longer than seq + 1 tokens loses tokens from the left (the continuation must fit).
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"
#include "eval/batch_scorer.h"

namespace diffmoe::eval {

struct McDoc {
  std::string context;               // the prompt, few-shot examples included
  std::vector<std::string> choices;  // the answers, without the target delimiter (never empty)
  int64_t gold = 0;                  // index into choices
  std::string where;                 // "file:line", for messages
};

struct EncodedPair {
  std::vector<int32_t> context, continuation;
};

// lm-eval's _encode_pair (above); `eot` stands for an empty context.
EncodedPair encode_pair(const data::Tokenizer& tokenizer, std::string_view context, std::string_view continuation,
                        int32_t eot);

// The scorer row of one request for sequences of `seq` positions: inputs (context + continuation)
// without its last token, left-truncated to seq; targets −1 except on the continuation.
ScoreRow loglikelihood_row(const EncodedPair& pair, int64_t seq, std::string_view where);

// lm-eval's len(choice): UTF-8 code points (lead bytes; an invalid byte counts as one).
int64_t choice_length(std::string_view choice);

// Index of the first largest value.
int64_t argmax(std::span<const double> values);

// Every request of a task, encoded.
struct McRequests {
  std::vector<EncodedPair> pairs;  // doc-major: doc 0's choices, then doc 1's, ...
  std::vector<size_t> first;       // first[d] = index of doc d's first request; first[docs] = pairs.size()
  int64_t longest = 0;             // most tokens of one request (context + continuation)
};
McRequests encode_requests(const data::Tokenizer& tokenizer, std::span<const McDoc> docs,
                           std::string_view target_delimiter, int32_t eot);

struct McDocScore {
  std::vector<double> loglikelihoods;  // one per choice
  int64_t pred = 0, pred_norm = 0;     // argmax of ll, of ll / len(choice)
  bool acc = false, acc_norm = false;
};

struct McResult {
  std::vector<McDocScore> docs;
  int64_t requests = 0;
  int64_t forwards = 0;
  std::vector<double> acc_values() const;  // 0/1 per document
  std::vector<double> acc_norm_values() const;
};

McResult score_multiple_choice(BatchScorer& scorer, std::span<const McDoc> docs, const McRequests& requests,
                               const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace diffmoe::eval
