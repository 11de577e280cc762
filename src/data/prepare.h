// `diffmoe data prepare`: text in, token shards out (token_shard.h).
//
// Pipeline: the calling thread reads documents in input order (text_source.h) and hands batches of
// about batch_bytes (256 KB) of text to a pool of tokenizer threads; a writer thread takes the
// results back in batch order, appends EOS after every document and writes the shards. The output
// therefore does not depend on the thread count: 1 and 64 threads give byte-identical files.
//
// Split: document i (0-based over all non-empty documents, in input order) goes to validation iff
// uniform_at(seed, stream_id("data.val_split"), i) <= val_fraction (core/rng.h), so the split is a
// pure function of (document index, seed) and the same for any thread count.
//
// Output in out_dir: train_0000.bin, train_0001.bin, ... and val_0000.bin, ... (a split's token
// stream is cut every shard_tokens tokens, across document boundaries; the loader treats the
// shards of a split as one stream), plus meta.json (tokenizer path, fingerprint, vocab, EOS,
// options, counts, shard names), written last and atomically. meta.json holds no timings or
// thread count, so the whole directory is reproducible. An earlier meta.json is removed first,
// and shard files of an earlier run that this run did not rewrite are removed at the end.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace diffmoe::data {

struct PrepareOptions {
  std::string inputs;               // comma-separated files, directories, globs (expand_inputs)
  std::string text_field = "text";  // JSONL key
  std::filesystem::path tokenizer;  // any file load_tokenizer() reads; it must have an EOS token
  std::filesystem::path out_dir;
  double val_fraction = 0.0;            // fraction of documents for validation, in [0, 1]
  uint64_t shard_tokens = 100'000'000;  // tokens per shard file
  int threads = 0;                      // tokenizer threads; 0 = std::thread::hardware_concurrency()
  uint64_t seed = 0;                    // the validation split
  bool skip_bad_lines = false;          // JSONL: warn and skip malformed lines instead of failing
  size_t text_doc_bytes = 64 << 10;     // plain text: document size target (text_source.h)
  size_t batch_bytes = 256 << 10;       // text per tokenizer work item (speed only, not the output)
};

struct SplitStats {
  uint64_t documents = 0;
  uint64_t tokens = 0;              // including one EOS per document
  uint64_t bytes = 0;               // shard file sizes
  std::vector<std::string> shards;  // file names in out_dir
};

struct PrepareStats {
  uint64_t files = 0;
  uint64_t documents = 0;
  uint64_t tokens = 0;
  uint64_t text_bytes = 0;    // decompressed input text
  uint64_t input_bytes = 0;   // bytes read from the input files (compressed size for .gz/.zst)
  uint64_t output_bytes = 0;  // shard files
  uint64_t bad_lines = 0;     // skipped JSONL lines (skip_bad_lines)
  double seconds = 0.0;
  SplitStats train, val;
};

// Throws diffmoe::Error (one line, naming the file) on bad input; nothing half-written is left
// under a final name.
PrepareStats prepare_shards(const PrepareOptions& options);

}  // namespace diffmoe::data
