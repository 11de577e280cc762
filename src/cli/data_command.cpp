// `diffmoe data prepare|inspect`: tokenize text into memory-mapped shards, or show a shard
// directory / file (header fields, counts, a decoded sample).
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "cli/commands.h"
#include "core/error.h"
#include "data/prepare.h"
#include "data/token_shard.h"
#include "data/tokenizer.h"

namespace diffmoe::cli {

void add_data_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("data", "Prepare or inspect pre-tokenized shards");
  cmd->require_subcommand(1);

  auto* prep = cmd->add_subcommand("prepare", "Tokenize text/JSONL(.gz/.zst) into train/val shards");
  auto o = std::make_shared<data::PrepareOptions>();
  auto tok = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  prep->add_option("--input", o->inputs, "files, directories or globs (comma-separated)")->required();
  prep->add_option("--tokenizer", *tok, "tokenizer file")->required();
  prep->add_option("--out", *out, "output directory")->required();
  prep->add_option("--text-field", o->text_field, "JSONL text key (default text)");
  prep->add_option("--val-fraction", o->val_fraction, "fraction of documents held out (default 0)");
  prep->add_option("--shard-tokens", o->shard_tokens, "tokens per shard file (default 100M)");
  prep->add_option("--threads", o->threads, "tokenizer threads (default: all cores)");
  prep->add_option("--seed", o->seed, "seed of the validation split (default 0)");
  prep->add_flag("--skip-bad-lines", o->skip_bad_lines, "JSONL: warn and skip malformed lines instead of failing");
  prep->callback([&run, o, tok, out] {
    run = [=] {
      data::PrepareOptions opt = *o;
      DIFFMOE_CHECK(std::isfinite(opt.val_fraction) && opt.val_fraction >= 0 && opt.val_fraction < 1,
                    "--val-fraction: must be in [0, 1), got {}", opt.val_fraction);
      DIFFMOE_CHECK(opt.threads >= 0, "--threads: must be >= 0 (0 = all cores), got {}", opt.threads);
      opt.tokenizer = *tok;
      opt.out_dir = *out;
      const data::PrepareStats s = data::prepare_shards(opt);
      fmt::print(
          "{} files, {} documents, {} tokens ({} train / {} val), {:.1f} MB text in {:.2f} s ({:.1f} MB/s) -> {}\n",
          s.files, s.documents, s.tokens, s.train.tokens, s.val.tokens, s.text_bytes / 1e6, s.seconds,
          s.seconds > 0 ? s.text_bytes / 1e6 / s.seconds : 0.0, *out);
      return 0;
    };
  });

  auto* insp = cmd->add_subcommand("inspect", "Show shard headers and a decoded sample");
  auto path = std::make_shared<std::string>();
  auto tok2 = std::make_shared<std::string>();
  auto sample = std::make_shared<int64_t>(64);
  insp->add_option("path", *path, "a shard file or a directory of shards")->required();
  insp->add_option("--tokenizer", *tok2, "decode a sample with this tokenizer");
  insp->add_option("--sample", *sample, "tokens to decode from the start of each shard (default 64)");
  insp->callback([&run, path, tok2, sample] {
    run = [=] {
      namespace fs = std::filesystem;
      std::vector<fs::path> files;
      if (fs::is_directory(*path)) {
        for (const auto& e : fs::directory_iterator(*path))
          if (e.path().extension() == ".bin") files.push_back(e.path());
        std::sort(files.begin(), files.end());
      } else {
        files.push_back(*path);
      }
      DIFFMOE_CHECK(!files.empty(), "{}: no .bin shards here", *path);
      DIFFMOE_CHECK(*sample >= 0, "--sample: must be >= 0, got {}", *sample);
      std::unique_ptr<data::Tokenizer> t = tok2->empty() ? nullptr : data::load_tokenizer(*tok2);
      for (const auto& f : files) {
        const data::Shard s(f);
        const auto& h = s.header();
        fmt::print("{}: {} tokens, {} documents, vocab {}, eos {}, dtype u{}, tokenizer fingerprint {:016x}\n",
                   f.string(), h.n_tokens, h.n_documents, h.vocab_size, h.eos_id, h.dtype * 8, h.tokenizer_fingerprint);
        if (t) {
          std::vector<int32_t> ids(static_cast<size_t>(std::min<uint64_t>(h.n_tokens, static_cast<uint64_t>(*sample))));
          s.read(0, ids.size(), ids.data());
          std::string sample;
          try {
            sample = t->decode(ids);
          } catch (const Error& e) {  // an id the tokenizer does not have: name both files
            throw Error(fmt::format("{}: {}: {}", f.string(), *tok2, e.what()), e.location());
          }
          fmt::print("  sample: {:?}\n", sample);
        }
      }
      return 0;
    };
  });
}

}  // namespace diffmoe::cli
