// Perplexity on text: rolling windows score every token once with the context they promise, and
// the corpus metrics follow from the total log-likelihood (bits per byte = nats / ln 2 / bytes),
// checked against windows scored by hand with one f64 forward each.
#include <gtest/gtest.h>

#include <numbers>

#include "eval/perplexity.h"
#include "eval/rolling_windows.h"
#include "eval_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using eval::TokenWindow;

TEST(RollingWindows, DisjointAndSlidingByHand) {
  // stride = window: disjoint chunks, the last window right-aligned (lm-eval's rolling windows).
  EXPECT_EQ(eval::rolling_windows(10, 4, 4), (std::vector<TokenWindow>{{0, 4, 1}, {4, 8, 5}, {6, 10, 9}}));
  // stride 2: two new targets per window, after at least 2 tokens of context.
  EXPECT_EQ(eval::rolling_windows(10, 4, 2),
            (std::vector<TokenWindow>{{0, 2, 1}, {0, 4, 3}, {2, 6, 5}, {4, 8, 7}, {6, 10, 9}}));
  EXPECT_EQ(eval::rolling_windows(3, 8, 8), (std::vector<TokenWindow>{{0, 3, 1}}));
  EXPECT_THROW(eval::rolling_windows(10, 4, 5), Error);
  EXPECT_THROW(eval::rolling_windows(10, 4, 0), Error);
}

TEST(RollingWindows, EveryTargetOnceWithItsContext) {
  for (const int64_t n : {1, 2, 7, 16, 33})
    for (const int64_t window : {1, 3, 8})
      for (int64_t stride = 1; stride <= window; ++stride) {
        SCOPED_TRACE(testing::Message() << "n " << n << " window " << window << " stride " << stride);
        std::vector<int> seen(static_cast<size_t>(n + 1), 0);
        for (const TokenWindow& w : eval::rolling_windows(n, window, stride)) {
          ASSERT_LE(w.end - w.begin, window);
          ASSERT_GE(w.first_scored, w.begin + 1);
          for (int64_t t = w.first_scored; t <= w.end; ++t) {
            ++seen[static_cast<size_t>(t)];
            // Target t sees s[begin .. t − 1]: all of it or at least window − stride tokens.
            EXPECT_GE(t - w.begin, std::min(t, window - stride + 1));
          }
        }
        for (int64_t t = 1; t <= n; ++t) EXPECT_EQ(seen[static_cast<size_t>(t)], 1) << "target " << t;
      }
}

TEST(RollingWindows, RowsCarryThePrefixAndTheScoredTargets) {
  const std::vector<int32_t> doc = {10, 11, 12, 13, 14};
  const auto rows = eval::rolling_rows(doc, 99, 3, 3);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].inputs, (std::vector<int32_t>{99, 10, 11}));
  EXPECT_EQ(rows[0].targets, (std::vector<int32_t>{10, 11, 12}));
  EXPECT_EQ(rows[1].inputs, (std::vector<int32_t>{11, 12, 13}));  // right-aligned: s[2..4]
  EXPECT_EQ(rows[1].targets, (std::vector<int32_t>{-1, 13, 14}));
}

TEST(Perplexity, WordCount) {
  EXPECT_EQ(eval::count_words(""), 0);
  EXPECT_EQ(eval::count_words("  one two\tthree\n\nfour  "), 4);
  EXPECT_EQ(eval::count_words("na\xC3\xAFve caf\xC3\xA9"), 2);
}

// The known text: multi-byte UTF-8 (so bytes ≠ characters), 3 paragraphs, longer than a window.
const std::string kText =
    "Na\xC3\xAFve caf\xC3\xA9 owners serve cr\xC3\xA8me br\xC3\xBBl\xC3\xA9"
    "e at noon.\n\n"
    "The mill wheel turns; the river runs \xE2\x80\x94 slowly.\n\nEnd.\n";

// Σ over the document's windows of the hand-computed window log-likelihoods.
double reference_nats(Model& ref, const std::string& text, int64_t window, int64_t stride) {
  test::ByteTokenizer tok;
  double nats = 0;
  for (const eval::ScoreRow& row : eval::rolling_rows(tok.encode(text), test::ByteTokenizer::kEot, window, stride))
    nats -= test::reference_logprob(ref, row);
  return nats;
}

