// prepare_shards (prepare.h) with a tokenizer trained in the test: output independent of the
// thread count, EOS after every document, the deterministic validation split, meta.json, errors.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/text_source.h"
#include "data/token_shard.h"
#include "data/tokenizer.h"
#include "data_test_util.h"

namespace diffmoe::data {
namespace {

using test::error_of;
using test::TempDir;
using test::write_file;
namespace fs = std::filesystem;

// A mixed corpus: a zstd text file long enough to be cut into several documents, plain JSONL, a
// short text file and gzip JSONL.
class PrepareTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokenizer_path_ = test::make_tokenizer(dir_.path());
    tokenizer_ = load_tokenizer(tokenizer_path_);
    std::string a, c;
    for (int i = 0; i < 60; ++i) a += nlohmann::json{{"text", test::make_text(10 + i, 200 + 37 * i)}}.dump() + "\n";
    for (int i = 0; i < 40; ++i) c += nlohmann::json{{"text", test::make_text(100 + i, 500)}, {"id", i}}.dump() + "\n";
    // The long text comes first (files are read in sorted order): its 64 KB documents keep some
    // workers busy while others finish the small JSONL batches after them, so results arrive out
    // of order and the writer's reordering is really exercised.
    write_file(dir_ / "in/a_long.txt.zst", test::zstd(test::make_text(8, 150000)));
    write_file(dir_ / "in/b.jsonl", a);
    write_file(dir_ / "in/c.txt", test::make_text(7, 20000));
    write_file(dir_ / "in/d.jsonl.gz", test::gzip(c));
    // The documents prepare must see, in order (the readers are tested in test_text_source.cpp).
    for (const fs::path& f : expand_inputs((dir_ / "in").string())) {
      DocumentReader r(f);
      std::string text;
      while (r.next(text)) docs_.push_back(text);
    }
    ASSERT_EQ(docs_.size(), 60u + 1 + 40 + 3);
  }

  PrepareOptions options(const std::string& out, int threads = 2) const {
    return {.inputs = (dir_ / "in").string(),
            .tokenizer = tokenizer_path_,
            .out_dir = dir_ / out,
            .shard_tokens = 20000,
            .threads = threads,
            .batch_bytes = 4096};  // ~70 work items
  }

  // All tokens of a split, shards concatenated.
  std::vector<int32_t> split_tokens(const std::string& out, const std::string& split) const {
    std::vector<int32_t> all;
    for (const fs::path& p : find_shards(dir_ / out, split)) {
      const auto t = Shard(p).read_all();
      all.insert(all.end(), t.begin(), t.end());
    }
    return all;
  }

  // The expected token stream: encode(doc) + EOS for every document with keep(index).
  template <class Keep>
  std::vector<int32_t> expected_stream(Keep keep) const {
    std::vector<int32_t> out;
    for (size_t i = 0; i < docs_.size(); ++i) {
      if (!keep(i)) continue;
      const auto ids = tokenizer_->encode(docs_[i]);
      out.insert(out.end(), ids.begin(), ids.end());
      out.push_back(*tokenizer_->eos_id());
    }
    return out;
  }

  TempDir dir_;
  fs::path tokenizer_path_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<std::string> docs_;
};

std::map<std::string, std::string> directory_bytes(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = test::read_file(e.path());
  return out;
}

TEST_F(PrepareTest, OutputDoesNotDependOnThreadCount) {
  PrepareOptions one = options("one", 1), four = options("four", 4);
  one.val_fraction = four.val_fraction = 0.2;
  const PrepareStats s1 = prepare_shards(one);
  const PrepareStats s4 = prepare_shards(four);
  EXPECT_GT(s1.train.shards.size(), 2u) << "several shards, so cuts across documents are compared too";
  EXPECT_EQ(s1.tokens, s4.tokens);
  const auto b1 = directory_bytes(dir_ / "one"), b4 = directory_bytes(dir_ / "four");
  ASSERT_EQ(b1.size(), b4.size());
  for (const auto& [name, bytes] : b1) {
    ASSERT_TRUE(b4.contains(name)) << name;
    EXPECT_TRUE(bytes == b4.at(name)) << name << " differs between 1 and 4 threads";
  }
}

TEST_F(PrepareTest, StreamIsDocumentsJoinedWithEos) {
  const PrepareStats stats = prepare_shards(options("out", 3));
  const std::vector<int32_t> tokens = split_tokens("out", "train");
  const int32_t eos = *tokenizer_->eos_id();
  EXPECT_EQ(tokens, expected_stream([](size_t) { return true; }));
  EXPECT_EQ(std::count(tokens.begin(), tokens.end(), eos), static_cast<long>(docs_.size()));
  EXPECT_EQ(tokens.back(), eos);
  std::string expected_text;
  for (const auto& d : docs_) expected_text += d + "<|endoftext|>";
  EXPECT_EQ(tokenizer_->decode(tokens), expected_text);
  // Per-shard document counts add up; every shard but the last is exactly shard_tokens long.
  uint64_t docs = 0;
  const auto shards = find_shards(dir_ / "out", "train");
  for (size_t i = 0; i < shards.size(); ++i) {
    const Shard s(shards[i]);
    docs += s.header().n_documents;
    if (i + 1 < shards.size()) {
      EXPECT_EQ(s.n_tokens(), 20000u);
    }
    EXPECT_EQ(s.header().eos_id, static_cast<uint32_t>(eos));
    EXPECT_EQ(s.header().tokenizer_fingerprint, file_fingerprint(tokenizer_path_));
  }
  EXPECT_EQ(docs, docs_.size());
  EXPECT_EQ(stats.documents, docs_.size());
  EXPECT_EQ(stats.train.tokens, tokens.size());
  EXPECT_EQ(stats.val.documents, 0u);
  EXPECT_TRUE(stats.val.shards.empty());
  EXPECT_GT(stats.seconds, 0.0);
}

