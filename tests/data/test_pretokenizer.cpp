// PCRE2 pre-tokenizer and UTF-8 run splitting (docs/formats.md §1c "PCRE2 details").
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "data/pretokenizer.h"

namespace diffmoe::data {
namespace {

std::vector<std::string> split(const Pretokenizer& pre, std::string_view text) {
  std::vector<std::string> out;
  Pretokenizer::Matches m(pre, text);
  size_t b = 0, e = 0;
  while (m.next(&b, &e)) out.emplace_back(text.substr(b, e - b));
  return out;
}

using V = std::vector<std::string>;

TEST(Pretokenizer, AllNamedPatternsCompile) {
  for (const char* n : {"gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base", "gpt2_legacy", "cl100k_legacy"})
    EXPECT_NO_THROW(Pretokenizer{pattern_by_name(n)}) << n;
  EXPECT_THROW(pattern_by_name("nope"), Error);
  EXPECT_THROW(Pretokenizer("(unclosed"), Error);
}

TEST(Pretokenizer, Gpt2Splits) {
  const Pretokenizer pre(patterns::kR50k);
  EXPECT_EQ(split(pre, "Hello world's  end"), (V{"Hello", " world", "'s", " ", " end"}));
  EXPECT_EQ(split(pre, "x   "), (V{"x", "   "}));  // \s++$ keeps trailing whitespace whole
  EXPECT_EQ(split(pre, "12ab!!"), (V{"12", "ab", "!!"}));
  EXPECT_TRUE(split(pre, "").empty());
}

TEST(Pretokenizer, Cl100kSplitsAndCaseInsensitiveContractions) {
  const Pretokenizer pre(patterns::kCl100k);
  EXPECT_EQ(split(pre, "DON'T 12345"), (V{"DON", "'T", " ", "123", "45"}));
  EXPECT_EQ(split(pre, "a\r\nb"), (V{"a", "\r\n", "b"}));
}

TEST(Pretokenizer, UcpMakesNbspWhitespace) {
  // Without PCRE2_UCP, \s misses U+00A0 and the split differs from tiktoken (docs/formats.md §1c).
  const Pretokenizer pre(patterns::kR50k);
  EXPECT_EQ(split(pre, "a\xc2\xa0 b"), (V{"a", "\xc2\xa0", " b"}));
  // \s+(?!\S) leaves the last NBSP for \s; without UCP both would be one [^\s\p{L}\p{N}]++ piece.
  EXPECT_EQ(split(pre, "x\xc2\xa0\xc2\xa0y"), (V{"x", "\xc2\xa0", "\xc2\xa0", "y"}));
}

TEST(Pretokenizer, LongRunsDoNotOverflow) {
  const Pretokenizer pre(patterns::kCl100k);
  const std::string text = std::string(1 << 20, ' ') + "x" + std::string(1 << 20, 'y');
  const V parts = split(pre, text);
  size_t total = 0;
  for (const auto& p : parts) total += p.size();
  EXPECT_EQ(total, text.size());
}

TEST(Pretokenizer, SharedAcrossThreads) {
  const Pretokenizer pre(patterns::kO200k);
  const std::string text = "Some text, with punctuation! And numbers 12345 and \xe4\xb8\xad\xe6\x96\x87.";
  const V want = split(pre, text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      bool same = true;
      for (int i = 0; i < 200; ++i) same = same && split(pre, text) == want;
      ok[t] = same ? 1 : 0;
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ok[t], 1) << t;
}

TEST(Utf8, SequenceLengthFollowsRfc3629) {
  EXPECT_EQ(utf8_sequence_length("a"), 1u);
  EXPECT_EQ(utf8_sequence_length("\xc3\xa9"), 2u);
  EXPECT_EQ(utf8_sequence_length("\xe4\xb8\xad"), 3u);
  EXPECT_EQ(utf8_sequence_length("\xf0\x9f\x98\x80"), 4u);
  EXPECT_EQ(utf8_sequence_length("\xc0\xaf"), 0u);          // overlong
  EXPECT_EQ(utf8_sequence_length("\xe0\x80\xaf"), 0u);      // overlong
  EXPECT_EQ(utf8_sequence_length("\xed\xa0\x80"), 0u);      // surrogate
  EXPECT_EQ(utf8_sequence_length("\xf4\x90\x80\x80"), 0u);  // > U+10FFFF
  EXPECT_EQ(utf8_sequence_length("\xe4\xb8"), 0u);          // truncated
  EXPECT_EQ(utf8_sequence_length("\x80"), 0u);              // lone continuation
}

TEST(Utf8, RunsCoverTextExactly) {
  const std::string text =
      "ab\xff\xfe"
      "c\xc3\xa9\xe4\xb8"
      "d\x80";
  std::vector<std::pair<std::string, bool>> runs;
  for_each_utf8_run(text, [&](std::string_view r, bool valid) { runs.emplace_back(std::string(r), valid); });
  const std::vector<std::pair<std::string, bool>> want = {{"ab", true},        {"\xff\xfe", false}, {"c\xc3\xa9", true},
                                                          {"\xe4\xb8", false}, {"d", true},         {"\x80", false}};
  EXPECT_EQ(runs, want);
}

}  // namespace
}  // namespace diffmoe::data
