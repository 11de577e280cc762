// `diffmoe eval --checkpoint X [--data SHARDS] [--text FILES] [--task SPEC]... [--report FILE]`:
//  * --data: validation loss and perplexity on prepared shards (a directory from `diffmoe data
//    prepare`; its val_* shards, or --split train);
//  * --text: perplexity and bits per byte on text files (eval/perplexity.h);
//  * --task: multiple-choice tasks scored the lm-evaluation-harness way, or text tasks, from a task
//    YAML file or FORMAT:FILE (eval/task_config.h).
// Prints a table of every metric; --report writes it as JSON (docs/evaluation.md).
#include <fmt/core.h>

#include <cmath>

#include "backend/backend_registry.h"
#include "cli/commands.h"
#include "core/error.h"
#include "data/loader.h"
#include "eval/report.h"
#include "eval/task_runner.h"
#include "io/file_util.h"
#include "train/checkpoint_reader.h"
#include "train/evaluator.h"
#include "train/run_setup.h"

namespace diffmoe::cli {

namespace {

struct EvalArgs {
  std::string checkpoint, tokenizer, data, split = "val", device = "cpu", precision = "f32", text, text_field = "text",
                                           report;
  std::vector<std::string> tasks;
  int64_t batch = 8, seq = 0, batches = 0, stride = 0, limit = 0;
  bool no_verify = false;
};

// The shard loss of `diffmoe eval --data` (train/evaluator.h), as report rows.
void eval_shards(const EvalArgs& a, LoadedCheckpoint& ck, eval::EvalReport& report) {
  const int64_t seq = a.seq > 0 ? a.seq : ck.model->config().max_seq_len;
  DIFFMOE_CHECK(seq <= ck.model->config().max_seq_len, "--seq: {} is over the model's max_seq_len = {}", seq,
                ck.model->config().max_seq_len);
  ck.model->set_batch_shape(a.batch, seq);
  // Shards tokenized by another tokenizer would give a meaningless loss: refuse them.
  if (ck.tokenizer && ck.tokenizer->eos_id())
    check_shards_match_tokenizer(a.data, a.split, ck.tokenizer_path, *ck.tokenizer->eos_id());
  data::TokenLoader loader(
      data::find_shards(a.data, a.split),
      data::TokenLoaderOptions{.batch = a.batch, .seq = seq, .shuffle = false, .max_batches = a.batches});
  DIFFMOE_CHECK(loader.vocab_size() <= static_cast<uint32_t>(ck.model->config().vocab_size),
                "{}: shards use a {}-token vocabulary, the model has {}", a.data, loader.vocab_size(),
                ck.model->config().vocab_size);
  const EvalResult r = evaluate(*ck.model, loader, a.batches);
  fmt::print("data {} ({} split): {} batches, {} tokens\nloss {:.4f} nats/token   perplexity {:.2f}\n", a.data, a.split,
             r.batches, r.tokens, r.loss, r.perplexity);
  DIFFMOE_CHECK(std::isfinite(r.loss), "{}: the validation loss is not finite ({}): the model's weights have diverged",
                ck.model_path, r.loss);
  const std::string task = "shards_" + a.split;
  report.rows.push_back(eval::MetricRow{
      .task = task, .metric = "loss", .value = r.loss, .stderr_of_mean = std::nullopt, .count = r.batches * a.batch});
  report.rows.push_back(eval::MetricRow{.task = task,
                                        .metric = "perplexity",
                                        .value = r.perplexity,
                                        .stderr_of_mean = std::nullopt,
                                        .count = r.batches * a.batch});
  report.tasks[task] = {{"file", a.data},       {"format", "shards"}, {"split", a.split},
                        {"batches", r.batches}, {"tokens", r.tokens}, {"seq", seq}};
}

int run_eval(const EvalArgs& a) {
  DIFFMOE_CHECK(!a.data.empty() || !a.text.empty() || !a.tasks.empty(),
                "nothing to evaluate: give --data, --text or --task");
  DIFFMOE_CHECK(a.batch > 0, "--batch: must be positive, got {}", a.batch);
  DIFFMOE_CHECK(a.seq >= 0, "--seq: must be >= 0 (0 = the model's max_seq_len), got {}", a.seq);
  DIFFMOE_CHECK(a.batches >= 0, "--batches: must be >= 0 (0 = the whole split), got {}", a.batches);
  DIFFMOE_CHECK(a.stride >= 0, "--stride: must be >= 0 (0 = --seq), got {}", a.stride);
  DIFFMOE_CHECK(a.limit >= 0, "--limit: must be >= 0 (0 = all), got {}", a.limit);
  DIFFMOE_CHECK(a.split == "val" || a.split == "train", "--split: expected val or train, got '{}'", a.split);
  // Before the evaluation, not after it: the report replaces the file by rename (a FIFO or
  // /dev/null named here would be replaced by a regular file).
  if (!a.report.empty()) io::check_output_path(a.report, "eval report");
  auto be = make_backend(a.device);
  LoadedCheckpoint ck = open_trained_model(
      a.checkpoint, *be, DType::kF32,
      OpenModelOptions{.tokenizer_path = a.tokenizer,
                       .verify = !a.no_verify,
                       .model = ModelOptions{.precision = parse_precision(a.precision, "--precision")}});
  fmt::print("model {} (step {})\n", ck.model_path, ck.step);
  eval::EvalReport report;
  report.model = ck.model_path;
  report.step = ck.step;
  report.tokenizer = ck.tokenizer_path;
  report.device = a.device;
  report.precision = precision_name(ck.model->plan().mode());
  report.batch = a.batch;
  if (!a.data.empty()) eval_shards(a, ck, report);

  std::vector<eval::TaskConfig> tasks;
  if (!a.text.empty()) {
    eval::TaskConfig t = eval::parse_task_spec("text:" + a.text);
    t.stride = a.stride;
    t.text_field = a.text_field;
    tasks.push_back(t);
  }
  for (const std::string& spec : a.tasks) tasks.push_back(eval::parse_task_spec(spec));
  if (!tasks.empty())
    DIFFMOE_CHECK(ck.tokenizer != nullptr,
                  "{}: no tokenizer in the checkpoint; pass --tokenizer (--text and --task tokenize text)",
                  a.checkpoint);
  for (const eval::TaskConfig& t : tasks) {
    DIFFMOE_CHECK(!report.tasks.contains(t.name), "--task: two tasks are named '{}' (set task: in a YAML config)",
                  t.name);
    const eval::TaskOutcome o = eval::run_task(
        *ck.model, *ck.tokenizer, t,
        eval::TaskRunOptions{.batch = a.batch, .seq = a.seq, .limit = a.limit, .log = [](std::string_view s) {
                               fmt::print("{}\n", s);
                             }});
    report.rows.insert(report.rows.end(), o.rows.begin(), o.rows.end());
    report.tasks[t.name] = o.info;
  }
  fmt::print("\n{}", eval::report_table(report));
  if (!a.report.empty()) {
    eval::write_report(a.report, report);
    fmt::print("report: {}\n", a.report);
  }
  return 0;
}

}  // namespace

void add_eval_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("eval", "Evaluate a checkpoint: shard loss, text perplexity, multiple-choice tasks");
  auto a = std::make_shared<EvalArgs>();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint root, step directory or model .safetensors")->required();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer file (default: the checkpoint's copy)");
  cmd->add_option("--data", a->data, "shard directory from `diffmoe data prepare`: validation loss");
  cmd->add_option("--split", a->split, "shards: val (default) or train");
  cmd->add_option("--batches", a->batches, "shards: batches to evaluate (default: the whole split)");
  cmd->add_option("--text", a->text,
                  "text files (files, directories, globs; .txt .jsonl .gz .zst): perplexity and bits per byte");
  cmd->add_option("--stride", a->stride, "--text: tokens scored per window (default: --seq, disjoint windows)");
  cmd->add_option("--text-field", a->text_field, "--text: the JSONL key holding the text (default text)");
  cmd->add_option("--task", a->tasks,
                  "a task YAML file, or FORMAT:FILE with FORMAT hellaswag, arc, piqa or text (repeatable)");
  cmd->add_option("--limit", a->limit, "documents per task (default: all)");
  cmd->add_option("--batch", a->batch, "sequences per forward (default 8)");
  cmd->add_option("--seq", a->seq, "sequence length (default: max_seq_len; multiple choice: the longest request)");
  cmd->add_option("--device", a->device, "cpu (default) or cuda");
  cmd->add_option("--precision", a->precision, "f32 (default) or bf16_gemm");
  cmd->add_option("--report", a->report, "write the results as JSON to this file");
  cmd->add_flag("--no-verify", a->no_verify, "read the checkpoint without checking it against its manifest");
  cmd->callback([&run, a] { run = [a] { return run_eval(*a); }; });
}

}  // namespace diffmoe::cli
