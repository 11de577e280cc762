// extract_rdata: decode an R lazy-load database (Rdata.rdb) of character vectors into text files,
// without R (docs/formats.md §3.1 "How to get it without R").
//
//   extract_rdata <Rdata.rdb> <out_dir>
//
// The .rdb is a concatenation of objects, each a 4-byte big-endian uncompressed length followed by
// one zlib stream. Each inflated body is an R XDR serialization: "X\n", int32 version (2 or 3),
// writer and minimum-reader versions, for version 3 the native encoding name, then one item.
// We accept a STRSXP (character vector) at the top, write its elements joined by "\n" (no trailing
// newline; NA becomes an empty line) to <out_dir>/object_NNN.txt, and print one line per object.
// Attributes (Moby Dick's vector has `names`) are parsed to check the stream, then ignored.
// Every error names the file, the object's byte offset in it and, inside a body, the body offset.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

// SEXP types and flag bits of R's serialize.c format (R Internals, "Serialization Formats").
constexpr int kSymSxp = 1;
constexpr int kListSxp = 2;  // pairlist: attributes are one
constexpr int kCharSxp = 9;
constexpr int kLglSxp = 10;
constexpr int kIntSxp = 13;
constexpr int kRealSxp = 14;
constexpr int kStrSxp = 16;
constexpr int kNilValueSxp = 254;
constexpr int kRefSxp = 255;
constexpr uint32_t kHasAttrBit = 1u << 9;
constexpr uint32_t kHasTagBit = 1u << 10;
constexpr int kMaxDepth = 64;                     // attribute pairlists nest a few levels at most
constexpr uint64_t kMaxObjectBytes = 1ull << 31;  // sanity bound on a declared length
constexpr size_t kLengthPrefixBytes = 4;

class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

uint32_t be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Reads one XDR-serialized R object from an inflated body.
class XdrReader {
 public:
  XdrReader(std::string_view body, std::string context) : body_(body), context_(std::move(context)) {}

  // Parses the header and a top-level STRSXP; returns its elements (NA as an empty string).
  std::vector<std::string> read_character_vector(bool& has_attributes, bool& has_na) {
    expect_bytes("X\n", "serialization format (only XDR \"X\\n\" is supported)");
    const int32_t version = read_i32("format version");
    read_i32("writer version");
    read_i32("minimum reader version");
    if (version == 3) {
      const int32_t n = read_i32("native encoding length");
      if (n < 0 || n > 64) fail("bad native encoding length " + std::to_string(n));
      take(static_cast<size_t>(n), "native encoding");
    } else if (version != 2) {
      fail("unsupported serialization version " + std::to_string(version));
    }
    const size_t at = pos_;
    const uint32_t flags = read_u32("top-level flags");
    if ((flags & 0xFFu) != kStrSxp)
      fail("top-level object has SEXP type " + std::to_string(flags & 0xFFu) + ", expected STRSXP (16)", at);
    std::vector<std::string> out;
    const uint64_t n = read_length();
    if (n > body_.size()) fail("vector length " + std::to_string(n) + " exceeds the body", at);
    out.reserve(n);
    has_na = false;
    for (uint64_t i = 0; i < n; ++i) {
      bool na = false;
      out.push_back(read_charsxp(na));
      has_na = has_na || na;
    }
    has_attributes = (flags & kHasAttrBit) != 0;
    if (has_attributes) skip_item(1);
    if (pos_ != body_.size()) fail(std::to_string(body_.size() - pos_) + " unexpected trailing bytes after the object");
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what, size_t at) const {
    throw Failure(context_ + ", body offset " + std::to_string(at) + ": " + what);
  }
  [[noreturn]] void fail(const std::string& what) const { fail(what, pos_); }

