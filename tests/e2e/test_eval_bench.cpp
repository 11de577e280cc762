// `diffmoe eval` tasks (multiple choice from tests/fixtures/eval, text perplexity, shard loss) and
// `diffmoe bench` run as the real binary: the JSON reports' fields, the printed table, and
// one-line errors naming the file, line and field of bad input.
#include "e2e_util.h"

namespace diffmoe::e2e {
namespace {

// The repository and its eval fixtures, from the fixtures folder ctest names (DIFFMOE_FIXTURES).
fs::path fixtures_dir() {
  const char* f = std::getenv("DIFFMOE_FIXTURES");
  return f != nullptr ? fs::path(f) : fs::path("tests/fixtures");
}
fs::path eval_fixture(const std::string& name) { return fixtures_dir() / "eval" / name; }
fs::path repo_dir() { return fixtures_dir().parent_path().parent_path(); }

nlohmann::json read_json(const fs::path& p) {
  try {
    return nlohmann::json::parse(read_file(p));
  } catch (const std::exception& e) {
    ADD_FAILURE() << p << ": not JSON: " << e.what();
    return nlohmann::json::object();
  }
}

// The rows of one task in a report's results, by metric.
std::map<std::string, nlohmann::json> metrics_of(const nlohmann::json& report, const std::string& task) {
  std::map<std::string, nlohmann::json> out;
  for (const auto& row : report["results"])
    if (row["task"] == task) out[row["metric"].get<std::string>()] = row;
  return out;
}

class TrainedForEval : public E2E {
 protected:
  void SetUp() override {
    E2E::SetUp();
    Yaml y = micro_config(dir_, dir_ / "run");
    y.set("model.max_seq_len", "192");  // room for a few-shot prompt in a 300-token vocabulary (trained on 32)
    y.set("train.seq_len", "32");
    y.set("train.max_steps", "4");
    y.set("checkpoint.every", "4");
    y.set("eval.every", "4");
    const RunResult r = train(write_config(y));
    E2E_EXPECT_OK(r);
    ckpt_ = dir_ / "run" / "checkpoints";
  }
  fs::path ckpt_;
};

TEST_F(TrainedForEval, TasksTextShardsAndReport) {
  const fs::path report = dir_ / "report.json";
  const RunResult r = run_diffmoe({"eval",
                                   "--checkpoint",
                                   ckpt_.string(),
                                   "--task",
                                   "hellaswag:" + eval_fixture("hellaswag.jsonl").string(),
                                   "--task",
                                   "arc:" + eval_fixture("arc.jsonl").string(),
                                   "--task",
                                   "piqa:" + eval_fixture("piqa.jsonl").string(),
                                   "--task",
                                   eval_fixture("capitals.yaml").string(),
                                   "--task",
                                   eval_fixture("arc_fewshot.yaml").string(),
                                   "--text",
                                   eval_fixture("text").string(),
                                   "--stride",
                                   "16",
                                   "--data",
                                   (dir_ / "shards").string(),
                                   "--batches",
                                   "2",
                                   "--batch",
                                   "4",
                                   "--report",
                                   report.string()});
  E2E_EXPECT_OK(r);
  for (const char* s :
       {"| hellaswag", "| arc_2shot", "| capitals", "| text", "bits_per_byte", "acc_norm", "| shards_val"})
    EXPECT_NE(r.out.find(s), std::string::npos) << "the table lacks " << s << "\n" << r.out;
  const nlohmann::json j = read_json(report);
  EXPECT_EQ(j["step"], 4);
  EXPECT_NE(j["model"].get<std::string>().find("step_000000004"), std::string::npos) << j.dump(2);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["batch"], 4);
  for (const auto& [task, n] : std::vector<std::pair<std::string, int>>{
           {"hellaswag", 4}, {"arc", 4}, {"piqa", 4}, {"capitals", 5}, {"arc_2shot", 4}}) {
    SCOPED_TRACE(task);
    auto m = metrics_of(j, task);
    ASSERT_EQ(m.size(), 2u) << j.dump(2);
    for (const char* metric : {"acc", "acc_norm"}) {
      const nlohmann::json& row = m[metric];
      EXPECT_EQ(row["count"], n);
      const double v = row["value"].get<double>();
      EXPECT_GE(v, 0.0);
      EXPECT_LE(v, 1.0);
      // A mean of 0/1 values over n documents is k/n, and its stderr is √(v(1−v)·n/(n−1))/√n.
      EXPECT_NEAR(v * n, std::round(v * n), 1e-9);
      EXPECT_NEAR(row["stderr"].get<double>(), std::sqrt(v * (1 - v) / (n - 1)), 1e-9);
    }
    EXPECT_EQ(j["tasks"][task]["documents"], n);
  }
  EXPECT_EQ(j["tasks"]["arc_2shot"]["num_fewshot"], 2);
  EXPECT_EQ(j["tasks"]["hellaswag"]["requests"], 16);
  auto text = metrics_of(j, "text");
  ASSERT_EQ(text.size(), 5u) << j.dump(2);
  EXPECT_EQ(text["bits_per_byte"]["count"], 3) << "sample.txt and the two notes of notes.jsonl";
  EXPECT_TRUE(text["bits_per_byte"]["stderr"].is_null());
  const nlohmann::json& info = j["tasks"]["text"];
  const double nats = info["nats"].get<double>();
  EXPECT_NEAR(text["bits_per_byte"]["value"].get<double>(), nats / std::log(2.0) / info["bytes"].get<double>(), 1e-9);
  EXPECT_NEAR(text["loss"]["value"].get<double>(), nats / info["tokens"].get<double>(), 1e-9);
  EXPECT_NEAR(text["perplexity"]["value"].get<double>(), std::exp(text["loss"]["value"].get<double>()), 1e-6);
  EXPECT_GT(text["bits_per_byte"]["value"].get<double>(), 0.5);
  EXPECT_LT(text["loss"]["value"].get<double>(), std::log(300.0) + 2.0) << "far worse than uniform over the vocabulary";
  EXPECT_EQ(info["stride"], 16);
  int64_t bytes = static_cast<int64_t>(read_file(eval_fixture("text/sample.txt")).size());
  for (const auto& note : read_jsonl(eval_fixture("text/notes.jsonl")))
    bytes += static_cast<int64_t>(note["text"].get<std::string>().size());
  EXPECT_EQ(info["bytes"], bytes) << "the UTF-8 bytes of the three documents";
  auto shards = metrics_of(j, "shards_val");
  EXPECT_EQ(shards.size(), 2u);

