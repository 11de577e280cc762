// TokenLoader, WindowPermutation, LoaderState (loader.h).
#include "data/loader.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "core/rng.h"
#include "io/file_util.h"

namespace diffmoe::data {

namespace fs = std::filesystem;

namespace {
constexpr int kFeistelRounds = 6;  // >= 4 rounds make a Feistel network a pseudorandom permutation
constexpr size_t kPrefetchDepth = 2;
}  // namespace

// ---- find_shards ----

std::vector<fs::path> find_shards(const fs::path& dir, std::string_view split) {
  std::vector<fs::path> out;
  const fs::path meta_path = dir / "meta.json";
  if (fs::exists(meta_path)) {
    const nlohmann::json meta =
        nlohmann::json::parse(io::read_small_file(meta_path.string(), io::kMaxManifestBytes, "shard index"), nullptr,
                              /*allow_exceptions=*/false);
    DIFFMOE_CHECK(meta.is_object() && meta.contains(split) && meta[std::string(split)].contains("shards"),
                  "{}: {}.shards: missing (not a `diffmoe data prepare` meta.json?)", meta_path.string(), split);
    for (const auto& name : meta[std::string(split)]["shards"]) {
      DIFFMOE_CHECK(name.is_string(), "{}: {}.shards: expected file names", meta_path.string(), split);
      // Names of files in this directory only: never a path elsewhere ("../x.bin", "/dev/zero").
      const std::string n = name.get<std::string>();
      DIFFMOE_CHECK(
          !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos && n.find('\0') == std::string::npos,
          "{}: {}.shards: '{}' is not a file name in this directory", meta_path.string(), split, n);
      out.push_back(dir / n);
    }
    DIFFMOE_CHECK(!out.empty(), "{}: lists no {} shards (for val: prepared with val_fraction 0?)", meta_path.string(),
                  split);
    return out;
  }
  const std::string prefix = std::string(split) + "_";
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if (name.starts_with(prefix) && name.ends_with(".bin")) out.push_back(e.path());
    }
  std::sort(out.begin(), out.end());
  DIFFMOE_CHECK(!out.empty(), "{}: no {}_*.bin shards (and no meta.json)", dir.string(), split);
  return out;
}

// ---- WindowPermutation ----

WindowPermutation::WindowPermutation(uint64_t n, uint64_t seed, uint64_t epoch) : n_(n), seed_(seed), epoch_(epoch) {
  DIFFMOE_CHECK(n > 0, "[loader] permutation of an empty range");
  int bits = std::max(2, static_cast<int>(std::bit_width(n - 1)));
  bits += bits % 2;  // a balanced network needs two equal halves
  half_bits_ = bits / 2;
  mask_ = (uint64_t{1} << half_bits_) - 1;
}

uint64_t WindowPermutation::encrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & mask_;
  for (int r = 0; r < kFeistelRounds; ++r) {
    // Round function: Philox keyed by the seed, counter = (right half, round, epoch).
    const auto b =
        Philox4x32::block(static_cast<uint32_t>(right), static_cast<uint32_t>(right >> 32), static_cast<uint32_t>(r),
                          static_cast<uint32_t>(epoch_), static_cast<uint32_t>(seed_),
                          static_cast<uint32_t>(seed_ >> 32) ^ static_cast<uint32_t>(epoch_ >> 32));
    const uint64_t f = ((static_cast<uint64_t>(b[1]) << 32) | b[0]) & mask_;
    const uint64_t next = left ^ f;
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

uint64_t WindowPermutation::operator()(uint64_t i) const {
  DIFFMOE_CHECK(i < n_, "[loader] permutation index {} out of range {}", i, n_);
  // Cycle walking: the network permutes [0, 2^bits); re-encrypting until the value lands below n
  // restricts it to a permutation of [0, n).
  uint64_t x = encrypt(i);
  while (x >= n_) x = encrypt(x);
  return x;
}

// ---- LoaderState ----

std::string LoaderState::to_json() const {
  return nlohmann::json{
      {"seed", seed}, {"epoch", epoch}, {"position", position}, {"n_windows", n_windows}, {"seq", seq}}
      .dump();
}

LoaderState LoaderState::from_json(std::string_view text) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  DIFFMOE_CHECK(j.is_object(), "loader state: not a JSON object: {}", text.substr(0, 80));
  auto field = [&](const char* name, bool required) -> uint64_t {
    if (!j.contains(name)) {
      DIFFMOE_CHECK(!required, "loader state: field \"{}\" is missing", name);
      return 0;
    }
    DIFFMOE_CHECK(j[name].is_number_unsigned(), "loader state: field \"{}\" is not a non-negative integer", name);
    return j[name].get<uint64_t>();
  };
  LoaderState s;
  s.seed = field("seed", true);
  s.epoch = field("epoch", true);
  s.position = field("position", true);
  s.n_windows = field("n_windows", false);
  s.seq = static_cast<int64_t>(field("seq", false));
  return s;
}