  std::string_view take(size_t n, const char* what) {
    if (body_.size() - pos_ < n)
      fail(std::string("truncated body reading ") + what + " (" + std::to_string(n) + " bytes needed, " +
           std::to_string(body_.size() - pos_) + " left)");
    const std::string_view s = body_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  void expect_bytes(std::string_view want, const char* what) {
    if (take(want.size(), what) != want) fail(std::string("bad ") + what, pos_ - want.size());
  }
  uint32_t read_u32(const char* what) { return be32(reinterpret_cast<const unsigned char*>(take(4, what).data())); }
  int32_t read_i32(const char* what) { return static_cast<int32_t>(read_u32(what)); }

  // Vector length: int32, or -1 followed by two int32 halves for long vectors.
  uint64_t read_length() {
    const int32_t n = read_i32("vector length");
    if (n >= 0) return static_cast<uint64_t>(n);
    if (n != -1) fail("negative vector length " + std::to_string(n));
    const uint64_t hi = read_u32("long length (high)");
    return (hi << 32) | read_u32("long length (low)");
  }

  std::string read_charsxp(bool& na) {
    const size_t at = pos_;
    const uint32_t flags = read_u32("CHARSXP flags");
    if ((flags & 0xFFu) != kCharSxp) fail("expected CHARSXP (9), found SEXP type " + std::to_string(flags & 0xFFu), at);
    const int32_t len = read_i32("CHARSXP length");
    na = (len == -1);  // NA_STRING
    if (na) return {};
    if (len < 0) fail("bad CHARSXP length " + std::to_string(len), at);
    return std::string(take(static_cast<size_t>(len), "CHARSXP bytes"));
  }

  // Parses and discards one item of the few types attributes use here.
  void skip_item(int depth) {
    if (depth > kMaxDepth) fail("items nested deeper than " + std::to_string(kMaxDepth));
    const size_t at = pos_;
    const uint32_t flags = read_u32("item flags");
    const int type = static_cast<int>(flags & 0xFFu);
    switch (type) {
      case kNilValueSxp: return;
      case kRefSxp:
        if ((flags >> 8) == 0) read_u32("reference index");  // index too large to pack in flags
        return;
      case kSymSxp: skip_item(depth + 1); return;  // the symbol's name, a CHARSXP
      case kCharSxp: {
        const int32_t len = read_i32("CHARSXP length");
        if (len > 0) take(static_cast<size_t>(len), "CHARSXP bytes");
        return;
      }
      case kListSxp:
        // attributes?, tag?, CAR, then CDR (usually another LISTSXP or NILVALUE)
        if (flags & kHasAttrBit) skip_item(depth + 1);
        if (flags & kHasTagBit) skip_item(depth + 1);
        skip_item(depth + 1);
        skip_item(depth + 1);
        return;
      case kStrSxp: {
        const uint64_t n = read_length();
        for (uint64_t i = 0; i < n; ++i) {
          bool na = false;
          read_charsxp(na);
        }
        break;
      }
      case kLglSxp:
      case kIntSxp: take(checked_bytes(read_length(), 4), "integer vector"); break;
      case kRealSxp: take(checked_bytes(read_length(), 8), "double vector"); break;
      default: fail("unsupported SEXP type " + std::to_string(type) + " in attributes", at);
    }
    if (flags & kHasAttrBit) skip_item(depth + 1);
  }

  size_t checked_bytes(uint64_t n, uint64_t width) {
    if (n > body_.size() / width) fail("vector length " + std::to_string(n) + " exceeds the body");
    return static_cast<size_t>(n * width);
  }

  std::string_view body_;
  std::string context_;
  size_t pos_ = 0;
};

// Inflates the zlib stream starting at `in`; returns the body and sets `consumed` to the stream's
// compressed size, so the next object starts right after it.
std::string inflate_object(std::string_view in, uint32_t declared, const std::string& context, size_t& consumed) {
  if (declared > kMaxObjectBytes)
    throw Failure(context + ": declared length " + std::to_string(declared) + " too large");
  if (in.empty()) throw Failure(context + ": truncated: no compressed data after the length");
  // R's lazy-load DBs mark bzip2 with '2' and xz with 'Z' after the length (R's serialize.c).
  if (in[0] == '2' || in[0] == 'Z')
    throw Failure(context + ": bzip2/xz-compressed object (type '" + std::string(1, in[0]) +
                  "'), only zlib is supported");
  std::string out(declared, '\0');
  z_stream zs{};
  if (inflateInit(&zs) != Z_OK) throw Failure(context + ": inflateInit failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = static_cast<uInt>(std::min<size_t>(in.size(), UINT32_MAX));
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = declared;
  const int rc = inflate(&zs, Z_FINISH);
  const std::string msg = zs.msg ? zs.msg : "";
  const uLong produced = zs.total_out;
  consumed = zs.total_in;
  const bool input_exhausted = zs.avail_in == 0;
  inflateEnd(&zs);
  if (rc == Z_STREAM_END) {
    if (produced != declared)
      throw Failure(context + ": inflated to " + std::to_string(produced) + " bytes, length prefix says " +
                    std::to_string(declared));
    return out;
  }
  if (rc == Z_DATA_ERROR) throw Failure(context + ": corrupt zlib stream (" + msg + ")");
  if (rc == Z_MEM_ERROR) throw Failure(context + ": out of memory inflating");
  if (input_exhausted)
    throw Failure(context + ": truncated zlib stream (input ended after " + std::to_string(consumed) + " bytes)");
  throw Failure(context + ": zlib stream inflates to more than the declared " + std::to_string(declared) + " bytes");
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure(path + ": cannot open");
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Failure(path + ": read error");
  return s;
}

void write_file(const std::filesystem::path& path, const std::vector<std::string>& lines) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Failure(path.string() + ": cannot create");
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i > 0) out.put('\n');
    out.write(lines[i].data(), static_cast<std::streamsize>(lines[i].size()));
  }
  out.close();
  if (!out) throw Failure(path.string() + ": write failed");
}

