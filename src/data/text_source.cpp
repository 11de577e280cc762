// Input expansion, decompressing byte sources and the document reader (text_source.h).
#include "data/text_source.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <glob.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"

namespace diffmoe::data {

namespace fs = std::filesystem;

namespace {

constexpr size_t kReadBytes = 1 << 20;     // decompressed bytes fetched per fill()
constexpr size_t kFileChunk = 1 << 18;     // compressed bytes fetched per refill
constexpr size_t kTextHardCutFactor = 16;  // no blank line within 16x the target: cut anyway

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// The file name without its compression suffix, lowercased, and the compression it names.
std::pair<std::string, Compression> strip_compression(const fs::path& path) {
  std::string name = lower(path.filename().string());
  for (auto [suffix, c] :
       {std::pair{std::string_view(".gz"), Compression::kGzip}, std::pair{std::string_view(".zst"), Compression::kZstd},
        std::pair{std::string_view(".zstd"), Compression::kZstd}})
    if (ends_with(name, suffix)) return {name.substr(0, name.size() - suffix.size()), c};
  return {name, Compression::kNone};
}

class FileSource final : public ByteSource {
 public:
  explicit FileSource(const fs::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    DIFFMOE_CHECK(fd_ >= 0, "{}: cannot open: {}", path.string(), std::strerror(errno));
  }
  ~FileSource() override { ::close(fd_); }
  size_t read(char* dst, size_t capacity) override {
    for (;;) {
      const ssize_t n = ::read(fd_, dst, capacity);
      if (n >= 0) {
        bytes_ += static_cast<uint64_t>(n);
        return static_cast<size_t>(n);
      }
      DIFFMOE_CHECK(errno == EINTR, "{}: read failed: {}", path_.string(), std::strerror(errno));
    }
  }
  uint64_t file_bytes_read() const override { return bytes_; }

 private:
  fs::path path_;
  int fd_ = -1;
  uint64_t bytes_ = 0;
};

// zlib inflate with gzip/zlib header auto-detection (windowBits 15 + 32). Concatenated gzip
// members (what `cat a.gz b.gz` and parallel compressors produce) are read as one stream.
class GzipSource final : public ByteSource {
 public:
  explicit GzipSource(const fs::path& path) : file_(path), path_(path), in_(kFileChunk) {
    DIFFMOE_CHECK(inflateInit2(&z_, 15 + 32) == Z_OK, "{}: inflateInit2 failed", path.string());
  }
  ~GzipSource() override { inflateEnd(&z_); }
  size_t read(char* dst, size_t capacity) override {
    z_.next_out = reinterpret_cast<Bytef*>(dst);
    z_.avail_out = static_cast<uInt>(std::min<size_t>(capacity, 1u << 30));
    const uInt want = z_.avail_out;
    while (z_.avail_out == want && !ended_) {
      if (z_.avail_in == 0 && !file_eof_) {
        const size_t n = file_.read(in_.data(), in_.size());
        file_eof_ = n == 0;
        z_.next_in = reinterpret_cast<Bytef*>(in_.data());
        z_.avail_in = static_cast<uInt>(n);
      }
      if (!in_member_) {
        if (z_.avail_in == 0) {  // no bytes after the last member: the end
          ended_ = true;
          break;
        }
        inflateReset(&z_);
        in_member_ = true;
      }
      const uInt out_before = z_.avail_out, in_before = z_.avail_in;
      const int rc = inflate(&z_, Z_NO_FLUSH);
      if (rc == Z_STREAM_END) {
        in_member_ = false;
        continue;
      }
      const bool stuck = rc == Z_BUF_ERROR || (z_.avail_out == out_before && z_.avail_in == in_before);
      DIFFMOE_CHECK(rc == Z_OK || rc == Z_BUF_ERROR, "{}: corrupt gzip data ({})", path_.string(),
                    z_.msg != nullptr ? z_.msg : "inflate error");
      DIFFMOE_CHECK(!(stuck && file_eof_ && z_.avail_in == 0), "{}: gzip stream ends early (truncated file?)",
                    path_.string());
    }
    return want - z_.avail_out;
  }
  uint64_t file_bytes_read() const override { return file_.file_bytes_read(); }

