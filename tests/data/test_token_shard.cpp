// Token shards (token_shard.h): round trips in both dtypes, atomic writing, and one test per kind
// of damage, each error naming the file and the header field.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "data/token_shard.h"
#include "data_test_util.h"

namespace diffmoe::data {
namespace {

using test::error_of;
using test::TempDir;
namespace fs = std::filesystem;

std::vector<int32_t> random_ids(uint64_t seed, size_t n, uint32_t vocab) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = static_cast<int32_t>(rng() % vocab);
  return v;
}

fs::path write_shard(const fs::path& path, const std::vector<int32_t>& ids, uint32_t vocab, uint64_t docs = 3) {
  ShardWriter w(path, {.vocab_size = vocab, .eos_id = vocab - 1, .tokenizer_fingerprint = 0x1234abcd5678ef90ull});
  // Several appends, one per "document", so buffering across calls is exercised.
  const size_t step = docs == 0 ? 1 : ids.size() / docs + 1;
  for (size_t i = 0; i < ids.size(); i += step) {
    w.append(std::span<const int32_t>(ids).subspan(i, std::min(step, ids.size() - i)));
    w.end_document();
  }
  w.finish();
  return path;
}

TEST(TokenShard, RoundTripU16) {
  TempDir d;
  const auto ids = random_ids(1, 700001, 50257);  // > one 1 MB write buffer
  const fs::path path = write_shard(d / "train_0000.bin", ids, 50257);
  EXPECT_FALSE(fs::exists(d / "train_0000.bin.tmp"));
  EXPECT_EQ(fs::file_size(path), kShardHeaderBytes + ids.size() * 2 + kShardFooterBytes);
  const std::string bytes = test::read_file(path);
  EXPECT_EQ(bytes.substr(0, 8), "DMOESHRD");
  const Shard s(path);
  EXPECT_EQ(s.header().version, 1u);
  EXPECT_EQ(s.header().dtype, 2u);
  EXPECT_EQ(s.n_tokens(), ids.size());
  EXPECT_EQ(s.header().n_documents, 3u);
  EXPECT_EQ(s.header().vocab_size, 50257u);
  EXPECT_EQ(s.header().eos_id, 50256u);
  EXPECT_EQ(s.header().tokenizer_fingerprint, 0x1234abcd5678ef90ull);
  EXPECT_EQ(s.read_all(), ids);
  std::vector<int32_t> part(10);
  s.read(ids.size() - 10, 10, part.data());
  EXPECT_EQ(part, std::vector<int32_t>(ids.end() - 10, ids.end()));
  EXPECT_THROW(s.read(ids.size() - 5, 10, part.data()), Error);
}

TEST(TokenShard, RoundTripU32AndEmpty) {
  TempDir d;
  auto ids = random_ids(2, 5000, 100277);
  ids[0] = 100276;  // the largest id survives the widening
  const Shard s(write_shard(d / "big.bin", ids, 100277));
  EXPECT_EQ(s.header().dtype, 4u);
  EXPECT_EQ(s.read_all(), ids);
  EXPECT_EQ(shard_dtype_for_vocab(65536), 2u);
  EXPECT_EQ(shard_dtype_for_vocab(65537), 4u);
  const Shard empty(write_shard(d / "empty.bin", {}, 300, 0));
  EXPECT_EQ(empty.n_tokens(), 0u);
}

TEST(TokenShard, WriterRejectsOutOfRangeIdsAndCleansUp) {
  TempDir d;
  {
    ShardWriter w(d / "w.bin", {.vocab_size = 300, .eos_id = 299});
    const std::vector<int32_t> bad = {1, 2, 300};
    const std::string msg = error_of([&] { w.append(bad); });
    EXPECT_NE(msg.find((d / "w.bin").string() + ": token id 300 is outside [0, 300)"), std::string::npos) << msg;
    EXPECT_TRUE(fs::exists(d / "w.bin.tmp"));
  }  // dropped unfinished: nothing is left under either name
  EXPECT_FALSE(fs::exists(d / "w.bin"));
  EXPECT_FALSE(fs::exists(d / "w.bin.tmp"));
}

// Writes a valid shard, applies `damage` to its bytes, and returns the error from opening it.
template <class F>
std::string open_damaged(const TempDir& d, F damage, ShardOpenOptions options = {}) {
  const fs::path path = d / "train_0003.bin";
  std::string bytes = test::read_file(write_shard(path, random_ids(3, 1000, 4096), 4096));
  damage(bytes);
  test::write_file(path, bytes);
  const std::string msg = error_of([&] { Shard s(path, options); });
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  EXPECT_EQ(msg.rfind(path.string() + ": ", 0), 0u) << "starts with the file name: " << msg;
  return msg;
}

void put_u32(std::string& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); }

