// Token shard writer and memory-mapped reader (token_shard.h).
#include "data/token_shard.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "core/error.h"
#include "data/tokenizer.h"
#include "io/file_util.h"

namespace diffmoe::data {

namespace fs = std::filesystem;

// Tokens are copied between the file and memory with memcpy, which is only the file's byte order
// on a little-endian host (x86-64, aarch64: every machine we build for).
static_assert(std::endian::native == std::endian::little, "token shards assume a little-endian host");

namespace {

constexpr size_t kWriteBuffer = 1 << 20;

void put_u32(unsigned char* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put_u64(unsigned char* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t get_u32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void write_all(int fd, const void* data, size_t n, const fs::path& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    DIFFMOE_CHECK(w > 0, "{}: write failed: {}", path.string(), std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Shows foreign magic bytes readably: printable ASCII as is, the rest as \xNN.
std::string escape_bytes(const unsigned char* p, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i)
    s += p[i] >= 0x20 && p[i] < 0x7f ? std::string(1, static_cast<char>(p[i])) : fmt::format("\\x{:02x}", p[i]);
  return s;
}

}  // namespace

uint32_t shard_dtype_for_vocab(uint32_t vocab_size) { return vocab_size <= 65536u ? 2u : 4u; }

uint64_t file_fingerprint(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  DIFFMOE_CHECK(in.good(), "{}: cannot open to fingerprint", path.string());
  XXH64_state_t* state = XXH64_createState();
  XXH64_reset(state, 0);
  std::vector<char> buf(1 << 16);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    XXH64_update(state, buf.data(), static_cast<size_t>(in.gcount()));
  }
  const uint64_t h = XXH64_digest(state);
  XXH64_freeState(state);
  return h;
}

// ---- ShardWriter ----

ShardWriter::ShardWriter(fs::path path, ShardWriterOptions options) : path_(std::move(path)) {
  DIFFMOE_CHECK(options.vocab_size > 0, "{}: vocab_size must be positive", path_.string());
  DIFFMOE_CHECK(options.eos_id < options.vocab_size, "{}: eos_id {} is not below vocab_size {}", path_.string(),
                options.eos_id, options.vocab_size);
  header_.dtype = shard_dtype_for_vocab(options.vocab_size);
  header_.vocab_size = options.vocab_size;
  header_.eos_id = options.eos_id;
  header_.tokenizer_fingerprint = options.tokenizer_fingerprint;
  tmp_path_ = path_;
  tmp_path_ += ".tmp";
  // finish() renames over `path`: a device node or FIFO there (or at the temporary) is refused.
  io::check_output_path(path_.string(), "token shard");
  io::check_output_path(tmp_path_.string(), "temporary token shard");
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DIFFMOE_CHECK(fd_ >= 0, "{}: cannot create: {}", tmp_path_.string(), std::strerror(errno));
  const unsigned char placeholder[kShardHeaderBytes] = {};  // rewritten by finish()
  write_all(fd_, placeholder, sizeof(placeholder), tmp_path_);
  auto* state = XXH64_createState();
  XXH64_reset(state, 0);
  hash_state_ = state;
  buf_.reserve(kWriteBuffer + 4);
}

ShardWriter::~ShardWriter() {
  if (!finished_) {
    if (fd_ >= 0) ::close(fd_);
    ::unlink(tmp_path_.c_str());
  }
  XXH64_freeState(static_cast<XXH64_state_t*>(hash_state_));
}

void ShardWriter::append(std::span<const int32_t> tokens) {
  DIFFMOE_CHECK(!finished_, "{}: append after finish", path_.string());
  const size_t width = header_.dtype;
  for (const int32_t t : tokens) {
    DIFFMOE_CHECK(t >= 0 && static_cast<uint32_t>(t) < header_.vocab_size, "{}: token id {} is outside [0, {})",
                  path_.string(), t, header_.vocab_size);
    const uint32_t v = static_cast<uint32_t>(t);
    const size_t at = buf_.size();
    buf_.resize(at + width);
    std::memcpy(buf_.data() + at, &v, width);  // little-endian: the low bytes come first
    if (buf_.size() >= kWriteBuffer) flush();
  }
  header_.n_tokens += tokens.size();
}

void ShardWriter::flush() {
  if (buf_.empty()) return;
  XXH64_update(static_cast<XXH64_state_t*>(hash_state_), buf_.data(), buf_.size());
  write_all(fd_, buf_.data(), buf_.size(), tmp_path_);
  buf_.clear();
}

ShardHeader ShardWriter::finish() {
  DIFFMOE_CHECK(!finished_, "{}: finish called twice", path_.string());
  flush();
  unsigned char footer[kShardFooterBytes];
  put_u64(footer, XXH64_digest(static_cast<XXH64_state_t*>(hash_state_)));
  write_all(fd_, footer, sizeof(footer), tmp_path_);

  unsigned char h[kShardHeaderBytes] = {};
  std::memcpy(h, kShardMagic, 8);
  put_u32(h + 8, header_.version);
  put_u32(h + 12, header_.dtype);
  put_u64(h + 16, header_.n_tokens);
  put_u64(h + 24, header_.n_documents);
  put_u32(h + 32, header_.vocab_size);
  put_u32(h + 36, header_.eos_id);
  put_u64(h + 40, header_.tokenizer_fingerprint);
  DIFFMOE_CHECK(::pwrite(fd_, h, sizeof(h), 0) == static_cast<ssize_t>(sizeof(h)), "{}: header write failed: {}",
                tmp_path_.string(), std::strerror(errno));
  DIFFMOE_CHECK(::fsync(fd_) == 0, "{}: fsync failed: {}", tmp_path_.string(), std::strerror(errno));
  ::close(fd_);
  fd_ = -1;
  std::error_code ec;
  fs::rename(tmp_path_, path_, ec);
  DIFFMOE_CHECK(!ec, "{}: cannot rename {} into place: {}", path_.string(), tmp_path_.string(), ec.message());
  // The rename is durable only once the directory entry is synced.
  const fs::path dir = path_.has_parent_path() ? path_.parent_path() : fs::path(".");
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  finished_ = true;
  return header_;
}

// ---- Shard ----

Shard::Shard(fs::path path, ShardOpenOptions options) : path_(std::move(path)) {
  const std::string name = path_.string();
  // O_NONBLOCK: a FIFO in a shard directory must be refused below, not block the open forever.
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  DIFFMOE_CHECK(fd >= 0, "{}: cannot open: {}", name, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    DIFFMOE_FAIL("{}: cannot stat: {}", name, std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    DIFFMOE_FAIL("{}: is {}, not a regular file", name, io::file_type_name(st.st_mode));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < kShardHeaderBytes) {
    ::close(fd);
    DIFFMOE_FAIL("{}: header: the file is {} bytes, shorter than the {}-byte header (truncated?)", name, size,
                 kShardHeaderBytes);
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file open
  DIFFMOE_CHECK(map != MAP_FAILED, "{}: mmap failed: {}", name, std::strerror(errno));
  map_ = static_cast<const unsigned char*>(map);
  map_bytes_ = size;
  try {
    const unsigned char* h = map_;
    DIFFMOE_CHECK(std::memcmp(h, kShardMagic, 8) == 0,
                  "{}: magic: expected \"DMOESHRD\", found \"{}\" (not a diffmoe token shard)", name,
                  escape_bytes(h, 8));
    header_.version = get_u32(h + 8);
    header_.dtype = get_u32(h + 12);
    header_.n_tokens = get_u64(h + 16);
    header_.n_documents = get_u64(h + 24);
    header_.vocab_size = get_u32(h + 32);
    header_.eos_id = get_u32(h + 36);
    header_.tokenizer_fingerprint = get_u64(h + 40);
    DIFFMOE_CHECK(header_.version == kShardVersion, "{}: version: {} is not supported (this build reads version {})",
                  name, header_.version, kShardVersion);
    DIFFMOE_CHECK(header_.dtype == 2 || header_.dtype == 4,
                  "{}: dtype: {} is not a token size (expected 2 for u16 or 4 for u32)", name, header_.dtype);
    DIFFMOE_CHECK(header_.vocab_size > 0, "{}: vocab_size: 0", name);
    DIFFMOE_CHECK(header_.vocab_size <= static_cast<uint32_t>(kMaxTokenizerVocab),
                  "{}: vocab_size: {} is over the largest supported vocabulary ({} ids)", name, header_.vocab_size,
                  kMaxTokenizerVocab);
    DIFFMOE_CHECK(header_.dtype == 4 || header_.vocab_size <= 65536u,
                  "{}: vocab_size: {} does not fit dtype 2 (u16 ids stop at 65535)", name, header_.vocab_size);
    DIFFMOE_CHECK(header_.eos_id < header_.vocab_size, "{}: eos_id: {} is not below vocab_size {}", name,
                  header_.eos_id, header_.vocab_size);
    for (size_t i = 48; i < kShardHeaderBytes; ++i)
      DIFFMOE_CHECK(h[i] == 0, "{}: reserved: byte {} is {} (must be zero; written by a newer format?)", name, i, h[i]);
    const uint64_t body =
        size >= kShardHeaderBytes + kShardFooterBytes ? size - kShardHeaderBytes - kShardFooterBytes : 0;
    const uint64_t holds = body / header_.dtype;
    // Compare counts, not n_tokens * dtype, which can overflow for a garbage n_tokens.
    DIFFMOE_CHECK(header_.n_tokens <= holds, "{}: n_tokens says {} tokens but the file holds {} (truncated?)", name,
                  header_.n_tokens, holds);
    const uint64_t expected = kShardHeaderBytes + header_.n_tokens * header_.dtype + kShardFooterBytes;
    DIFFMOE_CHECK(size == expected, "{}: n_tokens says {} tokens but the file holds {} ({} unexpected trailing bytes)",
                  name, header_.n_tokens, holds, size - expected);
    footer_ = get_u64(map_ + size - kShardFooterBytes);
    if (options.verify_checksum) verify_checksum();
  } catch (...) {
    release();
    throw;
  }
}

Shard::~Shard() { release(); }

void Shard::release() {
  if (map_ != nullptr) ::munmap(const_cast<unsigned char*>(map_), map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

Shard::Shard(Shard&& o) noexcept
    : path_(std::move(o.path_)), header_(o.header_), map_(o.map_), map_bytes_(o.map_bytes_), footer_(o.footer_) {
  o.map_ = nullptr;
  o.map_bytes_ = 0;
}

Shard& Shard::operator=(Shard&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    header_ = o.header_;
    map_ = o.map_;
    map_bytes_ = o.map_bytes_;
    footer_ = o.footer_;
    o.map_ = nullptr;
    o.map_bytes_ = 0;
  }
  return *this;
}

void Shard::verify_checksum() const {
  const uint64_t actual = XXH64(map_ + kShardHeaderBytes, header_.n_tokens * header_.dtype, 0);
  DIFFMOE_CHECK(actual == footer_,
                "{}: checksum: the footer says {:016x} but the token bytes hash to {:016x} (corrupted)", path_.string(),
                footer_, actual);
}

void Shard::read(uint64_t begin, uint64_t count, int32_t* out) const {
  DIFFMOE_CHECK(begin <= header_.n_tokens && count <= header_.n_tokens - begin,
                "{}: read of tokens [{}, {}) past n_tokens {}", path_.string(), begin, begin + count, header_.n_tokens);
  const unsigned char* p = map_ + kShardHeaderBytes + begin * header_.dtype;
  // Every id must be below the shard's vocab_size (which open() bounds): a corrupt id would
  // otherwise index past the embedding table, far from here. One compare per token.
  uint32_t worst = 0;
  if (header_.dtype == 2) {
    for (uint64_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      out[i] = v;
      worst = std::max<uint32_t>(worst, v);
    }
  } else {
    for (uint64_t i = 0; i < count; ++i) {
      uint32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      out[i] = static_cast<int32_t>(v);
      worst = std::max(worst, v);
    }
  }
  if (worst >= header_.vocab_size) {
    for (uint64_t i = 0; i < count; ++i) {
      const uint32_t v = static_cast<uint32_t>(out[i]);
      DIFFMOE_CHECK(v < header_.vocab_size,
                    "{}: token {} (byte offset {}) is id {}, outside the shard's vocabulary [0, {}) (corrupted?)",
                    path_.string(), begin + i, kShardHeaderBytes + (begin + i) * header_.dtype, v, header_.vocab_size);
    }
  }
}

std::vector<int32_t> Shard::read_all() const {
  std::vector<int32_t> out(header_.n_tokens);
  read(0, header_.n_tokens, out.data());
  return out;
}

}  // namespace diffmoe::data
