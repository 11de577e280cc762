// Byte-level BPE shared by the tiktoken, HF and diffmoe tokenizers (docs/formats.md §1c "Encode algorithm").
//
// Two merge rules, one loop:
//  * by bytes (tiktoken): merge the adjacent pair whose *concatenated bytes* has the lowest rank;
//    the token id of a byte string is its rank.
//  * by pairs (HF tokenizer.json): merge the adjacent pair (left id, right id) that appears first
//    in `merges`; the result has id vocab[left + right].
// Both merge the leftmost pair among equal ranks, both stop when no adjacent pair is mergeable.
// Pieces shorter than kSmallPiece bytes use the O(n^2) vector scan, longer ones a heap over a
// linked list (O(n log n)), as tiktoken does, because long runs of one character occur in real data.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::data {

// Open-addressing hash map from byte strings to int32 values; the keys live in one arena.
// Lookups by string_view never allocate (this sits on the encode hot path).
class BytesMap {
 public:
  // Returns false (and changes nothing) if `key` is already present.
  bool insert(std::string_view key, int32_t value);
  // -1 when absent (all stored values are >= 0).
  int32_t find(std::string_view key) const;
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0;
    uint32_t length = 0;
    int32_t value = -1;  // -1: empty slot
  };
  void grow();
  std::string arena_;
  std::vector<Slot> slots_;
  size_t size_ = 0;
};

// Open-addressing hash map from (left id, right id) to (merge rank, merged id).
class PairMap {
 public:
  struct Merge {
    int32_t rank = -1;
    int32_t id = -1;
  };
  bool insert(int32_t left, int32_t right, Merge m);  // false if the pair is already present
  Merge find(int32_t left, int32_t right) const;      // rank -1 when absent
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t key = 0;
    Merge merge;  // merge.rank == -1: empty slot
  };
  void grow();
  std::vector<Slot> slots_;
  size_t size_ = 0;
};

inline constexpr size_t kSmallPiece = 128;

// Merge rule by bytes. `ranks` maps every mergeable byte string to its rank (= token id).
// Appends the ids of `piece` to `out`. Every single byte of `piece` must be in `ranks`; a byte
// that is not throws (only a truncated rank file can cause that).
void bpe_merge_by_bytes(std::string_view piece, const BytesMap& ranks, std::vector<int32_t>& out);

// Merge rule by pairs. byte_ids[b] is the id of the one-byte token b (-1 when absent: throws).
void bpe_merge_by_pairs(std::string_view piece, const std::array<int32_t, 256>& byte_ids, const PairMap& merges,
                        std::vector<int32_t>& out);

// GPT-2's byte <-> unicode alphabet used by HF byte-level vocabularies (docs/formats.md §1c
// "Byte-level mapping"): `!`..`~`, `¡`..`¬`, `®`..`ÿ` map to themselves, the other 68 bytes to
// U+0100 + n in increasing byte order.
std::string byte_level_encode(std::string_view bytes);                // raw bytes -> UTF-8 text
std::optional<std::string> byte_level_decode(std::string_view text);  // nullopt if a char is outside the alphabet

}  // namespace diffmoe::data
