// prepare_shards (prepare.h): reader -> tokenizer pool -> in-order writer.
#include "data/prepare.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <thread>

#include "core/error.h"
#include "core/rng.h"
#include "data/text_source.h"
#include "data/token_shard.h"
#include "data/tokenizer.h"
#include "io/file_util.h"
#include "io/run_lock.h"

namespace diffmoe::data {

namespace fs = std::filesystem;

namespace {

// Documents per work item at most (tiny JSONL lines); the text size per item is
// PrepareOptions::batch_bytes: big enough that queue traffic is negligible next to tokenizing,
// small enough that a few MB of corpus still spreads over several threads.
constexpr size_t kBatchMaxDocs = 4096;
constexpr int kInFlightPerThread = 4;  // bounds memory: batches read but not yet written

struct Batch {
  uint64_t seq = 0;
  std::vector<std::string> texts;
  std::vector<char> is_val;                  // per document
  std::vector<std::vector<int32_t>> tokens;  // per document, filled by a worker
  size_t bytes = 0;
};

// One split's shard sequence: cuts the stream every shard_tokens tokens.
class SplitWriter {
 public:
  SplitWriter(fs::path dir, std::string prefix, ShardWriterOptions options, uint64_t shard_tokens)
      : dir_(std::move(dir)), prefix_(std::move(prefix)), options_(options), shard_tokens_(shard_tokens) {}

  void append_document(std::span<const int32_t> tokens, int32_t eos) {
    append(tokens);
    append(std::span<const int32_t>(&eos, 1));
    current_->end_document();  // counted in the shard that holds the EOS
    ++stats_.documents;
  }

  SplitStats finish() {
    close_current();
    return stats_;
  }

 private:
  void append(std::span<const int32_t> tokens) {
    while (!tokens.empty()) {
      // Rolled lazily, so a shard that ends exactly on an EOS still counts that document.
      if (current_ != nullptr && current_->n_tokens() == shard_tokens_) close_current();
      if (current_ == nullptr) {
        const std::string name = fmt::format("{}_{:04d}.bin", prefix_, stats_.shards.size());
        current_ = std::make_unique<ShardWriter>(dir_ / name, options_);
        stats_.shards.push_back(name);
      }
      const size_t n = static_cast<size_t>(std::min<uint64_t>(shard_tokens_ - current_->n_tokens(), tokens.size()));
      current_->append(tokens.first(n));
      tokens = tokens.subspan(n);
      stats_.tokens += n;
    }
  }
  void close_current() {
    if (current_ == nullptr) return;
    const ShardHeader h = current_->finish();
    stats_.bytes += kShardHeaderBytes + h.n_tokens * h.dtype + kShardFooterBytes;
    current_.reset();
  }

  fs::path dir_;
  std::string prefix_;
  ShardWriterOptions options_;
  uint64_t shard_tokens_;
  std::unique_ptr<ShardWriter> current_;
  SplitStats stats_;
};

// The queues between the reader (caller's thread), the tokenizer pool and the writer thread.
// One mutex: a batch is ~256 KB of text, so lock traffic is negligible.
struct Pipeline {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::unique_ptr<Batch>> todo;
  std::map<uint64_t, std::unique_ptr<Batch>> done;  // tokenized, waiting for their turn
  uint64_t issued = 0, written = 0;
  bool closed = false;
  std::exception_ptr error;

  void fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mu);
    if (!error) error = e;
    cv.notify_all();
  }
};

void write_file_atomic(const fs::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp";
  io::check_output_path(path.string(), "shard index");  // the rename would replace a device node or FIFO
  io::check_output_path(tmp.string(), "temporary shard index");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DIFFMOE_CHECK(fd >= 0, "{}: cannot create: {}", tmp.string(), std::strerror(errno));
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  ::close(fd);
  DIFFMOE_CHECK(ok, "{}: write failed: {}", tmp.string(), std::strerror(errno));
  std::error_code ec;
  fs::rename(tmp, path, ec);
  DIFFMOE_CHECK(!ec, "{}: cannot rename into place: {}", path.string(), ec.message());
}