 private:
  FileSource file_;
  fs::path path_;
  std::vector<char> in_;
  z_stream z_{};
  bool in_member_ = false, file_eof_ = false, ended_ = false;
};

// ZSTD streaming decompression; a file may hold several frames.
class ZstdSource final : public ByteSource {
 public:
  explicit ZstdSource(const fs::path& path) : file_(path), path_(path), in_(kFileChunk) {
    ds_ = ZSTD_createDStream();
    DIFFMOE_CHECK(ds_ != nullptr, "{}: ZSTD_createDStream failed", path.string());
    ZSTD_initDStream(ds_);
  }
  ~ZstdSource() override { ZSTD_freeDStream(ds_); }
  size_t read(char* dst, size_t capacity) override {
    ZSTD_outBuffer out{dst, capacity, 0};
    while (out.pos == 0) {
      if (zin_.pos == zin_.size && !file_eof_) {
        const size_t n = file_.read(in_.data(), in_.size());
        file_eof_ = n == 0;
        zin_ = ZSTD_inBuffer{in_.data(), n, 0};
      }
      const bool no_input = zin_.pos == zin_.size;
      if (no_input && hint_ == 0) return 0;  // at a frame boundary with nothing left: the end
      const size_t r = ZSTD_decompressStream(ds_, &out, &zin_);
      DIFFMOE_CHECK(!ZSTD_isError(r), "{}: corrupt zstd data ({})", path_.string(), ZSTD_getErrorName(r));
      hint_ = r;
      DIFFMOE_CHECK(!(no_input && out.pos == 0 && hint_ != 0), "{}: zstd stream ends early (truncated file?)",
                    path_.string());
    }
    return out.pos;
  }
  uint64_t file_bytes_read() const override { return file_.file_bytes_read(); }

 private:
  FileSource file_;
  fs::path path_;
  std::vector<char> in_;
  ZSTD_DStream* ds_ = nullptr;
  ZSTD_inBuffer zin_{nullptr, 0, 0};
  size_t hint_ = 0;  // 0: the last frame is complete (or none started)
  bool file_eof_ = false;
};

bool has_glob_chars(std::string_view s) { return s.find_first_of("*?[") != std::string_view::npos; }

// Recursive walk keeping input files; hidden entries are skipped, symlinked folders not followed.
void walk_directory(const fs::path& dir, std::vector<fs::path>& out) {
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    const std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file() && is_input_extension(it->path())) out.push_back(it->path());
  }
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

}  // namespace

InputKind detect_input_kind(const fs::path& path) {
  const auto [name, compression] = strip_compression(path);
  const bool jsonl = ends_with(name, ".jsonl") || ends_with(name, ".ndjson");
  return {jsonl ? TextFormat::kJsonl : TextFormat::kText, compression};
}

bool is_input_extension(const fs::path& path) {
  const std::string name = strip_compression(path).first;
  for (std::string_view ext : {".txt", ".text", ".jsonl", ".ndjson"})
    if (ends_with(name, ext)) return true;
  return false;
}

std::vector<fs::path> expand_inputs(std::string_view spec) {
  std::vector<fs::path> files;
  std::set<std::string> seen;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = std::min(spec.find(',', start), spec.size());
    const std::string item(trim(spec.substr(start, comma - start)));
    start = comma + 1;
    if (item.empty()) continue;
    std::vector<fs::path> found;
    if (has_glob_chars(item)) {
      glob_t g{};
      const int rc = ::glob(item.c_str(), 0, nullptr, &g);
      if (rc == 0)
        for (size_t i = 0; i < g.gl_pathc; ++i) {
          const fs::path p = g.gl_pathv[i];
          if (fs::is_directory(p)) walk_directory(p, found);
          else if (fs::is_regular_file(p)) found.push_back(p);
        }
      globfree(&g);
      DIFFMOE_CHECK(rc == 0 || rc == GLOB_NOMATCH, "input pattern '{}': glob failed (error {})", item, rc);
      DIFFMOE_CHECK(!found.empty(), "input pattern '{}' matches no files", item);
    } else if (fs::is_directory(item)) {
      walk_directory(item, found);
      DIFFMOE_CHECK(!found.empty(),
                    "input directory '{}' holds no .txt/.text/.jsonl/.ndjson files (optionally .gz/.zst)", item);
    } else {
      std::error_code ec;
      const fs::file_status st = fs::status(item, ec);
      DIFFMOE_CHECK(fs::exists(st), "input '{}': no such file or directory", item);
      DIFFMOE_CHECK(fs::is_regular_file(st),
                    "input '{}': not a regular file, directory or glob (a FIFO or device would never end)", item);
      found.emplace_back(item);
    }
    std::sort(found.begin(), found.end(), [](const fs::path& a, const fs::path& b) { return a.string() < b.string(); });
    for (fs::path& p : found)
      if (seen.insert(fs::weakly_canonical(p).string()).second) files.push_back(std::move(p));
  }
  DIFFMOE_CHECK(!files.empty(), "input spec '{}' names no files", spec);
  return files;
}

std::unique_ptr<ByteSource> open_byte_source(const fs::path& path, Compression compression) {
  switch (compression) {
    case Compression::kGzip: return std::make_unique<GzipSource>(path);
    case Compression::kZstd: return std::make_unique<ZstdSource>(path);
    case Compression::kNone: break;
  }
  return std::make_unique<FileSource>(path);
}

DocumentReader::DocumentReader(fs::path path, ReaderOptions options)
    : path_(std::move(path)), options_(std::move(options)), kind_(detect_input_kind(path_)) {
  source_ = open_byte_source(path_, kind_.compression);
}

DocumentReader::~DocumentReader() = default;