// ---- Prefetcher: assembles batches ahead on one thread, handing them out in order ----

struct TokenLoader::Prefetcher {
  struct Item {
    std::vector<int32_t> rows;
    LoaderState after;
    bool ok = false;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Item> queue;
  bool stop = false;
  std::exception_ptr error;
  std::thread thread;

  Prefetcher(const TokenLoader& loader, LoaderState start) {
    thread = std::thread([this, &loader, start] {
      LoaderState ahead = start;
      const size_t n = static_cast<size_t>(loader.options_.batch * (loader.options_.seq + 1));
      try {
        for (;;) {
          {
            std::unique_lock<std::mutex> lock(mu);
            cv.wait(lock, [&] { return queue.size() < kPrefetchDepth || stop; });
            if (stop) return;
          }
          Item item;
          item.rows.resize(n);
          item.ok = loader.assemble(ahead, item.rows.data());
          item.after = ahead;
          std::lock_guard<std::mutex> lock(mu);
          queue.push_back(std::move(item));
          cv.notify_all();
          if (!queue.back().ok) return;  // end of a validation pass: the end item stays queued
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        error = std::current_exception();
        cv.notify_all();
      }
    });
  }
  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
      cv.notify_all();
    }
    thread.join();
  }
  // The next item; the end-of-pass item is left in place so later calls see it again.
  Item pop() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return !queue.empty() || error; });
    if (queue.empty()) std::rethrow_exception(error);
    if (!queue.front().ok) return {{}, queue.front().after, false};
    Item item = std::move(queue.front());
    queue.pop_front();
    cv.notify_all();
    return item;
  }
};

// ---- TokenLoader ----

TokenLoader::TokenLoader(const std::vector<fs::path>& shards, TokenLoaderOptions options) : options_(options) {
  DIFFMOE_CHECK(options_.batch >= 1 && options_.seq >= 1, "[loader] batch {} and seq {} must be positive",
                options_.batch, options_.seq);
  DIFFMOE_CHECK(!shards.empty(), "[loader] no shards given");
  offsets_.push_back(0);
  for (const fs::path& path : shards) {
    shards_.emplace_back(path, ShardOpenOptions{.verify_checksum = options_.verify_checksums});
    const ShardHeader& first = shards_.front().header();
    const ShardHeader& h = shards_.back().header();
    DIFFMOE_CHECK(h.vocab_size == first.vocab_size && h.eos_id == first.eos_id &&
                      h.tokenizer_fingerprint == first.tokenizer_fingerprint,
                  "{}: tokenizer: vocab {} / eos {} / fingerprint {:016x} differ from {} ({} / {} / {:016x})",
                  path.string(), h.vocab_size, h.eos_id, h.tokenizer_fingerprint, shards_.front().path().string(),
                  first.vocab_size, first.eos_id, first.tokenizer_fingerprint);
    offsets_.push_back(offsets_.back() + h.n_tokens);
  }
  const auto seq = static_cast<uint64_t>(options_.seq);
  DIFFMOE_CHECK(n_tokens() >= seq + 1, "[loader] the shards hold {} tokens, fewer than one window of seq + 1 = {}",
                n_tokens(), seq + 1);
  n_windows_ = (n_tokens() - 1) / seq;
  DIFFMOE_CHECK(options_.shuffle || n_windows_ >= static_cast<uint64_t>(options_.batch),
                "[loader] validation shards hold {} windows of seq + 1 = {} tokens, fewer than one batch of {}",
                n_windows_, seq + 1, options_.batch);
  rows_.resize(static_cast<size_t>(options_.batch * (options_.seq + 1)));
  cursor_ = LoaderState{.seed = options_.seed, .n_windows = n_windows_, .seq = options_.seq};
  restart_prefetch();
}

TokenLoader::~TokenLoader() = default;

uint64_t TokenLoader::batches_per_pass() const {
  const uint64_t full = n_windows_ / static_cast<uint64_t>(options_.batch);
  if (options_.shuffle || options_.max_batches <= 0) return full;
  return std::min(full, static_cast<uint64_t>(options_.max_batches));
}

