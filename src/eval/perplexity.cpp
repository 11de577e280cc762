#include "eval/perplexity.h"

#include <cmath>
#include <numbers>
#include <vector>

#include "core/error.h"
#include "data/text_source.h"
#include "eval/rolling_windows.h"

namespace diffmoe::eval {

double PerplexityResult::loss() const { return tokens > 0 ? nats / static_cast<double>(tokens) : std::nan(""); }
double PerplexityResult::perplexity() const { return std::exp(loss()); }
double PerplexityResult::bits_per_byte() const {
  return bytes > 0 ? nats / std::numbers::ln2 / static_cast<double>(bytes) : std::nan("");
}
double PerplexityResult::byte_perplexity() const {
  return bytes > 0 ? std::exp(nats / static_cast<double>(bytes)) : std::nan("");
}
double PerplexityResult::word_perplexity() const {
  return words > 0 ? std::exp(nats / static_cast<double>(words)) : std::nan("");
}

int64_t count_words(std::string_view text) {
  int64_t words = 0;
  bool in_word = false;
  for (const char c : text) {
    const bool space = c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
    if (!space && !in_word) ++words;
    in_word = !space;
  }
  return words;
}

PerplexityResult evaluate_perplexity(BatchScorer& scorer, const data::Tokenizer& tokenizer, int32_t prefix,
                                     std::span<const std::filesystem::path> files, const PerplexityOptions& opt,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t window = scorer.seq();
  const int64_t stride = opt.stride > 0 ? opt.stride : window;
  DIFFMOE_CHECK(stride <= window, "--stride {} is longer than the window (sequence length {})", stride, window);
  PerplexityResult r;
  std::vector<ScoreRow> pending;
  // Scores the pending rows: whole micro-batches while more documents follow, everything at the end.
  const auto flush = [&](bool all) {
    const size_t keep = all ? 0 : pending.size() % static_cast<size_t>(scorer.batch());
    if (pending.size() == keep) return;
    const std::span<const ScoreRow> ready(pending.data(), pending.size() - keep);
    for (const RowScore& s : scorer.score(ready)) {
      r.nats -= s.logprob;
      r.tokens += s.tokens;
    }
    pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(ready.size()));
    if (progress) progress(r.docs, r.tokens);
  };
  const size_t flush_rows = static_cast<size_t>(std::max<int64_t>(scorer.batch() * 8, 64));
  data::ReaderOptions ro;
  ro.text_field = opt.text_field;
  ro.text_doc_bytes = 0;  // a plain-text file is one document
  std::string text;
  for (const std::filesystem::path& f : files) {
    data::DocumentReader reader(f, ro);
    while ((opt.limit <= 0 || r.docs < opt.limit) && reader.next(text)) {
      const std::vector<int32_t> ids = tokenizer.encode(text);
      if (ids.empty()) continue;
      std::vector<ScoreRow> rows = rolling_rows(ids, prefix, window, stride);
      r.windows += static_cast<int64_t>(rows.size());
      for (ScoreRow& row : rows) pending.push_back(std::move(row));
      r.docs += 1;
      r.bytes += static_cast<int64_t>(text.size());
      r.words += count_words(text);
      if (pending.size() >= flush_rows) flush(false);
    }
  }
  flush(true);
  return r;
}

}  // namespace diffmoe::eval