nlohmann::json split_json(const SplitStats& s) {
  return {{"documents", s.documents}, {"tokens", s.tokens}, {"bytes", s.bytes}, {"shards", s.shards}};
}

// Removes train_NNNN.bin / val_NNNN.bin files that an earlier run left and this one did not write.
void remove_stale_shards(const fs::path& dir, const PrepareStats& stats) {
  std::set<std::string> keep(stats.train.shards.begin(), stats.train.shards.end());
  keep.insert(stats.val.shards.begin(), stats.val.shards.end());
  static const std::regex kShardName(R"((train|val)_[0-9]{4,}\.bin)");
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, kShardName) && !keep.contains(name)) fs::remove(entry.path());
  }
}

}  // namespace

PrepareStats prepare_shards(const PrepareOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  DIFFMOE_CHECK(options.val_fraction >= 0.0 && options.val_fraction <= 1.0,
                "[prepare] val_fraction {} is not in [0, 1]", options.val_fraction);
  DIFFMOE_CHECK(options.shard_tokens > 0, "[prepare] shard_tokens must be positive");
  DIFFMOE_CHECK(options.batch_bytes > 0, "[prepare] batch_bytes must be positive");
  DIFFMOE_CHECK(!options.out_dir.empty(), "[prepare] no output directory given");
  io::check_output_path(options.out_dir.string(), "shard directory", io::OutputKind::kDirectory);  // before any work
  const std::vector<fs::path> files = expand_inputs(options.inputs);
  const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(options.tokenizer);
  const std::optional<int32_t> eos = tokenizer->eos_id();
  DIFFMOE_CHECK(eos.has_value(), "{}: the tokenizer has no end-of-text token; prepare needs one to join documents",
                options.tokenizer.string());
  const ShardWriterOptions shard_options{.vocab_size = static_cast<uint32_t>(tokenizer->vocab_size()),
                                         .eos_id = static_cast<uint32_t>(*eos),
                                         .tokenizer_fingerprint = file_fingerprint(options.tokenizer)};
  fs::create_directories(options.out_dir);
  // One writer: two prepares into one directory would write the same temporary shard files.
  const RunLock lock(sibling_lock_path(options.out_dir.string()), options.out_dir.string(),
                     "wait for that preparation to finish, or prepare into another directory");
  fs::remove(options.out_dir / "meta.json");  // no stale description while shards are rewritten

  const int threads =
      options.threads > 0 ? options.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const uint64_t max_in_flight = static_cast<uint64_t>(kInFlightPerThread * threads + 2);
  const uint64_t split_stream = stream_id("data.val_split");

  PrepareStats stats;
  stats.files = files.size();
  SplitWriter train(options.out_dir, "train", shard_options, options.shard_tokens);
  SplitWriter val(options.out_dir, "val", shard_options, options.shard_tokens);
  Pipeline p;

  auto worker = [&] {
    try {
      for (;;) {
        std::unique_ptr<Batch> b;
        {
          std::unique_lock<std::mutex> lock(p.mu);
          p.cv.wait(lock, [&] { return !p.todo.empty() || p.closed || p.error; });
          if (p.error || p.todo.empty()) return;
          b = std::move(p.todo.front());
          p.todo.pop_front();
        }
        b->tokens.resize(b->texts.size());
        for (size_t i = 0; i < b->texts.size(); ++i) b->tokens[i] = tokenizer->encode(b->texts[i]);
        b->texts = {};
        std::lock_guard<std::mutex> lock(p.mu);
        const uint64_t seq = b->seq;
        p.done.emplace(seq, std::move(b));
        p.cv.notify_all();
      }
    } catch (...) {
      p.fail(std::current_exception());
    }
  };
  auto writer = [&] {
    try {
      for (;;) {
        std::unique_ptr<Batch> b;
        {
          std::unique_lock<std::mutex> lock(p.mu);
          p.cv.wait(lock, [&] { return p.done.contains(p.written) || (p.closed && p.written == p.issued) || p.error; });
          if (p.error || !p.done.contains(p.written)) return;
          auto node = p.done.extract(p.written);
          b = std::move(node.mapped());
        }
        for (size_t i = 0; i < b->tokens.size(); ++i) (b->is_val[i] ? val : train).append_document(b->tokens[i], *eos);
        std::lock_guard<std::mutex> lock(p.mu);
        ++p.written;
        p.cv.notify_all();
      }
    } catch (...) {
      p.fail(std::current_exception());
    }
  };

  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back(worker);
  std::thread writer_thread(writer);

  // Reading happens here, in input order, so document indices (and the split) are fixed.
  try {
    auto batch = std::make_unique<Batch>();
    bool stop = false;  // a worker or the writer failed: stop reading
    auto submit = [&] {
      if (batch->texts.empty()) return;
      std::unique_lock<std::mutex> lock(p.mu);
      p.cv.wait(lock, [&] { return p.issued - p.written < max_in_flight || p.error; });
      stop = p.error != nullptr;
      if (stop) return;
      batch->seq = p.issued++;
      p.todo.push_back(std::move(batch));
      p.cv.notify_all();
      batch = std::make_unique<Batch>();
    };
    const ReaderOptions reader_options{.text_field = options.text_field,
                                       .skip_bad_lines = options.skip_bad_lines,
                                       .text_doc_bytes = options.text_doc_bytes};
    std::string text;
    for (size_t f = 0; f < files.size() && !stop; ++f) {
      DocumentReader reader(files[f], reader_options);
      while (!stop && reader.next(text)) {
        const bool is_val = uniform_at(options.seed, split_stream, stats.documents) <= options.val_fraction;
        ++stats.documents;
        batch->bytes += text.size();
        batch->texts.push_back(std::move(text));
        batch->is_val.push_back(is_val ? 1 : 0);
        if (batch->bytes >= options.batch_bytes || batch->texts.size() >= kBatchMaxDocs) submit();
      }
      stats.text_bytes += reader.text_bytes();
      stats.input_bytes += reader.file_bytes();
      stats.bad_lines += reader.bad_lines();
    }
    if (!stop) submit();
  } catch (...) {
    p.fail(std::current_exception());
  }
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.closed = true;
    p.cv.notify_all();
  }
  for (std::thread& t : pool) t.join();
  writer_thread.join();
  if (p.error) std::rethrow_exception(p.error);  // unfinished ShardWriters delete their temp files

  stats.train = train.finish();
  stats.val = val.finish();
  stats.tokens = stats.train.tokens + stats.val.tokens;
  stats.output_bytes = stats.train.bytes + stats.val.bytes;
  remove_stale_shards(options.out_dir, stats);

  std::vector<std::string> file_names;
  for (const fs::path& f : files) file_names.push_back(f.string());
  const nlohmann::json meta = {{"format", "diffmoe-token-shards"},
                               {"version", kShardVersion},
                               {"tokenizer",
                                {{"path", fs::absolute(options.tokenizer).string()},
                                 {"fingerprint", fmt::format("{:016x}", shard_options.tokenizer_fingerprint)},
                                 {"name", tokenizer->name()},
                                 {"kind", std::string(tokenizer_kind_name(tokenizer->kind()))},
                                 {"vocab_size", shard_options.vocab_size},
                                 {"eos_id", shard_options.eos_id}}},
                               {"dtype", shard_dtype_for_vocab(shard_options.vocab_size)},
                               {"options",
                                {{"inputs", options.inputs},
                                 {"text_field", options.text_field},
                                 {"val_fraction", options.val_fraction},
                                 {"shard_tokens", options.shard_tokens},
                                 {"seed", options.seed},
                                 {"skip_bad_lines", options.skip_bad_lines},
                                 {"text_doc_bytes", options.text_doc_bytes}}},
                               {"inputs", file_names},
                               {"counts",
                                {{"files", stats.files},
                                 {"documents", stats.documents},
                                 {"tokens", stats.tokens},
                                 {"text_bytes", stats.text_bytes},
                                 {"bad_lines", stats.bad_lines}}},
                               {"train", split_json(stats.train)},
                               {"val", split_json(stats.val)}};
  write_file_atomic(options.out_dir / "meta.json", meta.dump(2) + "\n");
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace diffmoe::data
