// Perplexity and bits per byte of a model on text files (plain text, JSONL, .gz/.zst: the readers
// of data/text_source.h; a plain-text file is one document).
//
// Each document is tokenized whole (Tokenizer::encode) and scored with rolling windows
// (rolling_windows.h: end-of-text prefix, chunks of `stride` targets, windows of the scorer's seq).
// Over all documents, with N the total negative log-likelihood in nats:
//   loss            = N / tokens                 (nats per token; depends on the tokenizer)
//   perplexity      = exp(loss)                  (token-level)
//   bits_per_byte   = N / ln 2 / bytes           (bytes: UTF-8 bytes of the documents' text)
//   byte_perplexity = exp(N / bytes) = 2^bits_per_byte
//   word_perplexity = exp(N / words)             (words: maximal runs of non-whitespace bytes)
// as lm-evaluation-harness reports for wikitext. Bits per byte compares models across tokenizers.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>

#include "data/tokenizer.h"
#include "eval/batch_scorer.h"

namespace diffmoe::eval {

struct PerplexityOptions {
  int64_t stride = 0;               // targets per window; 0 = the scorer's seq (disjoint windows)
  std::string text_field = "text";  // JSONL: the key holding the document
  int64_t limit = 0;                // documents to score; 0 = all
};

struct PerplexityResult {
  int64_t docs = 0, tokens = 0, bytes = 0, words = 0, windows = 0;
  double nats = 0;  // Σ −log p over every token of every document

  double loss() const;
  double perplexity() const;
  double bits_per_byte() const;
  double byte_perplexity() const;
  double word_perplexity() const;
};

// Non-whitespace runs (space, \t, \n, \v, \f, \r separate words).
int64_t count_words(std::string_view text);

// Scores the documents of `files` in order. `prefix` is the token before each document's first
// (the end-of-text id). `progress(docs, tokens)` (optional) is called after each batch of rows.
PerplexityResult evaluate_perplexity(BatchScorer& scorer, const data::Tokenizer& tokenizer, int32_t prefix,
                                     std::span<const std::filesystem::path> files, const PerplexityOptions& opt,
                                     const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace diffmoe::eval
