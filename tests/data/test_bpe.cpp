// BPE merge engine (bpe.h): hash maps, both merge rules against a naive reference on the short
// (vector scan) and long (heap) paths, and the GPT-2 byte-level alphabet.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "data/bpe.h"

namespace diffmoe::data {
namespace {

// Naive tiktoken rule: repeatedly merge the leftmost adjacent pair with the lowest rank.
std::vector<int32_t> reference_by_bytes(std::string_view piece, const BytesMap& ranks) {
  std::vector<std::string> parts;
  for (char c : piece) parts.emplace_back(1, c);
  for (;;) {
    int32_t best = -1;
    size_t at = 0;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      const int32_t r = ranks.find(parts[i] + parts[i + 1]);
      if (r >= 0 && (best < 0 || r < best)) best = r, at = i;
    }
    if (best < 0) break;
    parts[at] += parts[at + 1];
    parts.erase(parts.begin() + static_cast<long>(at) + 1);
  }
  std::vector<int32_t> ids;
  for (const auto& p : parts) ids.push_back(ranks.find(p));
  return ids;
}

// A small rank table over {a, b, c}: all bytes, then multi-byte tokens in a chosen order.
BytesMap small_ranks() {
  BytesMap m;
  int32_t r = 0;
  for (int b = 0; b < 256; ++b) m.insert(std::string(1, static_cast<char>(b)), r++);
  for (const char* t : {"ab", "ba", "aa", "bc", "abab", "aaa", "cab", "ca", "bab", "abc", "aab", "aaaa", "ccc", "cc"})
    m.insert(t, r++);
  return m;
}

TEST(BytesMap, InsertFindGrow) {
  BytesMap m;
  for (int i = 0; i < 5000; ++i) EXPECT_TRUE(m.insert(fmt::format("k{}", i), i));
  EXPECT_FALSE(m.insert("k42", 7));
  EXPECT_EQ(m.size(), 5000u);
  for (int i = 0; i < 5000; ++i) ASSERT_EQ(m.find(fmt::format("k{}", i)), i);
  EXPECT_EQ(m.find("k5000"), -1);
  EXPECT_EQ(m.find(""), -1);
  EXPECT_TRUE(m.insert("", 9));  // the empty string is a valid key
  EXPECT_EQ(m.find(""), 9);
}

TEST(PairMap, InsertFind) {
  PairMap m;
  for (int i = 0; i < 3000; ++i) EXPECT_TRUE(m.insert(i, i + 1, {i, 10000 + i}));
  EXPECT_FALSE(m.insert(5, 6, {1, 1}));
  for (int i = 0; i < 3000; ++i) {
    const auto f = m.find(i, i + 1);
    ASSERT_EQ(f.rank, i);
    ASSERT_EQ(f.id, 10000 + i);
  }
  EXPECT_EQ(m.find(1, 1).rank, -1);
}

TEST(Bpe, ByBytesMatchesReferenceShortAndLong) {
  const BytesMap ranks = small_ranks();
  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 400; ++trial) {
    // Lengths straddle kSmallPiece so both the vector scan and the heap path are exercised.
    const size_t n = 1 + rng() % (trial % 2 ? 40 : 3 * kSmallPiece);
    std::string piece;
    for (size_t i = 0; i < n; ++i) piece.push_back("abc"[rng() % 3]);
    std::vector<int32_t> got;
    bpe_merge_by_bytes(piece, ranks, got);
    ASSERT_EQ(got, reference_by_bytes(piece, ranks)) << piece;
  }
}

TEST(Bpe, ByPairsFollowsMergeOrder) {
  // Bytes are ids 0..255; merges: (a,b)->300 rank 0, (300,300)->301 rank 1, (b,a)->302 rank 2.
  std::array<int32_t, 256> byte_ids;
  for (int b = 0; b < 256; ++b) byte_ids[b] = b;
  PairMap merges;
  merges.insert('a', 'b', {0, 300});
  merges.insert(300, 300, {1, 301});
  merges.insert('b', 'a', {2, 302});
  std::vector<int32_t> out;
  bpe_merge_by_pairs("ababa", byte_ids, merges, out);
  EXPECT_EQ(out, (std::vector<int32_t>{301, 'a'}));
  out.clear();
  bpe_merge_by_pairs("bab", byte_ids, merges, out);  // (a,b) rank 0 beats (b,a) rank 2
  EXPECT_EQ(out, (std::vector<int32_t>{'b', 300}));
  // The heap path gives the same as concatenating short results when pieces are independent.
  std::string longp;
  for (int i = 0; i < 100; ++i) longp += "abab";
  out.clear();
  bpe_merge_by_pairs(longp, byte_ids, merges, out);
  EXPECT_EQ(out, std::vector<int32_t>(100, 301));
}

TEST(Bpe, MissingByteThrows) {
  BytesMap ranks;
  ranks.insert("a", 0);
  std::vector<int32_t> out;
  EXPECT_ANY_THROW(bpe_merge_by_bytes("ab", ranks, out));
}

TEST(ByteLevel, AlphabetRoundTrip) {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::string enc = byte_level_encode(all);
  EXPECT_EQ(byte_level_encode(" "), "\xc4\xa0");   // 'Ġ' U+0120
  EXPECT_EQ(byte_level_encode("\n"), "\xc4\x8a");  // 'Ċ' U+010A
  EXPECT_EQ(byte_level_encode("!~"), "!~");
  const auto dec = byte_level_decode(enc);
  ASSERT_TRUE(dec.has_value());
  EXPECT_EQ(*dec, all);
  EXPECT_FALSE(byte_level_decode(" ").has_value());  // a literal space is not in the alphabet
  EXPECT_FALSE(byte_level_decode("\xe4\xb8\xad").has_value());
}

}  // namespace
}  // namespace diffmoe::data