  // --limit: the first documents of every task.
  const RunResult lim =
      run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--task", "piqa:" + eval_fixture("piqa.jsonl").string(),
                   "--limit", "2", "--report", report.string()});
  E2E_EXPECT_OK(lim);
  EXPECT_EQ(metrics_of(read_json(report), "piqa")["acc"]["count"], 2);
}

TEST_F(TrainedForEval, BadInputIsOneLineNamingFileLineAndField) {
  const fs::path bad = dir_ / "bad.jsonl";
  write_file(bad, read_file(eval_fixture("piqa.jsonl")) + "{\"goal\": \"g\", \"sol1\": \"a\", \"label\": 0}\n");
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--task", "piqa:" + bad.string()}),
                     {bad.string() + ":5", "field 'sol2'"});
  write_file(bad, "{\"goal\": \"g\"\n");
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--task", "piqa:" + bad.string()}),
                     {bad.string() + ":1", "JSON"});
  const fs::path cfg = dir_ / "task.yaml";
  write_file(cfg, "file: x.jsonl\nformat: arc\nshots: 3\n");
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--task", cfg.string()}),
                     {cfg.string(), "shots: unknown key"});
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--task", "mmlu:x.jsonl"}), {"mmlu:x.jsonl"});
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string()}), {"--data, --text or --task"});
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--text", (dir_ / "none").string()}),
                     {(dir_ / "none").string()});
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", ckpt_.string(), "--text", eval_fixture("text").string(),
                                  "--seq", "8", "--stride", "9"}),
                     {"stride 9"});
  // A bare model file has no tokenizer: --task needs --tokenizer.
  const fs::path model = dir_ / "exported.safetensors";
  E2E_EXPECT_OK(run_diffmoe(
      {"checkpoint", "export", "--checkpoint", (ckpt_ / "step_000000004").string(), "--out", model.string()}));
  expect_clean_error(
      run_diffmoe({"eval", "--checkpoint", model.string(), "--task", "piqa:" + eval_fixture("piqa.jsonl").string()}),
      {"--tokenizer"});
  E2E_EXPECT_OK(run_diffmoe({"eval", "--checkpoint", model.string(), "--tokenizer", (dir_ / "tokenizer.json").string(),
                             "--task", "piqa:" + eval_fixture("piqa.jsonl").string()}));
}