// The byte tokenizer has one token per byte, so tokens = bytes and bits per byte = loss / ln 2.
// Tolerance: f64 sums over ~100 tokens of O(10) values: 1e-9 relative.
TEST(Perplexity, BitsPerByteOfAKnownText) {
  CpuBackend be;
  test::ByteTokenizer tok;
  auto ref = test::eval_test_model(be, DType::kF64);
  auto model = test::eval_test_model(be, DType::kF64);
  const int64_t window = 32;
  const test::TempDir tmp;
  const auto file = tmp.write("known.txt", kText);
  ASSERT_GT(kText.size(), 2u * window);
  const int64_t bytes = static_cast<int64_t>(kText.size());
  model->set_batch_shape(3, window);
  eval::BatchScorer scorer(*model, 0);
  for (const int64_t stride : {window, int64_t{12}}) {
    SCOPED_TRACE(testing::Message() << "stride " << stride);
    const eval::PerplexityResult r = eval::evaluate_perplexity(
        scorer, tok, test::ByteTokenizer::kEot, std::vector{file}, eval::PerplexityOptions{.stride = stride});
    const double nats = reference_nats(*ref, kText, window, stride);
    EXPECT_EQ(r.docs, 1);
    EXPECT_EQ(r.tokens, bytes);
    EXPECT_EQ(r.bytes, bytes);
    EXPECT_EQ(r.words, eval::count_words(kText));
    EXPECT_EQ(r.windows, (bytes + stride - 1) / stride);
    EXPECT_NEAR(r.nats, nats, 1e-9 * nats);
    EXPECT_NEAR(r.loss(), nats / static_cast<double>(bytes), 1e-9);
    EXPECT_NEAR(r.bits_per_byte(), nats / std::numbers::ln2 / static_cast<double>(bytes), 1e-9);
    EXPECT_NEAR(r.bits_per_byte(), r.loss() / std::numbers::ln2, 1e-9) << "one token per byte";
    EXPECT_NEAR(r.byte_perplexity(), std::pow(2.0, r.bits_per_byte()), 1e-9 * r.byte_perplexity());
    EXPECT_NEAR(r.perplexity(), std::exp(r.loss()), 1e-9 * r.perplexity());
    EXPECT_NEAR(r.word_perplexity(), std::exp(nats / static_cast<double>(r.words)), 1e-9 * r.word_perplexity());
  }
}

// Several documents (a JSONL file and a plain-text file), --limit, and a short document scored the
// same for every stride (every window of it starts at its beginning).
TEST(Perplexity, DocumentsAcrossFilesAndLimit) {
  CpuBackend be;
  test::ByteTokenizer tok;
  auto ref = test::eval_test_model(be, DType::kF64);
  auto model = test::eval_test_model(be, DType::kF64);
  const int64_t window = 24;
  const std::vector<std::string> docs = {"short one", "A second document, a little longer than the window is.",
                                         "third"};
  std::string jsonl;
  for (const auto& d : docs) jsonl += nlohmann::json{{"body", d}}.dump() + "\n";
  const test::TempDir tmp;
  const auto f1 = tmp.write("docs.jsonl", jsonl), f2 = tmp.write("plain.txt", kText);
  model->set_batch_shape(2, window);
  eval::BatchScorer scorer(*model, 0);
  const auto run = [&](int64_t stride, int64_t limit) {
    return eval::evaluate_perplexity(scorer, tok, test::ByteTokenizer::kEot, std::vector{f1, f2},
                                     eval::PerplexityOptions{.stride = stride, .text_field = "body", .limit = limit});
  };
  const eval::PerplexityResult all = run(0, 0);
  double nats = reference_nats(*ref, kText, window, window);
  int64_t bytes = static_cast<int64_t>(kText.size());
  for (const auto& d : docs) nats += reference_nats(*ref, d, window, window), bytes += static_cast<int64_t>(d.size());
  EXPECT_EQ(all.docs, 4);
  EXPECT_EQ(all.bytes, bytes);
  EXPECT_NEAR(all.nats, nats, 1e-9 * nats);
  const eval::PerplexityResult two = run(0, 2);
  EXPECT_EQ(two.docs, 2);
  EXPECT_EQ(two.bytes, static_cast<int64_t>(docs[0].size() + docs[1].size()));
  const eval::PerplexityResult first = run(0, 1), first_s3 = run(3, 1);
  EXPECT_NEAR(first.nats, first_s3.nats, 1e-9 * first.nats)
      << "a document within one window scores the same for any stride";
  EXPECT_EQ(first_s3.windows, 3);
}

}  // namespace
}  // namespace diffmoe
