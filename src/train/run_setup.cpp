#include "train/run_setup.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "core/error.h"
#include "data/bpe_trainer.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/text_source.h"
#include "data/token_shard.h"

namespace diffmoe {

namespace fs = std::filesystem;

namespace {
// The files of an input spec; an error (a pattern matching nothing, a missing file) names the key.
std::vector<fs::path> inputs_of(const std::string& spec, const char* key) {
  try {
    return data::expand_inputs(spec);
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", key, e.what()), e.location());  // the message names the pattern already
  }
}
}  // namespace

std::unique_ptr<data::Tokenizer> ensure_tokenizer(const RunConfig& rc, const LogLine& log) {
  const TokenizerConfig& t = rc.tokenizer;
  DIFFMOE_CHECK(!t.path.empty(), "tokenizer.path: no tokenizer file configured");
  if (!fs::exists(t.path)) {
    DIFFMOE_CHECK(!t.train_inputs.empty(),
                  "{}: tokenizer file does not exist and tokenizer.train_inputs is empty (nothing to train it on)",
                  t.path);
    const auto t0 = std::chrono::steady_clock::now();
    data::BpeTrainer trainer(data::BpeTrainerOptions{.vocab_size = static_cast<int32_t>(t.vocab_size)});
    const data::CorpusStats corpus =
        data::add_documents(trainer, inputs_of(t.train_inputs, "tokenizer.train_inputs"),
                            data::ReaderOptions{.text_field = rc.data.text_field,
                                                .text_doc_bytes = static_cast<size_t>(rc.data.doc_bytes)});
    const data::TrainedBpe bpe = trainer.train();
    if (!fs::path(t.path).parent_path().empty()) fs::create_directories(fs::path(t.path).parent_path());
    data::save_trained_bpe(bpe, t.path);
    log(fmt::format("tokenizer: trained byte-level BPE ({} ids) on {:.1f} MB in {:.1f} s -> {}", bpe.vocab_size(),
                    corpus.bytes / 1e6, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                    t.path));
  }
  std::unique_ptr<data::Tokenizer> tok;
  try {
    tok = data::load_tokenizer(t.path);
  } catch (const Error& e) {
    throw Error(fmt::format("tokenizer.path: {}", e.what()), e.location());  // the message names the file already
  }
  DIFFMOE_CHECK(tok->vocab_size() <= rc.model.vocab_size, "{}: tokenizer has {} ids but model.vocab_size is {}", t.path,
                tok->vocab_size(), rc.model.vocab_size);
  DIFFMOE_CHECK(tok->eos_id().has_value(), "{}: tokenizer has no end-of-text token (documents are joined with one)",
                t.path);
  return tok;
}

void check_shards_match_tokenizer(const std::string& shard_dir, const std::string& split,
                                  const std::string& tokenizer_path, int32_t eos) {
  const auto shards = data::find_shards(shard_dir, split);
  const data::Shard first(shards.front(), data::ShardOpenOptions{.verify_checksum = false});
  const uint64_t want = data::file_fingerprint(tokenizer_path);
  const data::ShardHeader& h = first.header();
  DIFFMOE_CHECK(
      h.tokenizer_fingerprint == want && h.eos_id == static_cast<uint32_t>(eos),
      "{}: prepared with a different tokenizer (fingerprint {:016x}, eos {}) than {} (fingerprint {:016x}, eos {}); "
      "delete the shard directory to prepare it again, or point data.shards elsewhere",
      shards.front().string(), h.tokenizer_fingerprint, h.eos_id, tokenizer_path, want, eos);
}

std::string ensure_shards(const RunConfig& rc, const data::Tokenizer& tokenizer, const LogLine& log) {
  const DataConfig& d = rc.data;
  DIFFMOE_CHECK(!d.shards.empty(), "data.shards: no shard directory configured");
  if (fs::exists(fs::path(d.shards) / "meta.json")) {
    check_shards_match_tokenizer(d.shards, "train", rc.tokenizer.path, *tokenizer.eos_id());
    return d.shards;
  }
  DIFFMOE_CHECK(!d.inputs.empty(), "{}: no prepared shards (meta.json) and data.inputs is empty", d.shards);
  inputs_of(d.inputs, "data.inputs");  // a pattern that matches nothing fails here, naming the key
  const data::PrepareStats s =
      data::prepare_shards(data::PrepareOptions{.inputs = d.inputs,
                                                .text_field = d.text_field,
                                                .tokenizer = rc.tokenizer.path,
                                                .out_dir = d.shards,
                                                .val_fraction = d.val_fraction,
                                                .seed = rc.train.seed,
                                                .text_doc_bytes = static_cast<size_t>(d.doc_bytes)});
  log(fmt::format("data: {} documents, {:.2f} M tokens ({} train / {} val) from {:.1f} MB of text in {:.1f} s -> {}",
                  s.documents, s.tokens / 1e6, s.train.tokens, s.val.tokens, s.text_bytes / 1e6, s.seconds, d.shards));
  return d.shards;
}

}  // namespace diffmoe
