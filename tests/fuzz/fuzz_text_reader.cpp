// The text and JSONL readers (data/text_source.h), plain and compressed: the first input byte
// picks the file name (.txt, .jsonl, and .gz / .zst of both), the rest is the file. Plain text is
// cut into small documents (64 bytes) to exercise the cut search; for plain text the documents
// must add up to exactly the file's bytes.
#include "core/error.h"
#include "data/text_source.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const char* kNames[] = {"in.txt", "in.jsonl", "in.txt.gz", "in.jsonl.gz", "in.txt.zst", "in.jsonl.zst"};
  const unsigned mode = data[0] % 6;
  const std::string_view body = diffmoe::fuzz::as_text(data + 1, size - 1);
  const std::string path = diffmoe::fuzz::scratch_dir() + "/" + kNames[mode];
  diffmoe::fuzz::write_file(path, body);
  for (const bool skip : {false, true}) {
    try {
      diffmoe::data::DocumentReader r(
          path, diffmoe::data::ReaderOptions{.skip_bad_lines = skip, .text_doc_bytes = 64, .max_warnings = 0});
      std::string doc, all;
      while (r.next(doc)) all += doc;
      if (mode == 0 && all != body) diffmoe::fuzz::finding("the documents of a text file do not add up to its bytes");
    } catch (const diffmoe::Error&) {
    }
  }
  return 0;
}