TEST_F(TrainedForEval, BenchOnACheckpoint) {
  const fs::path report = dir_ / "bench.json";
  const RunResult r = run_diffmoe({"bench", "--checkpoint", ckpt_.string(), "--decode-batch", "1,2", "--batch", "2",
                                   "--seq", "8", "--steps", "1", "--warmup", "0", "--prompt-len", "4", "--new-tokens",
                                   "2", "--report", report.string()});
  E2E_EXPECT_OK(r);
  const nlohmann::json j = read_json(report);
  EXPECT_EQ(j["model"]["step"], 4);
  EXPECT_EQ(j["decode"].size(), 2u);
  EXPECT_EQ(j["train_step"]["seq"], 8);
}

// The serving engine with FP8 weights on a trained checkpoint: the bound of each decode batch and the
// greedy agreement with the model weights in the report.
TEST_F(TrainedForEval, BenchServeEngineWithFp8Weights) {
  const fs::path report = dir_ / "bench_fp8.json";
  const RunResult r =
      run_diffmoe({"bench", "--checkpoint", ckpt_.string(), "--no-train", "--engine", "serve", "--weights", "fp8",
                   "--decode-batch", "1,2", "--prompt-len", "4", "--new-tokens", "3", "--report", report.string()});
  E2E_EXPECT_OK(r);
  for (const char* s : {"serve engine, fp8 weights", "copy bandwidth", "bound", "greedy agreement"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  const nlohmann::json j = read_json(report);
  EXPECT_EQ(j["engine"], "serve");
  EXPECT_EQ(j["weights"], "fp8");
  EXPECT_EQ(j["copy_bandwidth"]["bytes"], int64_t{64} << 20);
  EXPECT_GT(j["copy_bandwidth"]["bytes_per_s"].get<double>(), 0);
  ASSERT_EQ(j["decode"].size(), 2u);
  for (const auto& d : j["decode"]) {
    EXPECT_EQ(d["experts_counted"], true);
    EXPECT_GT(d["weight_bytes_per_step"].get<double>(), 0);
    EXPECT_DOUBLE_EQ(d["bytes_per_step"].get<double>(),
                     d["weight_bytes_per_step"].get<double>() + d["cache_bytes_per_step"].get<double>());
    EXPECT_NEAR(d["bound_ms_per_step"].get<double>(),
                d["bytes_per_step"].get<double>() / j["copy_bandwidth"]["bytes_per_s"].get<double>() * 1000,
                1e-9 * d["bound_ms_per_step"].get<double>());
    EXPECT_NEAR(d["fraction_of_bound"].get<double>(),
                d["bound_ms_per_step"].get<double>() / d["ms_per_step"].get<double>(),
                1e-9 * d["fraction_of_bound"].get<double>());
  }
  // micro: 2 routed experts of 4 per token, so batch 1 reads exactly 2.
  EXPECT_EQ(j["decode"][0]["experts_per_moe_layer"], 2.0);
  const nlohmann::json& a = j["greedy_agreement"];
  EXPECT_EQ(a["prompts"], 2) << "the largest decode batch";
  EXPECT_EQ(a["new_tokens"], 3);
  for (const char* k : {"token_agreement", "sequence_agreement"}) {
    EXPECT_GE(a[k].get<double>(), 0.0) << k;
    EXPECT_LE(a[k].get<double>(), 1.0) << k;
  }
  // The model weights through the same engine, compared with themselves: exactly 1.
  const fs::path same = dir_ / "bench_same.json";
  E2E_EXPECT_OK(
      run_diffmoe({"bench", "--checkpoint", ckpt_.string(), "--no-train", "--engine", "serve", "--decode-batch", "2",
                   "--prompt-len", "4", "--new-tokens", "3", "--agreement-prompts", "3", "--report", same.string()}));
  const nlohmann::json js = read_json(same);
  EXPECT_EQ(js["weights"], "model");
  EXPECT_EQ(js["greedy_agreement"]["token_agreement"], 1.0);
  EXPECT_EQ(js["greedy_agreement"]["sequence_agreement"], 1.0);
}

// The decode engine's flags: each bad value is one error line naming the flag (before the model loads).
TEST_F(E2E, BenchEngineFlagErrors) {
  const std::string tiny = (repo_dir() / "configs" / "tiny.yaml").string();
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--weights", "fp8", "--engine", "generator"}),
                     {"--weights fp8", "--engine serve"});
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--weights", "fp8"}), {"--weights fp8", "--engine serve"});
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--engine", "vllm"}),
                     {"--engine", "'vllm'", "generator, serve"});
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--engine", "serve", "--weights", "int4"}),
                     {"--weights", "'int4'", "model, fp8"});
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--agreement-prompts", "0"}), {"--agreement-prompts"});
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--engine", "serve", "--precision", "fp8"}),
                     {"--precision fp8", "--weights fp8"});
}