TEST_F(PrepareTest, ValidationSplitIsDeterministicByDocumentIndexAndSeed) {
  auto opt = options("s7");
  opt.val_fraction = 0.3;
  opt.seed = 7;
  const PrepareStats stats = prepare_shards(opt);
  auto is_val = [&](size_t i) { return uniform_at(7, stream_id("data.val_split"), i) <= 0.3; };
  EXPECT_EQ(split_tokens("s7", "val"), expected_stream(is_val));
  EXPECT_EQ(split_tokens("s7", "train"), expected_stream([&](size_t i) { return !is_val(i); }));
  EXPECT_GT(stats.val.documents, 10u);
  EXPECT_GT(stats.train.documents, stats.val.documents);
  EXPECT_EQ(stats.train.documents + stats.val.documents, docs_.size());
  // Same seed: the same files; another seed: another split.
  opt.out_dir = dir_ / "s7b";
  prepare_shards(opt);
  EXPECT_EQ(directory_bytes(dir_ / "s7"), directory_bytes(dir_ / "s7b"));
  opt.out_dir = dir_ / "s8";
  opt.seed = 8;
  prepare_shards(opt);
  EXPECT_NE(split_tokens("s8", "val"), split_tokens("s7", "val"));
}

TEST_F(PrepareTest, MetaJsonDescribesTheRun) {
  auto opt = options("out");
  opt.val_fraction = 0.25;
  const PrepareStats stats = prepare_shards(opt);
  const auto meta = nlohmann::json::parse(test::read_file(dir_ / "out/meta.json"));
  EXPECT_EQ(meta["format"], "diffmoe-token-shards");
  EXPECT_EQ(meta["tokenizer"]["fingerprint"], fmt::format("{:016x}", file_fingerprint(tokenizer_path_)));
  EXPECT_EQ(meta["tokenizer"]["path"], fs::absolute(tokenizer_path_).string());
  EXPECT_EQ(meta["tokenizer"]["eos_id"], *tokenizer_->eos_id());
  EXPECT_EQ(meta["counts"]["documents"], docs_.size());
  EXPECT_EQ(meta["counts"]["files"], 4);
  EXPECT_EQ(meta["counts"]["tokens"], stats.tokens);
  EXPECT_EQ(meta["train"]["tokens"].get<uint64_t>() + meta["val"]["tokens"].get<uint64_t>(), stats.tokens);
  EXPECT_EQ(meta["options"]["shard_tokens"], 20000);
  EXPECT_EQ(meta["val"]["shards"].get<std::vector<std::string>>(), stats.val.shards);
  uint64_t bytes = 0;
  for (const auto& name : stats.train.shards) bytes += fs::file_size(dir_ / "out" / name);
  for (const auto& name : stats.val.shards) bytes += fs::file_size(dir_ / "out" / name);
  EXPECT_EQ(stats.output_bytes, bytes);
}

TEST_F(PrepareTest, RerunRemovesStaleShards) {
  prepare_shards(options("out"));
  ASSERT_TRUE(fs::exists(dir_ / "out/train_0002.bin"));
  auto opt = options("out");
  opt.shard_tokens = 100'000'000;
  prepare_shards(opt);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir_ / "out")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"meta.json", "train_0000.bin"}));
}

TEST_F(PrepareTest, ErrorsLeaveNoHalfWrittenOutput) {
  write_file(dir_ / "in/e.jsonl", "{\"text\": \"fine\"}\n{\"text\": broken}\n");
  const std::string msg = error_of([&] { prepare_shards(options("out", 4)); });
  EXPECT_NE(msg.find((dir_ / "in/e.jsonl").string() + ":2: not valid JSON"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir_ / "out/meta.json"));
  for (const auto& e : fs::directory_iterator(dir_ / "out"))
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
  // skip_bad_lines turns it into a count.
  auto opt = options("skip");
  opt.skip_bad_lines = true;
  EXPECT_EQ(prepare_shards(opt).bad_lines, 1u);
  // A tokenizer without an end-of-text token cannot join documents.
  TempDir other;
  opt.tokenizer = test::make_tokenizer(other.path(), {});
  EXPECT_NE(error_of([&] { prepare_shards(opt); }).find("no end-of-text token"), std::string::npos);
  opt = options("x");
  opt.val_fraction = 1.5;
  EXPECT_NE(error_of([&] { prepare_shards(opt); }).find("val_fraction 1.5"), std::string::npos);
}

TEST_F(PrepareTest, LoaderReadsThePreparedSplit) {
  auto opt = options("out");
  opt.val_fraction = 0.3;
  const PrepareStats stats = prepare_shards(opt);
  TokenLoader train(find_shards(dir_ / "out", "train"), {.batch = 4, .seq = 32, .seed = 1});
  EXPECT_EQ(train.n_tokens(), stats.train.tokens);
  EXPECT_EQ(train.eos_id(), static_cast<uint32_t>(*tokenizer_->eos_id()));
  TokenLoader val(find_shards(dir_ / "out", "val"), {.batch = 2, .seq = 32, .shuffle = false, .max_batches = 3});
  std::vector<int32_t> x(64), y(64);
  int n = 0;
  while (val.next(x, y)) ++n;
  EXPECT_EQ(n, 3);
}

}  // namespace
}  // namespace diffmoe::data
