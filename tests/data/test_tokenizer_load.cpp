// load_tokenizer() format detection and the one-line errors for files that are not (supported)
// tokenizers; small synthetic HF / tiktoken files, so these tests need no downloaded vocabulary.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/bpe.h"
#include "data/hf_tokenizer.h"
#include "data/tiktoken_tokenizer.h"
#include "data/tokenizer.h"

namespace diffmoe::data {
namespace {

namespace fs = std::filesystem;

class LoadTokenizer : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("diffmoe_tok_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path write(const std::string& name, const std::string& content) {
    const fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  // Message of the diffmoe::Error thrown by load_tokenizer(p), or "" if none.
  static std::string load_error(const fs::path& p) {
    try {
      load_tokenizer(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }
  fs::path dir_;
};

// A minimal byte-level BPE tokenizer.json: 256 bytes, merges (a,b) and (ab,c), one special.
nlohmann::json tiny_hf() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_encode(std::string(1, static_cast<char>(b)))] = b;
  vocab["ab"] = 256;
  vocab["abc"] = 257;
  return {{"version", "1.0"},
          {"added_tokens", {{{"id", 258}, {"content", "<|endoftext|>"}, {"special", true}}}},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b", {"ab", "c"}}}}}};
}

TEST_F(LoadTokenizer, TinyHfLoadsAndEncodes) {
  const auto tok = load_tokenizer(write("tokenizer.json", tiny_hf().dump()));
  EXPECT_EQ(tok->kind(), TokenizerKind::kHuggingFace);
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->encode("abcab"), (std::vector<int32_t>{257, 256}));
  EXPECT_EQ(tok->encode_with_special("abc<|endoftext|>"), (std::vector<int32_t>{257, 258}));
  EXPECT_EQ(tok->eos_id(), 258);
  EXPECT_EQ(tok->decode(std::vector<int32_t>{257, 258}), "abc<|endoftext|>");
}

TEST_F(LoadTokenizer, HfAddPrefixSpaceAndIsolatedSplit) {
  auto j = tiny_hf();
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"String", "c"}}}, {"behavior", "Isolated"}, {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", false}}}}};
  const auto tok = load_hf_tokenizer_from_string(j.dump(), "inline");
  // "abcab" -> Split(Isolated "c") -> "ab","c","ab" -> prefix space each -> " ab"," c"," ab".
  EXPECT_EQ(tok->encode("abcab"), (std::vector<int32_t>{' ', 256, ' ', 'c', ' ', 256}));
}

TEST_F(LoadTokenizer, HfNonSpecialAddedTokenMatchedByEncode) {
  auto j = tiny_hf();
  j["added_tokens"].push_back({{"id", 259}, {"content", "[X]"}, {"special", false}, {"rstrip", true}});
  const auto tok = load_hf_tokenizer_from_string(j.dump(), "inline");
  EXPECT_EQ(tok->encode("ab[X]  c"), (std::vector<int32_t>{256, 259, 'c'}));  // rstrip eats the spaces
  EXPECT_EQ(tok->encode("<|endoftext|>").size(), 13u);                        // special: plain text here
}

TEST_F(LoadTokenizer, TinyTiktokenNeedsPresetOrPattern) {
  std::string text;
  const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int b = 0; b < 256; ++b)  // base64 of one byte: 2 chars + "=="
    text += fmt::format("{}{}== {}\n", b64[b >> 2], b64[(b & 3) << 4], b);
  text += "YWI= 256\n";  // "ab"
  const fs::path p = write("mine.tiktoken", text);
  const std::string err = load_error(p);
  EXPECT_NE(err.find(p.string()), std::string::npos) << err;
  EXPECT_NE(err.find("cannot tell which encoding"), std::string::npos) << err;
  TiktokenOptions opt;
  opt.pattern = "\\S+|\\s+";
  opt.specials = std::vector<SpecialToken>{{"<eos>", 300}};
  const auto tok = load_tiktoken(p, opt);
  EXPECT_EQ(tok->encode("ab ab"), (std::vector<int32_t>{256, ' ', 256}));
  EXPECT_EQ(tok->vocab_size(), 301);
  EXPECT_EQ(tok->name(), "mine");
}

TEST_F(LoadTokenizer, WrongKindErrorsNameTheFile) {
  struct Bad {
    std::string name, content, expect;
  };
  const std::vector<Bad> bad = {
      {"config.json", R"({"hidden_size": 64, "n_layer": 2})", "not a tokenizer"},
      {"array.json", "[1, 2, 3]", "not a tokenizer"},
      {"broken.json", "{\"model\": ", "not valid JSON"},
      {"notes.txt", "just some text\nwith lines\n", "is not a tokenizer"},
      {"empty.tiktoken", "", "is not a tokenizer"},
      {"bad.tiktoken", "IQ== 0\n!!!! 1\n", "line 2"},
  };
  for (const Bad& b : bad) {
    const fs::path p = write(b.name, b.content);
    const std::string err = load_error(p);
    EXPECT_NE(err.find(p.string()), std::string::npos) << b.name << ": " << err;
    EXPECT_NE(err.find(b.expect), std::string::npos) << b.name << ": " << err;
    EXPECT_EQ(err.find('\n'), std::string::npos) << "one line: " << err;
  }
  const std::string missing = load_error(dir_ / "nope.json");
  EXPECT_NE(missing.find("nope.json"), std::string::npos) << missing;
}

TEST_F(LoadTokenizer, UnsupportedHfFieldsAreNamed) {
  struct Bad {
    std::string field;
    nlohmann::json patch;  // merged into tiny_hf()
  };
  const std::vector<Bad> bad = {
      {"model.type", {{"model", {{"type", "WordPiece"}}}}},
      {"model.type", {{"model", {{"type", "Unigram"}}}}},
      {"normalizer", {{"normalizer", {{"type", "NFC"}}}}},
      {"model.byte_fallback", {{"model", {{"byte_fallback", true}}}}},
      {"model.dropout", {{"model", {{"dropout", 0.1}}}}},
      {"pre_tokenizer", {{"pre_tokenizer", {{"type", "Metaspace"}}}}},
      {"pre_tokenizer.behavior",
       {{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "MergedWithNext"}}}}},
      {"decoder", {{"decoder", {{"type", "WordPiece"}}}}},
  };
  for (const Bad& b : bad) {
    nlohmann::json j = tiny_hf();
    j.merge_patch(b.patch);
    const fs::path p = write("tokenizer.json", j.dump());
    const std::string err = load_error(p);
    EXPECT_NE(err.find(p.string()), std::string::npos) << b.field << ": " << err;
    EXPECT_NE(err.find(b.field), std::string::npos) << b.field << ": " << err;
  }
  // A merge whose result is not in the vocab is a malformed file.
  nlohmann::json j = tiny_hf();
  j["model"]["merges"].push_back("b c");
  const std::string err = load_error(write("tokenizer.json", j.dump()));
  EXPECT_NE(err.find("model.merges[2]"), std::string::npos) << err;
}

}  // namespace
}  // namespace diffmoe::data