// The tiny preset on the CPU with few steps: every field of the report.
TEST_F(E2E, BenchTinyPresetOnCpu) {
  const fs::path report = dir_ / "bench.json";
  const std::string tiny = (repo_dir() / "configs" / "tiny.yaml").string();
  RunOptions slow;
  slow.timeout_s = 300;  // the tiny preset at decode batch 64 on a loaded two-core machine
  const RunResult r = run_diffmoe({"bench", "--config", tiny, "--batch", "2", "--seq", "16", "--steps", "2", "--warmup",
                                   "0", "--prompt-len", "4", "--new-tokens", "2", "--report", report.string()},
                                  slow);
  E2E_EXPECT_OK(r);
  for (const char* s : {"decode batch   1", "decode batch   8", "decode batch  64", "train step 2x16", "tokens/s"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  const nlohmann::json j = read_json(report);
  EXPECT_EQ(j["model"]["config"], tiny);
  EXPECT_GT(j["model"]["parameters"].get<int64_t>(), j["model"]["active_parameters"].get<int64_t>())
      << "an MoE activates a part";
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["precision"], "f32");
  const nlohmann::json& t = j["train_step"];
  for (const char* k : {"batch", "seq", "steps", "warmup_steps", "median_s", "min_s", "max_s", "tokens_per_s",
                        "flops_per_token", "mfu", "loss"})
    EXPECT_TRUE(t.contains(k)) << k << "\n" << t.dump(2);
  EXPECT_EQ(t["batch"], 2);
  EXPECT_EQ(t["seq"], 16);
  EXPECT_EQ(t["steps"], 2);
  EXPECT_TRUE(t["mfu"].is_null()) << "no peak on the CPU";
  EXPECT_NEAR(t["tokens_per_s"].get<double>(), 32.0 / t["median_s"].get<double>(),
              1e-6 * t["tokens_per_s"].get<double>());
  EXPECT_NEAR(t["loss"].get<double>(), std::log(4096.0), 1.0) << "random tokens at initialisation";
  ASSERT_EQ(j["decode"].size(), 3u);
  const std::vector<int64_t> batches = {1, 8, 64};
  for (size_t i = 0; i < 3; ++i) {
    const nlohmann::json& d = j["decode"][i];
    EXPECT_EQ(d["batch"], batches[i]);
    EXPECT_EQ(d["prompt_len"], 4);
    EXPECT_EQ(d["new_tokens"], 2);
    EXPECT_GT(d["prefill_tokens_per_s"].get<double>(), 0);
    EXPECT_GT(d["decode_tokens_per_s"].get<double>(), 0);
    EXPECT_NEAR(d["decode_tokens_per_s"].get<double>(), batches[i] * 2 / d["decode_s"].get<double>(),
                1e-6 * d["decode_tokens_per_s"].get<double>());
  }
  expect_clean_error(run_diffmoe({"bench", "--config", tiny, "--prompt-len", "250", "--new-tokens", "10"}),
                     {"max_seq_len = 256"});
  expect_clean_error(run_diffmoe({"bench"}), {"--config", "--checkpoint"});
  expect_clean_error(run_diffmoe({"bench", "--config", (dir_ / "nope.yaml").string()}),
                     {(dir_ / "nope.yaml").string()});
}

}  // namespace
}  // namespace diffmoe::e2e
