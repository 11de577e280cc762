// Byte-level BPE trainer and diffmoe tokenizer.json writer (see bpe_trainer.h).
#include "data/bpe_trainer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_set>

#include "core/error.h"
#include "data/bpe.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_base.h"
#include "io/file_util.h"

namespace diffmoe::data {
namespace {

// The pattern the trainer splits with and the one written into the file must be the same string:
// the legacy (non-possessive) forms, because JavaScript HF ports reject possessive quantifiers.
std::string_view trainer_pattern(std::string_view name) {
  if (name == "gpt2") return patterns::kGpt2Legacy;
  if (name == "cl100k") return patterns::kCl100kLegacy;
  DIFFMOE_FAIL("[bpe_trainer] unknown pattern '{}' (gpt2 or cl100k)", name);
}

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
int32_t key_left(uint64_t k) { return static_cast<int32_t>(k >> 32); }
int32_t key_right(uint64_t k) { return static_cast<int32_t>(k & 0xFFFFFFFFu); }

}  // namespace

struct BpeTrainer::Impl {
  Pretokenizer pre;
  AtomicMatcher specials;
  explicit Impl(const BpeTrainerOptions& o) : pre(trainer_pattern(o.pattern)) {
    std::vector<AtomicToken> s;
    for (const std::string& t : o.special_tokens) s.push_back({t, 0, true, false, false, false});
    specials = AtomicMatcher(std::move(s));
  }
};

BpeTrainer::BpeTrainer(BpeTrainerOptions options) : options_(std::move(options)) {
  DIFFMOE_CHECK(options_.vocab_size >= 256 + static_cast<int32_t>(options_.special_tokens.size()),
                "[bpe_trainer] vocab_size {} < 256 bytes + {} special tokens", options_.vocab_size,
                options_.special_tokens.size());
  DIFFMOE_CHECK(options_.vocab_size <= kMaxTokenizerVocab,
                "[bpe_trainer] vocab_size {} is over the largest supported {}", options_.vocab_size,
                kMaxTokenizerVocab);
  impl_ = std::make_unique<Impl>(options_);
}

BpeTrainer::~BpeTrainer() = default;

void BpeTrainer::add_text(std::string_view text) {
  auto count = [&](std::string_view w) {
    auto it = counts_.find(w);
    if (it == counts_.end()) counts_.emplace(std::string(w), 1);
    else ++it->second;
  };
  auto count_segment = [&](std::string_view seg) {
    for_each_utf8_run(seg, [&](std::string_view run, bool valid) {
      if (!valid) return count(run);
      Pretokenizer::Matches m(impl_->pre, run);
      size_t b = 0, e = 0, last = 0;
      while (m.next(&b, &e)) {
        if (b > last) count(run.substr(last, b - last));
        count(run.substr(b, e - b));
        last = e;
      }
      if (last < run.size()) count(run.substr(last));
    });
  };
  size_t pos = 0;
  while (auto hit = impl_->specials.find(text, pos)) {  // special tokens are never learned
    count_segment(text.substr(pos, hit->begin - pos));
    pos = hit->end;
  }
  count_segment(text.substr(pos));
}

TrainedBpe BpeTrainer::train() const {
  TrainedBpe out;
  out.name = options_.name;
  out.pattern = options_.pattern;
  for (int b = 0; b < 256; ++b) out.tokens.emplace_back(1, static_cast<char>(b));
  BytesMap token_ids;  // bytes -> id, to reuse an id when two merges produce the same bytes
  for (int b = 0; b < 256; ++b) token_ids.insert(out.tokens[b], b);
  const size_t n_special = options_.special_tokens.size();

  // Unique words in sorted order (determinism), as symbol sequences.
  std::vector<std::pair<std::string_view, int64_t>> sorted;
  sorted.reserve(counts_.size());
  for (const auto& [w, c] : counts_) sorted.emplace_back(w, c);
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<int64_t> freq(sorted.size());
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> where;  // pair -> words that (may) contain it
  for (size_t w = 0; w < sorted.size(); ++w) {
    freq[w] = sorted[w].second;
    for (unsigned char c : sorted[w].first) words[w].push_back(c);
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t k = pair_key(words[w][i], words[w][i + 1]);
      pair_count[k] += freq[w];
      auto& list = where[k];
      if (list.empty() || list.back() != static_cast<int32_t>(w)) list.push_back(static_cast<int32_t>(w));
    }
  }

