// TokenLoader (loader.h) on shards whose token i is the number i, so every row tells which window
// it came from: windows, shifted targets, shard-boundary crossing, per-epoch permutations,
// determinism by seed, exact resume from JSON state, prefetch, and the validation loader.
#include <gtest/gtest.h>

#include <numeric>
#include <set>

#include "data/loader.h"
#include "data/token_shard.h"
#include "data_test_util.h"

namespace diffmoe::data {
namespace {

using test::error_of;
using test::TempDir;
namespace fs = std::filesystem;

constexpr int64_t kB = 3, kT = 16;
constexpr uint32_t kVocab = 70000;  // > 65536: u32 shards, so ids up to kTokens fit

// Token i of the stream is i; the stream is split over shards of uneven sizes, one of them empty.
std::vector<fs::path> counting_shards(const TempDir& d, uint64_t n_tokens) {
  const std::vector<uint64_t> sizes = {n_tokens / 3, 0, n_tokens / 5, n_tokens - n_tokens / 3 - n_tokens / 5};
  std::vector<fs::path> paths;
  int32_t next = 0;
  for (size_t s = 0; s < sizes.size(); ++s) {
    paths.push_back(d / fmt::format("train_{:04d}.bin", s));
    ShardWriter w(paths.back(), {.vocab_size = kVocab, .eos_id = 0});
    std::vector<int32_t> ids(sizes[s]);
    std::iota(ids.begin(), ids.end(), next);
    next += static_cast<int32_t>(sizes[s]);
    w.append(ids);
    w.finish();
  }
  return paths;
}

struct Batch {
  std::vector<int32_t> x = std::vector<int32_t>(kB * kT), y = std::vector<int32_t>(kB * kT);
  bool operator==(const Batch&) const = default;
};

std::vector<Batch> take(TokenLoader& loader, int n) {
  std::vector<Batch> out(static_cast<size_t>(n));
  for (auto& b : out) EXPECT_TRUE(loader.next(b.x, b.y));
  return out;
}

// The window index of each row (row b starts at token w*T).
std::vector<uint64_t> windows_of(const std::vector<Batch>& batches) {
  std::vector<uint64_t> w;
  for (const auto& b : batches)
    for (int64_t r = 0; r < kB; ++r) w.push_back(static_cast<uint64_t>(b.x[r * kT]) / kT);
  return w;
}

TEST(WindowPermutation, IsABijectionAndDependsOnSeedAndEpoch) {
  for (uint64_t n : {1u, 2u, 3u, 5u, 17u, 1000u, 4097u}) {
    const WindowPermutation p(n, 42, 3);
    std::vector<char> hit(n, 0);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t v = p(i);
      ASSERT_LT(v, n);
      ASSERT_FALSE(hit[v]) << "n=" << n << " value " << v << " twice";
      hit[v] = 1;
    }
  }
  auto order = [](uint64_t seed, uint64_t epoch) {
    const WindowPermutation p(1000, seed, epoch);
    std::vector<uint64_t> v;
    for (uint64_t i = 0; i < 1000; ++i) v.push_back(p(i));
    return v;
  };
  EXPECT_EQ(order(1, 0), order(1, 0));
  EXPECT_NE(order(1, 0), order(1, 1));
  EXPECT_NE(order(1, 0), order(2, 0));
  // Not the identity nor a rotation: fewer than 1% fixed points, as for a random permutation.
  const auto o = order(1, 0);
  int fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) fixed += o[i] == i;
  EXPECT_LT(fixed, 10);
}

