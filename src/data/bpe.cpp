// BPE merge loop (see bpe.h). Design: one template engine, parameterised by the pair rule, so the
// tiktoken and HF paths cannot drift apart in tie-breaking or stopping.
#include "data/bpe.h"

#include <cstring>
#include <limits>
#include <queue>

#include "core/error.h"

namespace diffmoe::data {
namespace {

constexpr int32_t kNone = std::numeric_limits<int32_t>::max();

uint64_t hash_bytes(std::string_view s) {
  // 64-bit multiply-xorshift over 8-byte words; keys are short token strings.
  constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;
  uint64_t h = 0x243F6A8885A308D3ull ^ (s.size() * kMul);
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
  }
  uint64_t tail = 0;
  if (i < s.size()) std::memcpy(&tail, s.data() + i, s.size() - i);
  h = (h ^ tail) * kMul;
  h ^= h >> 32;
  return h;
}

uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

struct Candidate {
  int32_t rank = kNone;
  int32_t id = -1;
};

// The merge engine. `pair(lb, mid, re, left_id, right_id)` returns the Candidate for merging the
// part [lb, mid) with the part [mid, re).
template <class PairFn>
void merge_small(std::string_view piece, const int32_t* init_ids, PairFn&& pair, std::vector<int32_t>& out) {
  struct Part {
    uint32_t start;
    int32_t id;
    Candidate next;  // merge of this part with the following one
  };
  const size_t n0 = piece.size();
  std::array<Part, kSmallPiece + 1> parts;
  for (size_t i = 0; i < n0; ++i) parts[i] = {static_cast<uint32_t>(i), init_ids[i], {}};
  parts[n0] = {static_cast<uint32_t>(n0), -1, {}};
  size_t n = n0;  // number of live parts; parts[n] is the end sentinel
  for (size_t i = 0; i + 1 < n; ++i)
    parts[i].next = pair(parts[i].start, parts[i + 1].start, parts[i + 2].start, parts[i].id, parts[i + 1].id);
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i)
      if (parts[i].next.rank < parts[best].next.rank) best = i;  // strict: leftmost minimum
    if (parts[best].next.rank == kNone) break;
    parts[best].id = parts[best].next.id;
    for (size_t i = best + 1; i < n; ++i) parts[i] = parts[i + 1];  // also moves the sentinel
    --n;
    parts[best].next = best + 1 < n ? pair(parts[best].start, parts[best + 1].start, parts[best + 2].start,
                                           parts[best].id, parts[best + 1].id)
                                    : Candidate{};
    if (best > 0)
      parts[best - 1].next =
          pair(parts[best - 1].start, parts[best].start, parts[best + 1].start, parts[best - 1].id, parts[best].id);
  }
  for (size_t i = 0; i < n; ++i) out.push_back(parts[i].id);
}