TEST(TokenShardErrors, BadMagic) {
  TempDir d;
  const auto msg = open_damaged(d, [](std::string& b) { b.replace(0, 8, "PK\x03\x04xxxx"); });
  EXPECT_NE(msg.find("magic: expected \"DMOESHRD\", found \"PK\\x03\\x04xxxx\""), std::string::npos) << msg;
}

TEST(TokenShardErrors, WrongVersion) {
  TempDir d;
  const auto msg = open_damaged(d, [](std::string& b) { put_u32(b, 8, 2); });
  EXPECT_NE(msg.find("version: 2 is not supported (this build reads version 1)"), std::string::npos) << msg;
}

TEST(TokenShardErrors, BadDtype) {
  TempDir d;
  const auto msg = open_damaged(d, [](std::string& b) { put_u32(b, 12, 3); });
  EXPECT_NE(msg.find("dtype: 3 is not a token size"), std::string::npos) << msg;
  // dtype 2 cannot hold a vocabulary above 65536.
  const auto msg2 = open_damaged(d, [](std::string& b) { put_u32(b, 32, 70000); });
  EXPECT_NE(msg2.find("vocab_size: 70000 does not fit dtype 2"), std::string::npos) << msg2;
}

TEST(TokenShardErrors, Truncated) {
  TempDir d;
  const auto msg = open_damaged(d, [](std::string& b) { b.resize(b.size() - 100); });
  // 1000 tokens written; 2000 - 100 bytes between header and footer hold 950 u16 tokens.
  EXPECT_NE(msg.find("n_tokens says 1000 tokens but the file holds 950 (truncated?)"), std::string::npos) << msg;
  const auto short_msg = open_damaged(d, [](std::string& b) { b.resize(40); });
  EXPECT_NE(short_msg.find("header: the file is 40 bytes, shorter than the 64-byte header (truncated?)"),
            std::string::npos)
      << short_msg;
  const auto long_msg = open_damaged(d, [](std::string& b) { b += "junk"; });
  EXPECT_NE(long_msg.find("n_tokens says 1000 tokens but the file holds 1002 (4 unexpected trailing bytes)"),
            std::string::npos)
      << long_msg;
}

TEST(TokenShardErrors, ChecksumMismatch) {
  TempDir d;
  auto flip = [](std::string& b) { b[kShardHeaderBytes + 777] ^= 0x01; };
  const auto msg = open_damaged(d, flip);
  EXPECT_NE(msg.find("checksum: the footer says"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(corrupted)"), std::string::npos) << msg;
  // With verification off the same file opens; verify_checksum() still catches it on request.
  const Shard s(d / "train_0003.bin", {.verify_checksum = false});
  EXPECT_EQ(s.n_tokens(), 1000u);
  EXPECT_THROW(s.verify_checksum(), Error);
}

TEST(TokenShardErrors, OtherFields) {
  TempDir d;
  EXPECT_NE(
      open_damaged(d, [](std::string& b) { put_u32(b, 36, 4096); }).find("eos_id: 4096 is not below vocab_size 4096"),
      std::string::npos);
  EXPECT_NE(open_damaged(d, [](std::string& b) { b[50] = 7; }).find("reserved: byte 50 is 7"), std::string::npos);
  EXPECT_NE(open_damaged(d, [](std::string& b) { put_u32(b, 32, 0); }).find("vocab_size: 0"), std::string::npos);
  // A huge n_tokens must not overflow the size arithmetic.
  const auto msg = open_damaged(d, [](std::string& b) {
    const uint64_t n = ~uint64_t{0} / 2;
    std::memcpy(b.data() + 16, &n, 8);
  });
  EXPECT_NE(msg.find("n_tokens says 9223372036854775807 tokens but the file holds 1000 (truncated?)"),
            std::string::npos)
      << msg;
}

TEST(TokenShard, Fingerprint) {
  TempDir d;
  test::write_file(d / "t.json", "abc");
  test::write_file(d / "u.json", "abd");
  EXPECT_NE(file_fingerprint(d / "t.json"), file_fingerprint(d / "u.json"));
  EXPECT_EQ(file_fingerprint(d / "t.json"), file_fingerprint(d / "t.json"));
  // xxh64("abc", seed 0), the published test vector.
  EXPECT_EQ(file_fingerprint(d / "t.json"), 0x44bc2cf5ad770999ull);
}

}  // namespace
}  // namespace diffmoe::data