TEST(TokenLoader, RowsAreWindowsAndTargetsAreShiftedInputs) {
  TempDir d;
  const uint64_t n_tokens = 1000;
  TokenLoader loader(counting_shards(d, n_tokens), {.batch = kB, .seq = kT, .seed = 5});
  EXPECT_EQ(loader.n_tokens(), n_tokens);
  EXPECT_EQ(loader.n_windows(), (n_tokens - 1) / kT);
  bool crossed = false;
  for (const Batch& b : take(loader, 40)) {
    for (int64_t r = 0; r < kB; ++r) {
      const int32_t start = b.x[r * kT];
      EXPECT_EQ(start % kT, 0);
      for (int64_t t = 0; t < kT; ++t) {
        EXPECT_EQ(b.x[r * kT + t], start + t);      // consecutive stream tokens ...
        EXPECT_EQ(b.y[r * kT + t], start + t + 1);  // ... and the next token as target
      }
      const int32_t first_boundary = static_cast<int32_t>(n_tokens / 3);
      crossed |= start < first_boundary && start + kT >= first_boundary;
    }
  }
  EXPECT_TRUE(crossed) << "some window should span the shard boundary (and the empty shard)";
}

TEST(TokenLoader, EveryEpochIsAPermutationOfAllWindows) {
  TempDir d;
  TokenLoader loader(counting_shards(d, 700), {.batch = kB, .seq = kT, .seed = 9});
  const uint64_t w = loader.n_windows();  // 43: not a multiple of B, so batches straddle epochs
  ASSERT_NE(w % kB, 0u);
  const int n_batches = static_cast<int>(3 * w / kB);
  const auto windows = windows_of(take(loader, n_batches));
  std::vector<std::vector<uint64_t>> epochs;
  for (size_t e = 0; e < 3; ++e) {
    std::vector<uint64_t> v(windows.begin() + static_cast<long>(e * w),
                            windows.begin() + static_cast<long>((e + 1) * w));
    epochs.push_back(v);
    std::sort(v.begin(), v.end());
    std::vector<uint64_t> all(w);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(v, all) << "epoch " << e;
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  const LoaderState s = loader.state();
  const auto consumed = static_cast<uint64_t>(n_batches * kB);
  EXPECT_EQ(s.epoch, consumed / w);
  EXPECT_EQ(s.position, consumed % w);
}

TEST(TokenLoader, SameSeedSameBatchesOtherSeedOther) {
  TempDir d;
  const auto shards = counting_shards(d, 5000);
  TokenLoader a(shards, {.batch = kB, .seq = kT, .seed = 1}), b(shards, {.batch = kB, .seq = kT, .seed = 1});
  TokenLoader c(shards, {.batch = kB, .seq = kT, .seed = 2});
  const auto ba = take(a, 50), bb = take(b, 50), bc = take(c, 50);
  EXPECT_EQ(ba, bb);
  EXPECT_NE(ba, bc);
}

TEST(TokenLoader, ResumeFromJsonStateReproducesTheRest) {
  TempDir d;
  const auto shards = counting_shards(d, 2000);  // 124 windows: 41.3 batches per epoch
  const TokenLoaderOptions opt{.batch = kB, .seq = kT, .seed = 77};
  TokenLoader reference(shards, opt);
  const auto all = take(reference, 150);  // more than 3 epochs
  for (const int stop : {0, 1, 40, 41, 42, 100}) {
    TokenLoader first(shards, opt);
    take(first, stop);
    const std::string saved = first.state().to_json();
    TokenLoader resumed(shards, opt);
    resumed.restore(LoaderState::from_json(saved));
    const auto rest = take(resumed, 150 - stop);
    EXPECT_TRUE(std::equal(rest.begin(), rest.end(), all.begin() + stop)) << "resumed after " << stop << " batches";
  }
  // The seed travels with the state: a loader built with another seed continues the saved run.
  TokenLoader first(shards, opt);
  take(first, 30);
  TokenLoader other(shards, {.batch = kB, .seq = kT, .seed = 12345});
  other.restore(first.state());
  EXPECT_EQ(take(other, 20), std::vector<Batch>(all.begin() + 30, all.begin() + 50));
}

TEST(TokenLoader, PrefetchGivesTheSameBatchesAndState) {
  TempDir d;
  const auto shards = counting_shards(d, 3000);
  TokenLoader plain(shards, {.batch = kB, .seq = kT, .seed = 3});
  TokenLoader ahead(shards, {.batch = kB, .seq = kT, .seed = 3, .prefetch = true});
  EXPECT_EQ(take(plain, 70), take(ahead, 70));
  EXPECT_EQ(plain.state(), ahead.state()) << "state counts batches handed out, not batches prefetched";
  const LoaderState mid = ahead.state();
  const auto next = take(ahead, 10);
  ahead.restore(mid);  // drops what was prefetched
  EXPECT_EQ(take(ahead, 10), next);
}

TEST(TokenLoader, ValidationIsSequentialBoundedAndRepeatable) {
  TempDir d;
  const auto shards = counting_shards(d, 500);  // 31 windows: 10 full batches
  for (const bool prefetch : {false, true}) {
    TokenLoader val(shards, {.batch = kB, .seq = kT, .shuffle = false, .prefetch = prefetch});
    EXPECT_EQ(val.batches_per_pass(), 10u);
    Batch b;
    std::vector<uint64_t> seen;
    while (val.next(b.x, b.y))
      for (int64_t r = 0; r < kB; ++r) seen.push_back(static_cast<uint64_t>(b.x[r * kT]) / kT);
    std::vector<uint64_t> expect(30);
    std::iota(expect.begin(), expect.end(), 0);
    EXPECT_EQ(seen, expect);
    EXPECT_FALSE(val.next(b.x, b.y)) << "stays at the end until reset";
    val.reset();
    ASSERT_TRUE(val.next(b.x, b.y));
    EXPECT_EQ(b.x[0], 0);
    TokenLoader capped(shards, {.batch = kB, .seq = kT, .shuffle = false, .max_batches = 4, .prefetch = prefetch});
    int n = 0;
    while (capped.next(b.x, b.y)) ++n;
    EXPECT_EQ(n, 4);
  }
  const std::string msg = error_of([&] { TokenLoader(shards, {.batch = 40, .seq = kT, .shuffle = false}); });
  EXPECT_NE(msg.find("fewer than one batch of 40"), std::string::npos) << msg;
}

TEST(TokenLoader, StateJsonAndMismatchErrors) {
  const LoaderState s{.seed = 1ull << 40, .epoch = 3, .position = 17, .n_windows = 124, .seq = 16};
  EXPECT_EQ(LoaderState::from_json(s.to_json()), s);
  EXPECT_NE(error_of([] { LoaderState::from_json(R"({"seed": 1, "epoch": 0})"); }).find("\"position\" is missing"),
            std::string::npos);
  EXPECT_NE(error_of([] { LoaderState::from_json(R"({"seed": 1, "epoch": -1, "position": 0})"); }).find("\"epoch\""),
            std::string::npos);
  TempDir d;
  TokenLoader loader(counting_shards(d, 2000), {.batch = kB, .seq = kT});
  LoaderState other = loader.state();
  other.n_windows = 99;
  EXPECT_NE(error_of([&] { loader.restore(other); }).find("the data changed"), std::string::npos);
  other = loader.state();
  other.position = loader.n_windows();
  EXPECT_THROW(loader.restore(other), Error);
}

TEST(TokenLoader, TensorInterfaceChecksShapes) {
  TempDir d;
  TokenLoader loader(counting_shards(d, 2000), {.batch = kB, .seq = kT});
  std::vector<int32_t> x(kB * kT), y(kB * kT);
  const Tensor tx{.data = x.data(), .dtype = DType::kI32, .shape = Shape{kB, kT}};
  const Tensor ty{.data = y.data(), .dtype = DType::kI32, .shape = Shape{kB, kT}};
  ASSERT_TRUE(loader.next(tx, ty));
  EXPECT_EQ(y[0], x[0] + 1);
  const Tensor wrong{.data = y.data(), .dtype = DType::kI32, .shape = Shape{kT, kB}};
  EXPECT_THROW(loader.next(tx, wrong), Error);
  std::vector<int32_t> small(5);
  EXPECT_THROW(loader.next(small, y), Error);
  TempDir tiny;
  EXPECT_NE(
      error_of([&] { TokenLoader(counting_shards(tiny, 10), {.batch = 1, .seq = kT}); }).find("fewer than one window"),
      std::string::npos);
}

}  // namespace
}  // namespace diffmoe::data