template <class PairFn>
void merge_large(std::string_view piece, const int32_t* init_ids, PairFn&& pair, std::vector<int32_t>& out) {
  // Parts are named by their first byte; next_[p] is the start of the following part (n = end).
  const uint32_t n = static_cast<uint32_t>(piece.size());
  std::vector<uint32_t> next(n), prev(n);
  std::vector<int32_t> id(init_ids, init_ids + n);
  std::vector<uint8_t> alive(n, 1);
  for (uint32_t i = 0; i < n; ++i) {
    next[i] = i + 1;
    prev[i] = i == 0 ? 0 : i - 1;
  }
  struct Entry {
    int32_t rank;
    uint32_t left, mid, end;  // the pair [left, mid) + [mid, end) at push time
    int32_t id;
    bool operator>(const Entry& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
  auto push = [&](uint32_t l) {
    const uint32_t m = next[l];
    if (m >= n) return;
    const uint32_t e = next[m];
    const Candidate c = pair(l, m, e, id[l], id[m]);
    if (c.rank != kNone) heap.push({c.rank, l, m, e, c.id});
  };
  for (uint32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    // Stale unless both parts still exist with the same boundaries (then the pair, its rank and
    // result are unchanged, because a part's id is determined by its bytes).
    if (!alive[top.left] || next[top.left] != top.mid || !alive[top.mid] || next[top.mid] != top.end) continue;
    id[top.left] = top.id;
    alive[top.mid] = 0;
    next[top.left] = top.end;
    if (top.end < n) prev[top.end] = top.left;
    if (top.left > 0) push(prev[top.left]);
    push(top.left);
  }
  for (uint32_t p = 0; p < n; p = next[p]) out.push_back(id[p]);
}

template <class PairFn>
void merge_piece(std::string_view piece, const int32_t* init_ids, PairFn&& pair, std::vector<int32_t>& out) {
  if (piece.size() <= kSmallPiece) merge_small(piece, init_ids, pair, out);
  else merge_large(piece, init_ids, pair, out);
}

}  // namespace

// ---- BytesMap ----
void BytesMap::grow() {
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(old.empty() ? 1024 : old.size() * 2, Slot{});
  const size_t mask = slots_.size() - 1;
  for (const Slot& s : old) {
    if (s.value < 0) continue;
    size_t i = s.hash & mask;
    while (slots_[i].value >= 0) i = (i + 1) & mask;
    slots_[i] = s;
  }
}

bool BytesMap::insert(std::string_view key, int32_t value) {
  DIFFMOE_CHECK(value >= 0, "[bpe] BytesMap values must be >= 0, got {}", value);
  DIFFMOE_CHECK(arena_.size() + key.size() < std::numeric_limits<uint32_t>::max(), "[bpe] token arena overflow");
  if ((size_ + 1) * 2 > slots_.size()) grow();  // load factor <= 1/2
  const uint64_t h = hash_bytes(key);
  const size_t mask = slots_.size() - 1;
  size_t i = h & mask;
  for (; slots_[i].value >= 0; i = (i + 1) & mask) {
    const Slot& s = slots_[i];
    if (s.hash == h && std::string_view(arena_).substr(s.offset, s.length) == key) return false;
  }
  slots_[i] = {h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(key.size()), value};
  arena_.append(key);
  ++size_;
  return true;
}

int32_t BytesMap::find(std::string_view key) const {
  if (slots_.empty()) return -1;
  const uint64_t h = hash_bytes(key);
  const size_t mask = slots_.size() - 1;
  for (size_t i = h & mask; slots_[i].value >= 0; i = (i + 1) & mask) {
    const Slot& s = slots_[i];
    if (s.hash == h && s.length == key.size() && std::memcmp(arena_.data() + s.offset, key.data(), key.size()) == 0)
      return s.value;
  }
  return -1;
}

// ---- PairMap ----
void PairMap::grow() {
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(old.empty() ? 1024 : old.size() * 2, Slot{});
  const size_t mask = slots_.size() - 1;
  for (const Slot& s : old) {
    if (s.merge.rank < 0) continue;
    size_t i = mix64(s.key) & mask;
    while (slots_[i].merge.rank >= 0) i = (i + 1) & mask;
    slots_[i] = s;
  }
}

bool PairMap::insert(int32_t left, int32_t right, Merge m) {
  DIFFMOE_CHECK(m.rank >= 0 && m.id >= 0, "[bpe] PairMap merge rank/id must be >= 0");
  if ((size_ + 1) * 2 > slots_.size()) grow();
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  const size_t mask = slots_.size() - 1;
  size_t i = mix64(key) & mask;
  for (; slots_[i].merge.rank >= 0; i = (i + 1) & mask)
    if (slots_[i].key == key) return false;
  slots_[i] = {key, m};
  ++size_;
  return true;
}

PairMap::Merge PairMap::find(int32_t left, int32_t right) const {
  if (slots_.empty()) return {};
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  const size_t mask = slots_.size() - 1;
  for (size_t i = mix64(key) & mask; slots_[i].merge.rank >= 0; i = (i + 1) & mask)
    if (slots_[i].key == key) return slots_[i].merge;
  return {};
}

// ---- merge rules ----
void bpe_merge_by_bytes(std::string_view piece, const BytesMap& ranks, std::vector<int32_t>& out) {
  if (piece.empty()) return;
  std::vector<int32_t> heap_ids;
  std::array<int32_t, kSmallPiece> small_ids;
  int32_t* ids = small_ids.data();
  if (piece.size() > kSmallPiece) {
    heap_ids.resize(piece.size());
    ids = heap_ids.data();
  }
  for (size_t i = 0; i < piece.size(); ++i) {
    ids[i] = ranks.find(piece.substr(i, 1));
    DIFFMOE_CHECK(ids[i] >= 0, "[bpe] byte 0x{:02x} has no rank (incomplete rank file?)",
                  static_cast<unsigned char>(piece[i]));
  }
  auto pair = [&](uint32_t lb, uint32_t, uint32_t re, int32_t, int32_t) {
    const int32_t r = ranks.find(piece.substr(lb, re - lb));
    return r < 0 ? Candidate{} : Candidate{r, r};
  };
  merge_piece(piece, ids, pair, out);
}

void bpe_merge_by_pairs(std::string_view piece, const std::array<int32_t, 256>& byte_ids, const PairMap& merges,
                        std::vector<int32_t>& out) {
  if (piece.empty()) return;
  std::vector<int32_t> heap_ids;
  std::array<int32_t, kSmallPiece> small_ids;
  int32_t* ids = small_ids.data();
  if (piece.size() > kSmallPiece) {
    heap_ids.resize(piece.size());
    ids = heap_ids.data();
  }
  for (size_t i = 0; i < piece.size(); ++i) {
    ids[i] = byte_ids[static_cast<unsigned char>(piece[i])];
    DIFFMOE_CHECK(ids[i] >= 0, "[bpe] byte 0x{:02x} has no token in the vocabulary",
                  static_cast<unsigned char>(piece[i]));
  }
  auto pair = [&](uint32_t, uint32_t, uint32_t, int32_t l, int32_t r) {
    const PairMap::Merge m = merges.find(l, r);
    return m.rank < 0 ? Candidate{} : Candidate{m.rank, m.id};
  };
  merge_piece(piece, ids, pair, out);
}

// ---- GPT-2 byte-level alphabet ----
namespace {
struct ByteLevelTables {
  std::array<char32_t, 256> to_cp{};
  std::array<int16_t, 324> from_cp{};  // code points used are < 0x100 + 68
  ByteLevelTables() {
    from_cp.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool self = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = self ? static_cast<char32_t>(b) : static_cast<char32_t>(0x100 + extra++);
      from_cp[to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteLevelTables& byte_level_tables() {
  static const ByteLevelTables t;  // immutable after construction (thread-safe init)
  return t;
}
}  // namespace

std::string byte_level_encode(std::string_view bytes) {
  const auto& t = byte_level_tables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) {
    const char32_t cp = t.to_cp[b];
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else {  // all code points are < 0x800: two UTF-8 bytes
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  return out;
}

std::optional<std::string> byte_level_decode(std::string_view text) {
  const auto& t = byte_level_tables();
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const auto c0 = static_cast<unsigned char>(text[i]);
    char32_t cp;
    if (c0 < 0x80) {
      cp = c0;
      i += 1;
    } else if ((c0 & 0xE0) == 0xC0 && i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80) {
      cp = ((c0 & 0x1Fu) << 6) | (static_cast<unsigned char>(text[i + 1]) & 0x3Fu);
      i += 2;
    } else {
      return std::nullopt;
    }
    if (cp >= t.from_cp.size() || t.from_cp[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(t.from_cp[cp]));
  }
  return out;
}

}  // namespace diffmoe::data
