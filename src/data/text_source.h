// Streaming text input for `diffmoe data prepare`: which files an input spec names, and the
// documents inside one file.
//
// Formats, chosen by extension (after stripping a compression suffix):
//  * .jsonl / .ndjson: one JSON object per line; the document is the string under the text field
//    (default "text"). Blank lines are skipped. A line that is not an object with a string field
//    is an error "file:line: ..." (or, with skip_bad_lines, counted and warned about on stderr).
//  * .txt / .text (and any other extension named explicitly or by a glob): plain text, one
//    document per file. Long files are cut into documents of about `text_doc_bytes` (64 KB) so
//    the tokenizer pool has parallel work and the validation split has more than one unit per
//    book: after that many bytes, the next cut is made right after the last newline of a run of
//    blank lines (a paragraph-group boundary). A file with no blank line within 16x that size is
//    cut at its last newline, failing that at a UTF-8 character boundary. The documents of one
//    file, concatenated, are exactly its bytes; prepare joins them with EOS like any documents.
//    Near a cut the token ids of the blank-line run may differ from tokenizing the file whole
//    (GPT-2's pattern splits "\n\n" differently at the end of a string); the bytes never do.
//  * compression: ".gz" (zlib inflate, concatenated members are read as one stream) and
//    ".zst"/".zstd" (ZSTD streaming, multiple frames) of either format. A truncated or corrupt
//    stream is an error naming the file.
//  * Parquet is not supported (it needs a columnar decoder; convert to JSONL first).
// Empty documents (empty text, or an empty file) are skipped.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::data {

// Expands a comma-separated input spec into files. Each item is
//  * a file: taken as is (even with an unrecognised extension: then it is read as plain text);
//  * a directory: walked recursively, keeping files whose extension is_input_extension() accepts
//    (hidden files and folders, names starting with '.', are skipped);
//  * a glob(3) pattern (contains * ? or [): its matches, directories among them walked as above.
// Each item's files are sorted by their path bytes (locale-independent); items keep the order
// given; a file named twice is kept at its first place. Throws diffmoe::Error naming the item
// when it matches nothing (missing file, empty glob, directory without input files).
std::vector<std::filesystem::path> expand_inputs(std::string_view spec);

enum class TextFormat { kText, kJsonl };
enum class Compression { kNone, kGzip, kZstd };
struct InputKind {
  TextFormat format = TextFormat::kText;
  Compression compression = Compression::kNone;
};
// By extension: "x.jsonl.gz" -> {kJsonl, kGzip}; unknown extensions -> kText.
InputKind detect_input_kind(const std::filesystem::path& path);
// True for the extensions a directory walk keeps: .txt .text .jsonl .ndjson, optionally + .gz/.zst/.zstd.
bool is_input_extension(const std::filesystem::path& path);

// A byte stream over one (possibly compressed) file; read() returns 0 only at the end.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual size_t read(char* dst, size_t capacity) = 0;
  // Bytes read from the file itself so far (compressed size for .gz/.zst).
  virtual uint64_t file_bytes_read() const = 0;
};
std::unique_ptr<ByteSource> open_byte_source(const std::filesystem::path& path, Compression compression);

struct ReaderOptions {
  std::string text_field = "text";   // JSONL: the key holding the document text
  bool skip_bad_lines = false;       // JSONL: count and warn instead of throwing
  size_t text_doc_bytes = 64 << 10;  // plain text: target document size; 0 = one document per file
  int max_warnings = 10;             // per file, with skip_bad_lines; the rest are only counted
};

class DocumentReader {
 public:
  explicit DocumentReader(std::filesystem::path path, ReaderOptions options = {});
  ~DocumentReader();
  DocumentReader(const DocumentReader&) = delete;
  DocumentReader& operator=(const DocumentReader&) = delete;

  // The next non-empty document into `text`; false at the end of the file.
  bool next(std::string& text);
  const std::filesystem::path& path() const { return path_; }
  InputKind kind() const { return kind_; }
  uint64_t bad_lines() const { return bad_lines_; }    // JSONL lines skipped (skip_bad_lines)
  uint64_t text_bytes() const { return text_bytes_; }  // decompressed bytes consumed so far
  uint64_t file_bytes() const { return source_->file_bytes_read(); }

 private:
  bool fill();  // appends more decompressed bytes to buf_; false at the end of the stream
  bool next_text(std::string& text);
  bool next_jsonl(std::string& text);
  size_t find_text_cut(size_t limit) const;

  std::filesystem::path path_;
  ReaderOptions options_;
  InputKind kind_;
  std::unique_ptr<ByteSource> source_;
  std::string buf_;  // decompressed bytes not yet returned start at buf_[pos_]
  size_t pos_ = 0;
  bool eof_ = false;
  uint64_t line_ = 0;  // JSONL: 1-based number of the last line read
  uint64_t bad_lines_ = 0;
  uint64_t text_bytes_ = 0;
};

}  // namespace diffmoe::data
