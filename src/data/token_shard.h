// The pre-tokenized shard file written by `diffmoe data prepare` and memory-mapped by the loader.
//
// Layout (all integers little-endian):
//   offset  size  field
//        0     8  magic "DMOESHRD"
//        8     4  version (1)
//       12     4  dtype: bytes per token, 2 (u16, when vocab_size <= 65536) or 4 (u32)
//       16     8  n_tokens
//       24     8  n_documents (documents whose EOS lies in this shard)
//       32     4  vocab_size
//       36     4  eos_id
//       40     8  tokenizer fingerprint: xxh64 (seed 0) of the tokenizer file's bytes, 0 if unknown
//       48    16  reserved, zero
//       64     n_tokens * dtype   the tokens
//      end     8  footer: xxh64 (seed 0) of the token bytes
// A file is valid only at exactly 64 + n_tokens * dtype + 8 bytes. Errors name the file and the
// field: "train_0003.bin: n_tokens says 1000000 tokens but the file holds 524288 (truncated?)".
#pragma once
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace diffmoe::data {

inline constexpr char kShardMagic[8] = {'D', 'M', 'O', 'E', 'S', 'H', 'R', 'D'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;
inline constexpr size_t kShardFooterBytes = 8;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t dtype = 2;  // bytes per token
  uint64_t n_tokens = 0;
  uint64_t n_documents = 0;
  uint32_t vocab_size = 0;
  uint32_t eos_id = 0;
  uint64_t tokenizer_fingerprint = 0;
};

// 2 when every id fits in u16 (vocab_size <= 65536), else 4.
uint32_t shard_dtype_for_vocab(uint32_t vocab_size);
// xxh64 (seed 0) of a file's bytes: the tokenizer fingerprint.
uint64_t file_fingerprint(const std::filesystem::path& path);

struct ShardWriterOptions {
  uint32_t vocab_size = 0;
  uint32_t eos_id = 0;
  uint64_t tokenizer_fingerprint = 0;
};

// Streams tokens to `<path>.tmp`; finish() writes header and footer, fsyncs and renames it to
// `path`, so a reader never sees a half-written shard. Dropping an unfinished writer deletes the
// temporary file.
class ShardWriter {
 public:
  ShardWriter(std::filesystem::path path, ShardWriterOptions options);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Appends ids; each must be in [0, vocab_size) (checked, the error names the file and id).
  void append(std::span<const int32_t> tokens);
  void end_document() { ++header_.n_documents; }
  uint64_t n_tokens() const { return header_.n_tokens; }
  ShardHeader finish();
  const std::filesystem::path& path() const { return path_; }

 private:
  void flush();

  std::filesystem::path path_, tmp_path_;
  ShardHeader header_;
  int fd_ = -1;
  void* hash_state_ = nullptr;  // XXH64_state_t, kept out of this header
  std::vector<unsigned char> buf_;
  bool finished_ = false;
};

struct ShardOpenOptions {
  bool verify_checksum = true;  // xxh64 over the token bytes at open (GB/s; skip for huge sets)
};

// A read-only memory map of one shard, validated at open (magic, version, dtype, vocab/eos,
// reserved bytes, exact size, optionally the checksum). Move-only.
class Shard {
 public:
  explicit Shard(std::filesystem::path path, ShardOpenOptions options = {});
  ~Shard();
  Shard(Shard&& other) noexcept;
  Shard& operator=(Shard&& other) noexcept;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const ShardHeader& header() const { return header_; }
  uint64_t n_tokens() const { return header_.n_tokens; }
  uint64_t footer_checksum() const { return footer_; }
  // Throws "<file>: checksum: ..." if the token bytes do not hash to the footer.
  void verify_checksum() const;
  // Tokens [begin, begin + count) widened to int32 into out (bounds-checked).
  void read(uint64_t begin, uint64_t count, int32_t* out) const;
  std::vector<int32_t> read_all() const;

 private:
  void release();

  std::filesystem::path path_;
  ShardHeader header_;
  const unsigned char* map_ = nullptr;
  size_t map_bytes_ = 0;
  uint64_t footer_ = 0;
};

}  // namespace diffmoe::data