  struct Entry {
    int64_t count;
    uint64_t pair;
  };
  // Max-heap on count; ties: smaller (left bytes, right bytes) first.
  auto worse = [&](const Entry& x, const Entry& y) {
    if (x.count != y.count) return x.count < y.count;
    const std::string& xl = out.tokens[key_left(x.pair)];
    const std::string& yl = out.tokens[key_left(y.pair)];
    if (xl != yl) return xl > yl;
    return out.tokens[key_right(x.pair)] > out.tokens[key_right(y.pair)];
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(worse)> heap(worse);
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  std::vector<int32_t> stamp(words.size(), -1);
  std::unordered_map<uint64_t, int64_t> delta;
  std::vector<int32_t> merged;
  while (out.tokens.size() + n_special < static_cast<size_t>(options_.vocab_size) && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto pc = pair_count.find(top.pair);
    if (pc == pair_count.end() || pc->second != top.count) continue;  // stale entry
    if (top.count < std::max<int64_t>(options_.min_frequency, 1)) break;
    const int32_t a = key_left(top.pair), b = key_right(top.pair);
    const std::string bytes = out.tokens[a] + out.tokens[b];
    int32_t id = token_ids.find(bytes);
    if (id < 0) {
      id = static_cast<int32_t>(out.tokens.size());
      out.tokens.push_back(bytes);
      token_ids.insert(bytes, id);
    }
    const int32_t rank = static_cast<int32_t>(out.merges.size());
    out.merges.push_back({a, b, id});

    // Rewrite every word containing (a, b); record the exact change of each pair count.
    delta.clear();
    const std::vector<int32_t> affected = std::move(where[top.pair]);
    where.erase(top.pair);
    for (int32_t w : affected) {
      if (stamp[w] == rank) continue;
      stamp[w] = rank;
      std::vector<int32_t>& sym = words[w];
      merged.clear();
      bool changed = false;
      for (size_t i = 0; i < sym.size(); ++i) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {  // left to right, non-overlapping
          merged.push_back(id);
          ++i;
          changed = true;
        } else {
          merged.push_back(sym[i]);
        }
      }
      if (!changed) continue;  // stale entry in where[]
      for (size_t i = 0; i + 1 < sym.size(); ++i) delta[pair_key(sym[i], sym[i + 1])] -= freq[w];
      for (size_t i = 0; i + 1 < merged.size(); ++i) {
        const uint64_t k = pair_key(merged[i], merged[i + 1]);
        delta[k] += freq[w];
        if (merged[i] == id || merged[i + 1] == id) {
          auto& list = where[k];
          if (list.empty() || list.back() != w) list.push_back(w);
        }
      }
      sym.swap(merged);
    }
    // Apply in key order so the heap contents do not depend on hash iteration order.
    std::vector<std::pair<uint64_t, int64_t>> changes(delta.begin(), delta.end());
    std::sort(changes.begin(), changes.end());
    for (const auto& [k, d] : changes) {
      if (d == 0) continue;
      int64_t& c = pair_count[k];
      c += d;
      if (c <= 0) {
        pair_count.erase(k);
        where.erase(k);
      } else {
        heap.push({c, k});
      }
    }
  }
  for (size_t i = 0; i < n_special; ++i)
    out.specials.push_back({options_.special_tokens[i], static_cast<int32_t>(out.tokens.size() + i)});
  return out;
}