void TokenLoader::read_tokens(uint64_t begin, uint64_t count, int32_t* out) const {
  // The last shard that starts at or before `begin` (empty shards are stepped over).
  size_t i = static_cast<size_t>(std::upper_bound(offsets_.begin(), offsets_.end(), begin) - offsets_.begin()) - 1;
  while (count > 0) {
    const uint64_t n = std::min(count, offsets_[i + 1] - begin);
    shards_[i].read(begin - offsets_[i], n, out);
    begin += n;
    count -= n;
    out += n;
    ++i;
  }
}

bool TokenLoader::assemble(LoaderState& cursor, int32_t* rows) const {
  const auto batch = static_cast<uint64_t>(options_.batch);
  const auto seq = static_cast<uint64_t>(options_.seq);
  if (!options_.shuffle) {
    if (cursor.position + batch > n_windows_) return false;
    if (options_.max_batches > 0 && cursor.position / batch >= static_cast<uint64_t>(options_.max_batches))
      return false;
    for (uint64_t b = 0; b < batch; ++b) read_tokens((cursor.position + b) * seq, seq + 1, rows + b * (seq + 1));
    cursor.position += batch;
    return true;
  }
  WindowPermutation perm(n_windows_, cursor.seed, cursor.epoch);
  for (uint64_t b = 0; b < batch; ++b) {
    read_tokens(perm(cursor.position) * seq, seq + 1, rows + b * (seq + 1));
    if (++cursor.position == n_windows_) {  // the batch continues into the next epoch
      cursor.position = 0;
      ++cursor.epoch;
      perm = WindowPermutation(n_windows_, cursor.seed, cursor.epoch);
    }
  }
  return true;
}

bool TokenLoader::next(std::span<int32_t> inputs, std::span<int32_t> targets) {
  const auto batch = static_cast<size_t>(options_.batch), seq = static_cast<size_t>(options_.seq);
  DIFFMOE_CHECK(inputs.size() == batch * seq && targets.size() == batch * seq,
                "[loader] inputs/targets hold {}/{} values, expected B*T = {}*{} = {}", inputs.size(), targets.size(),
                batch, seq, batch * seq);
  const int32_t* rows = rows_.data();
  Prefetcher::Item item;
  if (prefetch_ != nullptr) {
    item = prefetch_->pop();
    if (!item.ok) return false;
    cursor_ = item.after;
    rows = item.rows.data();
  } else if (!assemble(cursor_, rows_.data())) {
    return false;
  }
  for (size_t b = 0; b < batch; ++b) {
    const int32_t* row = rows + b * (seq + 1);
    std::copy(row, row + seq, inputs.data() + b * seq);
    std::copy(row + 1, row + seq + 1, targets.data() + b * seq);
  }
  return true;
}

bool TokenLoader::next(const Tensor& inputs, const Tensor& targets) {
  const Shape shape{options_.batch, options_.seq};
  check_shape(inputs, shape, "loader", "inputs");
  check_shape(targets, shape, "loader", "targets");
  check_dtype(inputs, DType::kI32, "loader", "inputs");
  check_dtype(targets, DType::kI32, "loader", "targets");
  DIFFMOE_CHECK(inputs.device == Device::kCPU && targets.device == Device::kCPU,
                "[loader] inputs and targets must be host memory (got {}, {})", inputs.describe(), targets.describe());
  const auto n = static_cast<size_t>(shape.numel());
  return next(std::span<int32_t>(inputs.ptr<int32_t>(), n), std::span<int32_t>(targets.ptr<int32_t>(), n));
}

LoaderState TokenLoader::state() const { return cursor_; }

void TokenLoader::restore(const LoaderState& state) {
  DIFFMOE_CHECK(state.n_windows == 0 || state.n_windows == n_windows_,
                "loader state: n_windows {} does not match these shards ({} windows of seq {}): the data changed",
                state.n_windows, n_windows_, options_.seq);
  DIFFMOE_CHECK(state.seq == 0 || state.seq == options_.seq, "loader state: seq {} does not match the loader's seq {}",
                state.seq, options_.seq);
  DIFFMOE_CHECK(state.position < n_windows_ || (!options_.shuffle && state.position <= n_windows_),
                "loader state: position {} is not below n_windows {}", state.position, n_windows_);
  cursor_ = state;
  cursor_.n_windows = n_windows_;
  cursor_.seq = options_.seq;
  restart_prefetch();
}

void TokenLoader::reset() {
  cursor_.epoch = 0;
  cursor_.position = 0;
  restart_prefetch();
}

void TokenLoader::restart_prefetch() {
  prefetch_.reset();  // joins the old thread before a new one starts from cursor_
  if (options_.prefetch) prefetch_ = std::make_unique<Prefetcher>(*this, cursor_);
}

}  // namespace diffmoe::data
