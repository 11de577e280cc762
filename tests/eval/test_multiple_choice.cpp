// Multiple-choice scoring as lm-evaluation-harness does it: request tokenisation (encode the
// concatenation, split at the context's token count, trailing whitespace moved to the
// continuation), left truncation, len(choice) in code points, and acc / acc_norm against
// log-likelihoods computed here from one f64 forward per request.
#include <gtest/gtest.h>

#include "data/tokenizer.h"
#include "eval/multiple_choice.h"
#include "eval_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using eval::EncodedPair;
using eval::McDoc;
using Ids = std::vector<int32_t>;

std::unique_ptr<data::Tokenizer> gpt2() {
  const auto path = std::filesystem::path(DIFFMOE_REPO_DIR) / "data" / "vocab" / "gpt2.tiktoken";
  if (!std::filesystem::exists(path)) return nullptr;
  return data::load_tokenizer(path);
}

TEST(EncodePair, SplitsTheConcatenationAtTheContextsTokenCount) {
  const auto tok = gpt2();
  ASSERT_NE(tok, nullptr) << "data/vocab/gpt2.tiktoken is missing: copy data/vocab from the main checkout";
  // GPT-2 encodes "Hello world" as "Hello" + " world": the space belongs to the next word.
  const Ids hello = tok->encode("Hello"), space_world = tok->encode(" world");
  ASSERT_EQ(hello.size(), 1u);
  ASSERT_EQ(space_world.size(), 1u);
  // The context's trailing space moves to the continuation: "Hello " + "world" scores " world",
  // the token the model would emit, not "world" after a lone " " token.
  EncodedPair p = eval::encode_pair(*tok, "Hello ", "world", 50256);
  EXPECT_EQ(p.context, hello);
  EXPECT_EQ(p.continuation, space_world);
  p = eval::encode_pair(*tok, "Hello", " world", 50256);
  EXPECT_EQ(p.context, hello);
  EXPECT_EQ(p.continuation, space_world);
  // Trailing newlines move too (Python's rstrip()).
  p = eval::encode_pair(*tok, "Question: 2+2?\nAnswer:\n", "4", 50256);
  EXPECT_EQ(p.context, tok->encode("Question: 2+2?\nAnswer:"));
  const Ids whole = tok->encode("Question: 2+2?\nAnswer:\n4");
  EXPECT_EQ(p.continuation, Ids(whole.begin() + static_cast<std::ptrdiff_t>(p.context.size()), whole.end()));
  // Where BPE merges across the boundary the split is still at |encode(context)|: "Hello wor" is
  // [Hello, " wor"], "Hello world!" is [Hello, " world", "!"], so the continuation "ld!" scores
  // only "!" (its "ld" went into " world"), not encode("ld!") = ["ld", "!"]; and "7" + "77" is
  // [..., " 777"] against [..., " 7"]: nothing is left to score (lm-eval's empty continuation).
  p = eval::encode_pair(*tok, "Hello wor", "ld!", 50256);
  EXPECT_EQ(p.context, (Ids{15496, 995}));
  EXPECT_EQ(p.continuation, tok->encode("!"));
  EXPECT_NE(p.continuation, tok->encode("ld!"));
  p = eval::encode_pair(*tok, "3 + 4 = 7", "77", 50256);
  EXPECT_EQ(p.context, tok->encode("3 + 4 = 777"));
  EXPECT_TRUE(p.continuation.empty());
  // An empty context is the end-of-text token.
  p = eval::encode_pair(*tok, "", " world", 50256);
  EXPECT_EQ(p.context, Ids{50256});
  EXPECT_EQ(p.continuation, space_world);
}