bool DocumentReader::fill() {
  if (eof_) return false;
  if (pos_ > 0 && pos_ >= buf_.size() / 2) {  // drop what was consumed before growing
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  const size_t old = buf_.size();
  buf_.resize(old + kReadBytes);
  const size_t n = source_->read(buf_.data() + old, kReadBytes);
  buf_.resize(old + n);
  eof_ = n == 0;
  return n > 0;
}

bool DocumentReader::next(std::string& text) {
  return kind_.format == TextFormat::kJsonl ? next_jsonl(text) : next_text(text);
}

// Where to end the current plain-text document: the offset (from pos_) just after the last
// newline of the first blank-line run that starts at or after pos_ + limit - 1; npos when none
// is known yet (a run that reaches the end of the buffer is only complete at end of file).
size_t DocumentReader::find_text_cut(size_t limit) const {
  const size_t end = buf_.size();
  auto is_blank = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; };
  size_t p = pos_ + limit - 1;
  while (p < end) {
    const void* hit = std::memchr(buf_.data() + p, '\n', end - p);
    if (hit == nullptr) return std::string::npos;
    p = static_cast<size_t>(static_cast<const char*>(hit) - buf_.data());
    size_t last_nl = p, q = p + 1;
    for (;;) {  // swallow following lines that hold only blanks
      size_t j = q;
      while (j < end && is_blank(buf_[j])) ++j;
      if (j == end) {
        if (!eof_) return std::string::npos;  // the run may continue in the next read
        return end - pos_;
      }
      if (buf_[j] != '\n') break;
      last_nl = j;
      q = j + 1;
    }
    if (last_nl != p) return last_nl + 1 - pos_;
    p = q;  // a single newline: keep looking
  }
  return std::string::npos;
}

bool DocumentReader::next_text(std::string& text) {
  const size_t limit = options_.text_doc_bytes;
  for (;;) {
    const size_t avail = buf_.size() - pos_;
    size_t take = std::string::npos;
    if (limit > 0 && avail >= limit) {
      take = find_text_cut(limit);
      const size_t hard = kTextHardCutFactor * limit;
      if (take == std::string::npos && avail >= hard) {
        // No paragraph break in a long stretch: cut at the last newline, else between characters.
        const std::string_view window(buf_.data() + pos_, hard);
        const size_t nl = window.rfind('\n');
        if (nl != std::string_view::npos && nl > 0) {
          take = nl + 1;
        } else {
          // Never start the next document on a UTF-8 continuation byte (a character is <= 4 bytes).
          auto continuation = [&](size_t i) { return (static_cast<unsigned char>(buf_[pos_ + i]) & 0xC0) == 0x80; };
          take = hard;
          while (take > hard - 4 && take < avail && continuation(take)) --take;
        }
      }
    }
    if (take == std::string::npos && eof_) {
      if (avail == 0) return false;
      take = avail;
    }
    if (take != std::string::npos) {
      text.assign(buf_, pos_, take);
      pos_ += take;
      text_bytes_ += take;
      return true;
    }
    fill();
  }
}

bool DocumentReader::next_jsonl(std::string& text) {
  using nlohmann::json;
  for (;;) {
    size_t scanned = 0;  // bytes after pos_ already known to hold no newline
    size_t nl;
    for (;;) {
      nl = buf_.find('\n', pos_ + scanned);
      if (nl != std::string::npos) break;
      scanned = buf_.size() - pos_;
      if (!fill()) break;
    }
    if (nl == std::string::npos) {
      if (pos_ == buf_.size()) return false;
      nl = buf_.size();  // last line without a newline
    }
    const std::string_view line = trim(std::string_view(buf_).substr(pos_, nl - pos_));
    const size_t consumed = std::min(nl + 1, buf_.size()) - pos_;
    text_bytes_ += consumed;
    ++line_;
    std::string problem;
    if (!line.empty()) {
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      const std::string& field = options_.text_field;
      if (j.is_discarded()) {
        problem = "not valid JSON";
      } else if (!j.is_object()) {
        problem = fmt::format("expected a JSON object, found {}", j.type_name());
      } else if (auto it = j.find(field); it == j.end()) {
        problem = fmt::format("no \"{}\" field (set the text field to the key that holds the text)", field);
      } else if (!it->is_string()) {
        problem = fmt::format("field \"{}\" is {}, not a string", field, it->type_name());
      } else {
        text = it->get_ref<const std::string&>();
      }
    }
    pos_ += consumed;
    if (line.empty()) continue;
    if (!problem.empty()) {
      DIFFMOE_CHECK(options_.skip_bad_lines, "{}:{}: {}", path_.string(), line_, problem);
      if (++bad_lines_ <= static_cast<uint64_t>(options_.max_warnings))
        fmt::print(stderr, "warning: {}:{}: {} (line skipped)\n", path_.string(), line_, problem);
      continue;
    }
    if (!text.empty()) return true;
  }
}

}  // namespace diffmoe::data
