// Helpers for the data pipeline tests: a temporary directory per test, file writers, gzip/zstd
// compressors (so the tests build their own compressed inputs), and a small trained tokenizer.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/bpe_trainer.h"

namespace diffmoe::test {

namespace fs = std::filesystem;

// A fresh directory under $TMPDIR, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "diffmoe-data-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& rel) const { return path_ / rel; }

 private:
  fs::path path_;
};

inline void write_file(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

inline std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// One gzip member (windowBits 15 + 16 selects the gzip wrapper).
inline std::string gzip(const std::string& data) {
  z_stream z{};
  if (deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) throw std::runtime_error("deflateInit2");
  std::string out(deflateBound(&z, data.size()) + 32, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  if (rc != Z_STREAM_END) throw std::runtime_error("deflate");
  return out;
}

// One zstd frame with a content checksum (as the zstd command line writes it), so corruption
// is detectable.
inline std::string zstd(const std::string& data) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
  const size_t n = ZSTD_compress2(cctx, out.data(), out.size(), data.data(), data.size());
  ZSTD_freeCCtx(cctx);
  if (ZSTD_isError(n)) throw std::runtime_error(ZSTD_getErrorName(n));
  out.resize(n);
  return out;
}

// Pseudo-English paragraphs (seeded): words from a small list, sentences, blank lines between
// paragraphs, a few non-ASCII characters.
inline std::string make_text(uint64_t seed, size_t bytes) {
  static const char* kWords[] = {"the",   "river", "of",    "light", "ran",  "under", "old",  "stone",
                                 "and",   "café",  "naïve", "whale", "ship", "sea",   "said", "Emma",
                                 "quiet", "north", "abbey", "park",  "—",    "über",  "12",   "years"};
  std::mt19937_64 rng(seed);
  std::string s;
  while (s.size() < bytes) {
    const int sentences = 1 + static_cast<int>(rng() % 5);
    for (int i = 0; i < sentences; ++i) {
      const int words = 3 + static_cast<int>(rng() % 12);
      for (int w = 0; w < words; ++w) {
        std::string word = kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
        if (w == 0) word[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(word[0])));
        s += word;
        s += w + 1 < words ? " " : ". ";
      }
    }
    s += rng() % 3 == 0 ? "\n" : "\n\n";
  }
  return s;
}

// A small diffmoe BPE tokenizer (vocab 400, EOS "<|endoftext|>") trained on make_text.
inline fs::path make_tokenizer(const fs::path& dir, std::vector<std::string> specials = {"<|endoftext|>"}) {
  data::BpeTrainer trainer({.vocab_size = 400, .special_tokens = std::move(specials)});
  trainer.add_text(make_text(99, 40000));
  const fs::path path = dir / "tokenizer.json";
  data::save_trained_bpe(trainer.train(), path);
  return path;
}

// Runs f, which must throw diffmoe::Error; returns the message ("" and a test failure otherwise).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a diffmoe::Error";
  return "";
}

}  // namespace diffmoe::test