TEST(LoglikelihoodRow, TargetsOnTheContinuationAndLeftTruncation) {
  const EncodedPair p{.context = {1, 2, 3, 4}, .continuation = {5, 6}};
  eval::ScoreRow r = eval::loglikelihood_row(p, 10, "x");
  EXPECT_EQ(r.inputs, (Ids{1, 2, 3, 4, 5}));
  EXPECT_EQ(r.targets, (Ids{-1, -1, -1, 5, 6}));
  // (ctx + cont)[-(seq + 1):][:-1] with seq = 3: inputs 3 4 5, targets of 4 5 6 scored from 5 on.
  r = eval::loglikelihood_row(p, 3, "x");
  EXPECT_EQ(r.inputs, (Ids{3, 4, 5}));
  EXPECT_EQ(r.targets, (Ids{-1, 5, 6}));
  r = eval::loglikelihood_row(p, 2, "x");
  EXPECT_EQ(r.inputs, (Ids{4, 5}));
  EXPECT_EQ(r.targets, (Ids{5, 6}));
  try {
    eval::loglikelihood_row(p, 1, "tasks.jsonl:7");
    ADD_FAILURE() << "a continuation longer than the sequence must be an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tasks.jsonl:7: the answer is 2 tokens"), std::string::npos) << e.what();
  }
}

TEST(ChoiceLength, CountsCodePointsAsPythonLen) {
  EXPECT_EQ(eval::choice_length("abc"), 3);
  EXPECT_EQ(eval::choice_length("caf\xC3\xA9"), 4);               // café: 5 bytes
  EXPECT_EQ(eval::choice_length("\xE6\x97\xA5\xE6\x9C\xAC"), 2);  // 日本: 6 bytes
  EXPECT_EQ(eval::choice_length("\xF0\x9F\x98\x80!"), 2);         // 😀!: 5 bytes
  EXPECT_EQ(eval::argmax(std::vector<double>{-3, -1, -2, -1}), 1) << "the first of equal values, as numpy";
}

// The documents' lls from one f64 forward per request (the reference of eval_test_util.h).
std::vector<std::vector<double>> reference_lls(Model& ref, const data::Tokenizer& tok, const std::vector<McDoc>& docs,
                                               int64_t seq) {
  std::vector<std::vector<double>> out;
  for (const McDoc& d : docs) {
    std::vector<double> lls;
    for (const std::string& c : d.choices)
      lls.push_back(test::reference_logprob(
          ref, eval::loglikelihood_row(eval::encode_pair(tok, d.context, " " + c, 256), seq, d.where)));
    out.push_back(lls);
  }
  return out;
}

std::vector<double> normalised(const std::vector<double>& lls, const McDoc& d) {
  std::vector<double> n;
  for (size_t i = 0; i < lls.size(); ++i) n.push_back(lls[i] / static_cast<double>(eval::choice_length(d.choices[i])));
  return n;
}

