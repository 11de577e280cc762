// `diffmoe tokenizer train|encode|decode`: train our byte-level BPE on text files, and encode or
// decode with any supported tokenizer file (ours, HF tokenizer.json, tiktoken ranks).
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <charconv>
#include <iostream>
#include <iterator>
#include <limits>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "data/bpe_trainer.h"
#include "data/text_source.h"
#include "data/tokenizer.h"
#include "io/file_util.h"

namespace diffmoe::cli {

namespace {

std::string read_all_stdin() {
  std::ostringstream ss;
  ss << std::cin.rdbuf();
  return ss.str();
}

// Every whitespace-separated token of `text` as a token id in [0, 2^31); anything else is an error.
std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::istringstream in(text);
  for (std::string token; in >> token;) {
    int64_t id = -1;
    const auto [end, ec] = std::from_chars(token.data(), token.data() + token.size(), id);
    DIFFMOE_CHECK(
        ec == std::errc() && end == token.data() + token.size() && id >= 0 && id <= std::numeric_limits<int32_t>::max(),
        "decode: '{}' is not a token id (ids are integers in [0, 2^31))", token);
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

}  // namespace

void add_tokenizer_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("tokenizer", "Train, or encode/decode with, a tokenizer");
  cmd->require_subcommand(1);

  auto* tr = cmd->add_subcommand("train", "Train a byte-level BPE tokenizer (saved as HF-compatible tokenizer.json)");
  auto inputs = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto vocab = std::make_shared<int32_t>(4096);
  auto pattern = std::make_shared<std::string>("gpt2");
  auto field = std::make_shared<std::string>("text");
  tr->add_option("--input", *inputs, "files, directories or globs (comma-separated; .txt/.jsonl, .gz/.zst)")
      ->required();
  tr->add_option("--out", *out, "output tokenizer.json")->required();
  tr->add_option("--vocab-size", *vocab, "total ids including 256 bytes and <|endoftext|> (default 4096)");
  tr->add_option("--pattern", *pattern, "pre-tokenizer split pattern: gpt2 or cl100k (default gpt2)");
  tr->add_option("--text-field", *field, "JSONL text key (default text)");
  tr->callback([&run, inputs, out, vocab, pattern, field] {
    run = [=] {
      io::check_output_path(*out, "tokenizer file");  // before hours of training, not after
      data::BpeTrainer trainer(data::BpeTrainerOptions{.vocab_size = *vocab, .pattern = *pattern});
      const data::CorpusStats corpus =
          data::add_documents(trainer, data::expand_inputs(*inputs), data::ReaderOptions{.text_field = *field});
      const data::TrainedBpe bpe = trainer.train();
      data::save_trained_bpe(bpe, *out);
      fmt::print("trained {} ids ({} merges) on {} documents, {:.1f} MB -> {}\n", bpe.vocab_size(), bpe.merges.size(),
                 corpus.documents, corpus.bytes / 1e6, *out);
      return 0;
    };
  });

  auto* enc = cmd->add_subcommand("encode", "Print the token ids of --text (or standard input)");
  auto tok = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto special = std::make_shared<bool>(false);
  enc->add_option("--tokenizer", *tok, "tokenizer file")->required();
  enc->add_option("--text", *text, "text to encode (default: read standard input)");
  enc->add_flag("--special", *special, "recognise special tokens such as <|endoftext|>");
  enc->callback([&run, tok, text, special, enc] {
    run = [=] {
      auto t = data::load_tokenizer(*tok);
      const std::string s = enc->count("--text") ? *text : read_all_stdin();
      const auto ids = *special ? t->encode_with_special(s) : t->encode(s);
      fmt::print("{}\n", fmt::join(ids, " "));
      return 0;
    };
  });

  auto* dec = cmd->add_subcommand("decode", "Print the text of token ids (arguments or standard input)");
  auto tok2 = std::make_shared<std::string>();
  auto ids = std::make_shared<std::vector<int32_t>>();
  dec->add_option("--tokenizer", *tok2, "tokenizer file")->required();
  dec->add_option("ids", *ids, "token ids (default: read whitespace-separated ids from standard input)");
  dec->callback([&run, tok2, ids] {
    run = [=] {
      auto t = data::load_tokenizer(*tok2);
      std::vector<int32_t> v = *ids;
      if (v.empty()) v = parse_ids(read_all_stdin());
      std::string text;
      try {
        text = t->decode(v);
      } catch (const Error& e) {  // "id N is not a token": say which tokenizer file
        throw Error(fmt::format("{}: {}", *tok2, e.what()), e.location());
      }
      fmt::print("{}", text);
      return 0;
    };
  });
}

}  // namespace diffmoe::cli