std::string trained_bpe_to_json(const TrainedBpe& bpe) {
  using ojson = nlohmann::ordered_json;  // keeps the HF key order and vocab in id order
  ojson j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  ojson added = ojson::array();
  for (const SpecialToken& s : bpe.specials)
    added.push_back({{"id", s.id},
                     {"content", s.text},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  if (bpe.pattern == "gpt2") {
    // ByteLevel(use_regex=true) applies the legacy GPT-2 pattern, the one we trained with.
    j["pre_tokenizer"] = {
        {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  } else {
    j["pre_tokenizer"] = {
        {"type", "Sequence"},
        {"pretokenizers",
         ojson::array(
             {ojson{{"type", "Split"},
                    {"pattern", {{"Regex", std::string(trainer_pattern(bpe.pattern))}}},
                    {"behavior", "Removed"},
                    {"invert", true}},
              ojson{
                  {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}})}};
  }
  j["post_processor"] = nullptr;
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  ojson vocab = ojson::object();
  for (size_t id = 0; id < bpe.tokens.size(); ++id) vocab[byte_level_encode(bpe.tokens[id])] = id;
  for (const SpecialToken& s : bpe.specials)  // as in GPT-2's file; added_tokens is what defines them
    if (!vocab.contains(byte_level_encode(s.text))) vocab[byte_level_encode(s.text)] = s.id;
  ojson merges = ojson::array();
  for (const TrainedBpe::Merge& m : bpe.merges)
    merges.push_back(byte_level_encode(bpe.tokens[m.left]) + " " + byte_level_encode(bpe.tokens[m.right]));
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", ""},
                {"end_of_word_suffix", ""},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", false},
                {"vocab", vocab},
                {"merges", merges}};
  j["diffmoe"] = {{"format", "diffmoe-bpe"}, {"version", 1}, {"name", bpe.name}, {"pattern", bpe.pattern}};
  return j.dump(1) + "\n";
}

namespace {

// fsync of a file or directory by path (a rename is durable only once its directory is synced).
void fsync_or_fail(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DIFFMOE_CHECK(fd >= 0, "{}: cannot open for fsync: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DIFFMOE_CHECK(rc == 0, "{}: fsync failed: {}", path, std::strerror(err));
}

}  // namespace

void save_trained_bpe(const TrainedBpe& bpe, const std::filesystem::path& path) {
  // The rename below replaces whatever is at `path`: a device node or a FIFO there is refused.
  io::check_output_path(path.string(), "tokenizer file");
  const std::string text = trained_bpe_to_json(bpe);
  // Unique per process: two trainings of one path (two runs of one config) never share a file.
  const std::string tmp = io::temp_path(path.string());
  io::check_output_path(tmp, "temporary tokenizer file");
  try {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    DIFFMOE_CHECK(f.is_open(), "{}: cannot create: {}", tmp, std::strerror(errno));
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    f.flush();
    DIFFMOE_CHECK(f.good(), "{}: write failed: {}", tmp, std::strerror(errno));
    f.close();
    DIFFMOE_CHECK(!f.fail(), "{}: close failed: {}", tmp, std::strerror(errno));
    fsync_or_fail(tmp);
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);  // a reader never sees a half-written file
    DIFFMOE_CHECK(!ec, "{}: cannot rename {} into place: {}", path.string(), tmp, ec.message());
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);  // best effort; the first error is the one reported
    throw;
  }
  fsync_or_fail(path.has_parent_path() ? path.parent_path().string() : ".");
}

CorpusStats add_documents(BpeTrainer& trainer, const std::vector<std::filesystem::path>& files,
                          const ReaderOptions& reader) {
  CorpusStats stats;
  std::string doc;
  for (const auto& file : files) {
    DocumentReader r(file, reader);
    while (r.next(doc)) {
      trainer.add_text(doc);
      stats.bytes += doc.size();
      ++stats.documents;
    }
  }
  return stats;
}

}  // namespace diffmoe::data