// acc and acc_norm on documents whose answers differ in length: the tests first compute every
// request's log-likelihood by hand, pick documents where argmax ll and argmax ll/len(choice)
// disagree, and set the gold answer to one or the other, so acc and acc_norm must differ there.
TEST(MultipleChoice, AccAndAccNormFromHandComputedLoglikelihoods) {
  CpuBackend be;
  test::ByteTokenizer tok;
  auto ref = test::eval_test_model(be, DType::kF64);
  auto model = test::eval_test_model(be, DType::kF64);
  const int64_t seq = 40;
  const std::vector<std::string> contexts = {"The cat sat on the", "Water boils at", "My favourite colour is ",
                                             "One two three",      "Answer:",        "She opened the door and"};
  const std::vector<std::vector<std::string>> choice_sets = {
      {"a", "mat by the fire", "xq"}, {"hot", "one hundred degrees", "z"}, {"blue", "b", "a very bright red"},
      {"four five six", "4", "fore"}, {"yes", "no", "maybe not today"},    {"left", "walked into the garden", "s"}};
  std::vector<McDoc> candidates;
  for (size_t i = 0; i < contexts.size(); ++i)
    candidates.push_back(
        McDoc{.context = contexts[i], .choices = choice_sets[i], .gold = 0, .where = "doc" + std::to_string(i)});
  const auto lls = reference_lls(*ref, tok, candidates, seq);
  std::vector<McDoc> docs;
  std::vector<std::vector<double>> want;
  bool gold_is_raw = true;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const int64_t raw = eval::argmax(lls[i]), norm = eval::argmax(normalised(lls[i], candidates[i]));
    if (raw == norm) continue;
    McDoc d = candidates[i];
    d.gold = gold_is_raw ? raw : norm;  // alternate: acc right / acc_norm wrong, then the reverse
    gold_is_raw = !gold_is_raw;
    docs.push_back(d);
    want.push_back(lls[i]);
  }
  ASSERT_GE(docs.size(), 2u)
      << "the candidate documents must contain cases where length normalisation changes the answer";
  // One document whose choices have equal lengths (so ll and ll/len agree), with a wrong gold:
  // acc = acc_norm = 0.
  McDoc same{.context = "Pick one:", .choices = {"red", "tan", "sky"}, .gold = 0, .where = "equal lengths"};
  const std::vector<double> same_lls = reference_lls(*ref, tok, {same}, seq)[0];
  same.gold = (eval::argmax(same_lls) + 1) % 3;
  docs.push_back(same);
  want.push_back(same_lls);

  model->set_batch_shape(4, seq);
  eval::BatchScorer scorer(*model, 0);
  const eval::McRequests req = eval::encode_requests(tok, docs, " ", test::ByteTokenizer::kEot);
  const eval::McResult r = eval::score_multiple_choice(scorer, docs, req);
  ASSERT_EQ(r.docs.size(), docs.size());
  EXPECT_EQ(r.requests, static_cast<int64_t>(req.pairs.size()));
  EXPECT_EQ(r.forwards, (r.requests + 3) / 4);
  for (size_t d = 0; d < docs.size(); ++d) {
    SCOPED_TRACE(docs[d].where);
    ASSERT_EQ(r.docs[d].loglikelihoods.size(), want[d].size());
    for (size_t i = 0; i < want[d].size(); ++i)
      EXPECT_NEAR(r.docs[d].loglikelihoods[i], want[d][i], 1e-10 * (1 + std::abs(want[d][i])));
    const int64_t raw = eval::argmax(want[d]), norm = eval::argmax(normalised(want[d], docs[d]));
    EXPECT_EQ(r.docs[d].pred, raw);
    EXPECT_EQ(r.docs[d].pred_norm, norm);
    EXPECT_EQ(r.docs[d].acc, raw == docs[d].gold);
    EXPECT_EQ(r.docs[d].acc_norm, norm == docs[d].gold);
  }
  // The built cases: doc 0 acc right and acc_norm wrong, doc 1 the reverse, the last both wrong.
  EXPECT_TRUE(r.docs[0].acc);
  EXPECT_FALSE(r.docs[0].acc_norm);
  EXPECT_FALSE(r.docs[1].acc);
  EXPECT_TRUE(r.docs[1].acc_norm);
  EXPECT_FALSE(r.docs.back().acc);
  EXPECT_FALSE(r.docs.back().acc_norm);
  const std::vector<double> acc = r.acc_values(), acc_norm = r.acc_norm_values();
  EXPECT_EQ(acc.size(), docs.size());
  EXPECT_NE(acc, acc_norm);
}

TEST(MultipleChoice, BadDocumentsAreErrors) {
  test::ByteTokenizer tok;
  const auto fails = [&](const McDoc& d, const std::string& needle) {
    try {
      eval::encode_requests(tok, std::vector<McDoc>{d}, " ", test::ByteTokenizer::kEot);
      ADD_FAILURE() << "no error: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  fails(McDoc{.context = "c", .choices = {"a", "b"}, .gold = 2, .where = "f.jsonl:3"},
        "f.jsonl:3: the answer index 2 is not one of the 2 choices");
  fails(McDoc{.context = "c", .choices = {}, .gold = 0, .where = "f.jsonl:4"}, "f.jsonl:4: no choices");
  fails(McDoc{.context = "c", .choices = {"a", ""}, .gold = 0, .where = "f.jsonl:5"}, "f.jsonl:5: an empty choice");
}

}  // namespace
}  // namespace diffmoe
