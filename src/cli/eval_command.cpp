// `diffmoe eval --checkpoint X --data Y [--batch B] [--seq T] [--batches N]`: validation loss and
// perplexity of a trained model on prepared shards (a directory from `diffmoe data prepare`; its
// val_* shards, or --split train).
#include <fmt/core.h>

#include <cmath>

#include "backend/backend_registry.h"
#include "cli/commands.h"
#include "core/error.h"
#include "data/loader.h"
#include "train/checkpoint_reader.h"
#include "train/evaluator.h"
#include "train/run_setup.h"

namespace diffmoe::cli {

namespace {

struct EvalArgs {
  std::string checkpoint, data, split = "val", device = "cpu";
  int64_t batch = 8, seq = 0, batches = 0;
  bool no_verify = false;
};

int run_eval(const EvalArgs& a) {
  DIFFMOE_CHECK(a.batch > 0, "--batch: must be positive, got {}", a.batch);
  DIFFMOE_CHECK(a.seq >= 0, "--seq: must be >= 0 (0 = the model's max_seq_len), got {}", a.seq);
  DIFFMOE_CHECK(a.batches >= 0, "--batches: must be >= 0 (0 = the whole split), got {}", a.batches);
  DIFFMOE_CHECK(a.split == "val" || a.split == "train", "--split: expected val or train, got '{}'", a.split);
  auto be = make_backend(a.device);
  LoadedCheckpoint ck = open_trained_model(a.checkpoint, *be, DType::kF32, OpenModelOptions{.tokenizer_path = "", .verify = !a.no_verify});
  const int64_t seq = a.seq > 0 ? a.seq : ck.model->config().max_seq_len;
  DIFFMOE_CHECK(seq <= ck.model->config().max_seq_len, "--seq: {} is over the model's max_seq_len = {}", seq,
                ck.model->config().max_seq_len);
  ck.model->set_batch_shape(a.batch, seq);
  // Shards tokenized by another tokenizer would give a meaningless loss: refuse them.
  if (ck.tokenizer && ck.tokenizer->eos_id())
    check_shards_match_tokenizer(a.data, a.split, ck.tokenizer_path, *ck.tokenizer->eos_id());
  data::TokenLoader loader(data::find_shards(a.data, a.split),
                           data::TokenLoaderOptions{.batch = a.batch, .seq = seq, .shuffle = false, .max_batches = a.batches});
  DIFFMOE_CHECK(loader.vocab_size() <= static_cast<uint32_t>(ck.model->config().vocab_size),
                "{}: shards use a {}-token vocabulary, the model has {}", a.data, loader.vocab_size(), ck.model->config().vocab_size);
  const EvalResult r = evaluate(*ck.model, loader, a.batches);
  fmt::print("model {} (step {})\ndata {} ({} split): {} batches, {} tokens\nloss {:.4f} nats/token   perplexity {:.2f}\n",
             ck.model_path, ck.step, a.data, a.split, r.batches, r.tokens, r.loss, r.perplexity);
  DIFFMOE_CHECK(std::isfinite(r.loss), "{}: the validation loss is not finite ({}): the model's weights have diverged", ck.model_path, r.loss);
  return 0;
}

}  // namespace

void add_eval_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("eval", "Validation loss and perplexity of a checkpoint on prepared shards");
  auto a = std::make_shared<EvalArgs>();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint root, step directory or model .safetensors")->required();
  cmd->add_option("--data", a->data, "shard directory from `diffmoe data prepare`")->required();
  cmd->add_option("--split", a->split, "val (default) or train");
  cmd->add_option("--batch", a->batch, "sequences per batch (default 8)");
  cmd->add_option("--seq", a->seq, "sequence length (default: the model's max_seq_len)");
  cmd->add_option("--batches", a->batches, "batches to evaluate (default: the whole split)");
  cmd->add_option("--device", a->device, "cpu (default) or cuda");
  cmd->add_flag("--no-verify", a->no_verify, "read the checkpoint without checking it against its manifest");
  cmd->callback([&run, a] { run = [a] { return run_eval(*a); }; });
}

}  // namespace diffmoe::cli
