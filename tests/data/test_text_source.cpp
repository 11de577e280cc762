// Input expansion and the document readers (text_source.h): plain text (with paragraph-group
// cuts), JSONL (field, bad lines), gzip (multi-member) and zstd (multi-frame), truncation errors.
#include <gtest/gtest.h>

#include "data/text_source.h"
#include "data_test_util.h"

namespace diffmoe::data {
namespace {

using test::error_of;
using test::TempDir;
using test::write_file;
namespace fs = std::filesystem;

std::vector<std::string> read_all(const fs::path& path, ReaderOptions options = {}) {
  DocumentReader r(path, std::move(options));
  std::vector<std::string> docs;
  std::string text;
  while (r.next(text)) docs.push_back(text);
  return docs;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x;
  return s;
}

std::vector<std::string> rel(const std::vector<fs::path>& files, const fs::path& base) {
  std::vector<std::string> out;
  for (const auto& f : files) out.push_back(fs::relative(f, base).string());
  return out;
}

TEST(ExpandInputs, DirectoriesGlobsFilesInOrder) {
  TempDir d;
  for (const char* f : {"a/z.txt", "a/b.txt", "a/sub/c.jsonl", "a/sub/d.txt.gz", "a/sub/e.jsonl.zst", "a/.hidden/x.txt",
                        "a/.dot.txt", "a/notes.md", "solo.dat", "g/1.txt", "g/2.txt", "g/3.jsonl"})
    write_file(d / f, "x");
  // A directory: recursive, sorted, hidden entries and unknown extensions skipped.
  EXPECT_EQ(rel(expand_inputs((d / "a").string()), d.path()),
            (std::vector<std::string>{"a/b.txt", "a/sub/c.jsonl", "a/sub/d.txt.gz", "a/sub/e.jsonl.zst", "a/z.txt"}));
  // Items keep their order; a glob's matches are sorted; an explicit file with any extension is kept;
  // a file named twice appears once, at its first place.
  const std::string spec = fmt::format("{} , {},{}/g/*.txt,{}", (d / "solo.dat").string(), (d / "g/2.txt").string(),
                                       d.path().string(), (d / "a/b.txt").string());
  EXPECT_EQ(rel(expand_inputs(spec), d.path()),
            (std::vector<std::string>{"solo.dat", "g/2.txt", "g/1.txt", "a/b.txt"}));
  // A glob matching a directory walks it.
  EXPECT_EQ(rel(expand_inputs((d / "?").string()), d.path()),
            (std::vector<std::string>{"a/b.txt", "a/sub/c.jsonl", "a/sub/d.txt.gz", "a/sub/e.jsonl.zst", "a/z.txt",
                                      "g/1.txt", "g/2.txt", "g/3.jsonl"}));
}

TEST(ExpandInputs, NothingMatchedIsAnErrorNamingTheItem) {
  TempDir d;
  write_file(d / "empty/readme.md", "x");
  const std::string pattern = (d / "*.nothing").string();
  EXPECT_NE(error_of([&] { expand_inputs(pattern); }).find("input pattern '" + pattern + "' matches no files"),
            std::string::npos);
  const std::string missing = (d / "missing.txt").string();
  EXPECT_NE(error_of([&] { expand_inputs(missing); }).find(missing), std::string::npos);
  const std::string empty = (d / "empty").string();
  EXPECT_NE(error_of([&] { expand_inputs(empty); }).find("input directory '" + empty + "'"), std::string::npos);
  EXPECT_NE(error_of([&] { expand_inputs(" , "); }).find("names no files"), std::string::npos);
}

TEST(InputKind, ByExtension) {
  EXPECT_EQ(detect_input_kind("a.jsonl.gz").format, TextFormat::kJsonl);
  EXPECT_EQ(detect_input_kind("a.jsonl.gz").compression, Compression::kGzip);
  EXPECT_EQ(detect_input_kind("A.NDJSON.ZST").format, TextFormat::kJsonl);
  EXPECT_EQ(detect_input_kind("A.NDJSON.ZST").compression, Compression::kZstd);
  EXPECT_EQ(detect_input_kind("b.txt.zstd").compression, Compression::kZstd);
  EXPECT_EQ(detect_input_kind("book").format, TextFormat::kText);
  EXPECT_EQ(detect_input_kind("book").compression, Compression::kNone);
  EXPECT_TRUE(is_input_extension("x.text.gz"));
  EXPECT_FALSE(is_input_extension("x.md"));
}

TEST(DocumentReader, SmallTextFileIsOneDocument) {
  TempDir d;
  const std::string text = "Call me Ishmael.\n\nSome years ago \xe2\x80\x94 never mind how long.\n";
  write_file(d / "a.txt", text);
  EXPECT_EQ(read_all(d / "a.txt"), std::vector<std::string>{text});
  write_file(d / "empty.txt", "");
  EXPECT_TRUE(read_all(d / "empty.txt").empty());
}

TEST(DocumentReader, LongTextIsCutAtParagraphGroups) {
  TempDir d;
  const std::string text = test::make_text(1, 3 << 20);  // > one 1 MB read, so cuts span refills
  write_file(d / "long.txt", text);
  const size_t target = 16 << 10;
  const auto docs = read_all(d / "long.txt", {.text_doc_bytes = target});
  ASSERT_GT(docs.size(), 100u);
  EXPECT_EQ(join(docs), text);  // the cuts lose and add nothing
  for (size_t i = 0; i + 1 < docs.size(); ++i) {
    EXPECT_GE(docs[i].size(), target) << i;
    // Cut right after a blank-line run: ends "\n\n", and the next document starts a paragraph.
    EXPECT_TRUE(docs[i].ends_with("\n\n")) << i;
    EXPECT_NE(docs[i + 1][0], '\n') << i;
  }
  // 0 disables cutting.
  EXPECT_EQ(read_all(d / "long.txt", {.text_doc_bytes = 0}), std::vector<std::string>{text});
}

TEST(DocumentReader, TextWithoutNewlinesIsCutBetweenCharacters) {
  TempDir d;
  std::string text;
  while (text.size() < 100000) text += "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80x";  // 2-, 3- and 4-byte characters
  write_file(d / "run.txt", text);
  const auto docs = read_all(d / "run.txt", {.text_doc_bytes = 1000});
  ASSERT_GT(docs.size(), 5u);
  EXPECT_EQ(join(docs), text);
  for (const auto& doc : docs) {
    EXPECT_LE(doc.size(), 16000u);
    EXPECT_NE(static_cast<unsigned char>(doc[0]) & 0xC0, 0x80) << "document starts inside a character";
  }
}

TEST(DocumentReader, JsonlFieldsBlankLinesCrlfAndEscapes) {
  TempDir d;
  write_file(d / "a.jsonl",
             "{\"text\": \"first\", \"id\": 1}\n"
             "\n"
             "   \n"
             "{\"id\": 2, \"text\": \"caf\\u00e9\\nline two\"}\r\n"
             "{\"text\": \"\"}\n"  // empty: skipped
             "{\"text\": \"last, no newline\"}");
  EXPECT_EQ(read_all(d / "a.jsonl"), (std::vector<std::string>{"first", "caf\xc3\xa9\nline two", "last, no newline"}));
  write_file(d / "b.jsonl", "{\"content\": \"A\", \"text\": \"B\"}\n");
  EXPECT_EQ(read_all(d / "b.jsonl", {.text_field = "content"}), std::vector<std::string>{"A"});
}

TEST(DocumentReader, BadJsonlLineNamesFileAndLine) {
  TempDir d;
  const std::string good = "{\"text\": \"ok\"}\n";
  const struct {
    std::string line, says;
  } cases[] = {{"{\"text\": \"unterminated}", "not valid JSON"},
               {"[\"text\"]", "expected a JSON object, found array"},
               {"{\"body\": \"x\"}", "no \"text\" field"},
               {"{\"text\": 42}", "field \"text\" is number, not a string"}};
  for (const auto& c : cases) {
    const fs::path path = d / "bad.jsonl";
    write_file(path, good + "\n" + c.line + "\n" + good);  // the bad line is line 3
    const std::string msg = error_of([&] { read_all(path); });
    EXPECT_NE(msg.find(path.string() + ":3: " + c.says), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  }
  // skip_bad_lines: counted, the good lines still read.
  write_file(d / "mixed.jsonl", good + "nope\n" + good + "{\"text\": null}\n");
  DocumentReader r(d / "mixed.jsonl", {.skip_bad_lines = true});
  std::string text;
  int n = 0;
  while (r.next(text)) ++n;
  EXPECT_EQ(n, 2);
  EXPECT_EQ(r.bad_lines(), 2u);
}

TEST(DocumentReader, GzipMultiMemberAndLargeStream) {
  TempDir d;
  // Two gzip members concatenated (as `cat a.gz b.gz` makes): one stream of lines.
  const std::string part1 = "{\"text\": \"one\"}\n{\"text\": \"two\"}\n", part2 = "{\"text\": \"three\"}\n";
  write_file(d / "a.jsonl.gz", test::gzip(part1) + test::gzip(part2));
  EXPECT_EQ(read_all(d / "a.jsonl.gz"), (std::vector<std::string>{"one", "two", "three"}));
  // Several MB: many inflate calls and reader refills; the bytes come back exactly.
  const std::string text = test::make_text(2, 5 << 20);
  write_file(d / "big.txt.gz", test::gzip(text));
  EXPECT_EQ(join(read_all(d / "big.txt.gz")), text);
  DocumentReader r(d / "big.txt.gz");
  std::string doc;
  while (r.next(doc)) {
  }
  EXPECT_EQ(r.text_bytes(), text.size());
  EXPECT_EQ(r.file_bytes(), fs::file_size(d / "big.txt.gz"));
}

TEST(DocumentReader, ZstdMultiFrame) {
  TempDir d;
  const std::string a = test::make_text(3, 200000), b = test::make_text(4, 3 << 20);
  write_file(d / "x.txt.zst", test::zstd(a) + test::zstd(b));
  EXPECT_EQ(join(read_all(d / "x.txt.zst")), a + b);
  write_file(d / "y.jsonl.zst", test::zstd("{\"text\": \"z\"}\n"));
  EXPECT_EQ(read_all(d / "y.jsonl.zst"), std::vector<std::string>{"z"});
}

TEST(DocumentReader, TruncatedOrCorruptCompressedInputIsAnError) {
  TempDir d;
  const std::string text = test::make_text(5, 300000);
  const std::string gz = test::gzip(text), zs = test::zstd(text);
  write_file(d / "cut.txt.gz", gz.substr(0, gz.size() / 2));
  write_file(d / "cut.txt.zst", zs.substr(0, zs.size() / 2));
  std::string bad = gz;
  for (size_t i = 100; i < 200; ++i) bad[i] = static_cast<char>(bad[i] ^ 0x5a);
  write_file(d / "bad.txt.gz", bad);
  std::string badz = zs;
  for (size_t i = 100; i < 200; ++i) badz[i] = static_cast<char>(badz[i] ^ 0x5a);
  write_file(d / "bad.txt.zst", badz);
  for (const char* name : {"cut.txt.gz", "cut.txt.zst"}) {
    const std::string msg = error_of([&] { read_all(d / name); });
    EXPECT_NE(msg.find((d / name).string() + ": "), std::string::npos) << msg;
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  }
  for (const char* name : {"bad.txt.gz", "bad.txt.zst"}) {
    const std::string msg = error_of([&] { read_all(d / name); });
    EXPECT_NE(msg.find((d / name).string() + ": corrupt"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace diffmoe::data
