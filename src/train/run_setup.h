// What a run needs before its first step, made when missing: the tokenizer (trained on
// tokenizer.train_inputs when tokenizer.path does not exist yet) and the prepared token shards
// (from data.inputs when data.shards has no meta.json yet). Both are cached on disk, so the second
// run of a config starts training at once.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "train/train_config.h"

namespace diffmoe {

using LogLine = std::function<void(const std::string&)>;

// Loads rc.tokenizer.path, training and saving it first if needed. Checks that its vocabulary fits
// model.vocab_size and that it has an end-of-text token.
std::unique_ptr<data::Tokenizer> ensure_tokenizer(const RunConfig& rc, const LogLine& log);
// Prepares rc.data.shards from rc.data.inputs with the tokenizer when needed; returns the directory.
// Shards found on disk must have been made with this tokenizer (same file fingerprint and EOS id).
std::string ensure_shards(const RunConfig& rc, const data::Tokenizer& tokenizer, const LogLine& log);
// Throws "<shard>: prepared with a different tokenizer ..." unless the first shard of `split`
// ("train" or "val") in `shard_dir` records the fingerprint of `tokenizer_path` and the EOS id `eos`.
void check_shards_match_tokenizer(const std::string& shard_dir, const std::string& split,
                                  const std::string& tokenizer_path, int32_t eos);

}  // namespace diffmoe