int run(const std::string& rdb_path, const std::filesystem::path& out_dir) {
  const std::string file = read_file(rdb_path);
  if (file.empty()) throw Failure(rdb_path + ": empty file");
  std::filesystem::create_directories(out_dir);
  size_t offset = 0;
  int index = 0;
  while (offset < file.size()) {
    const std::string context = rdb_path + ": object " + std::to_string(index) + " at byte " + std::to_string(offset);
    if (file.size() - offset < kLengthPrefixBytes)
      throw Failure(context + ": truncated length prefix (" + std::to_string(file.size() - offset) + " bytes left)");
    const uint32_t declared = be32(reinterpret_cast<const unsigned char*>(file.data() + offset));
    size_t consumed = 0;
    const std::string body =
        inflate_object(std::string_view(file).substr(offset + kLengthPrefixBytes), declared, context, consumed);
    bool has_attributes = false, has_na = false;
    XdrReader reader(body, context);
    const std::vector<std::string> lines = reader.read_character_vector(has_attributes, has_na);

    char name[32];
    std::snprintf(name, sizeof(name), "object_%03d.txt", index);
    write_file(out_dir / name, lines);
    size_t bytes = lines.empty() ? 0 : lines.size() - 1;
    for (const auto& l : lines) bytes += l.size();
    std::cout << name << " offset=" << offset << " elements=" << lines.size() << " bytes=" << bytes
              << " attributes=" << (has_attributes ? "yes" : "no") << " na=" << (has_na ? "yes" : "no") << "\n";
    offset += kLengthPrefixBytes + consumed;
    ++index;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: extract_rdata <Rdata.rdb> <out_dir>\n"
                 "Writes each character vector as <out_dir>/object_NNN.txt (elements joined by \\n).\n";
    return 2;
  }
  try {
    return run(argv[1], argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "extract_rdata: error: " << e.what() << "\n";
    return 1;
  }
}
