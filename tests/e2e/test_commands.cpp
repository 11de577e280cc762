// The other subcommands on the products of a real run: generate, eval, params, init, tokenizer
// train/encode/decode, data prepare/inspect, and --help of every subcommand.
#include <regex>
#include <set>

#include "e2e_util.h"

namespace diffmoe::e2e {
namespace {

// One short training run shared by the checks below (each TEST_F gets its own directory).
class Trained : public E2E {
 protected:
  void SetUp() override {
    E2E::SetUp();
    Yaml y = micro_config(dir_, dir_ / "run");
    y.set("train.max_steps", "6");
    y.set("checkpoint.every", "3");
    y.set("eval.every", "3");
    config_ = write_config(y);
    const RunResult r = train(config_);
    E2E_EXPECT_OK(r);
    EXPECT_NE(r.out.find("done: 6 steps"), std::string::npos) << r.out;
    ckpt_root_ = dir_ / "run" / "checkpoints";
  }
  fs::path config_, ckpt_root_;
};

TEST_F(Trained, GeneratePrintsThePromptAndMore) {
  const std::string prompt = "The captain looked";
  for (const fs::path& ck : {ckpt_root_, ckpt_root_ / "step_000000006", ckpt_root_ / "step_000000003"}) {
    SCOPED_TRACE(ck.string());
    const RunResult r = run_diffmoe(
        {"generate", "--checkpoint", ck.string(), "--prompt", prompt, "--max-new-tokens", "12", "--seed", "7"});
    E2E_EXPECT_OK(r);
    ASSERT_EQ(r.out.rfind(prompt, 0), 0u) << r.out;
    EXPECT_GT(r.out.size(), prompt.size() + 1) << "no text after the prompt: " << r.out;
    EXPECT_NE(r.err.find("new tokens"), std::string::npos) << r.err;
  }
  // Same seed, same text; greedy decoding works too.
  auto gen = [&](const std::string& seed, const std::string& temp) {
    return run_diffmoe({"generate", "--checkpoint", ckpt_root_.string(), "--prompt", prompt, "--max-new-tokens", "10",
                        "--seed", seed, "--temperature", temp});
  };
  const RunResult a = gen("3", "0.8"), b = gen("3", "0.8"), g = gen("0", "0");
  E2E_EXPECT_OK(a);
  E2E_EXPECT_OK(g);
  EXPECT_EQ(a.out, b.out);
  // A bare model file (the checkpoint's model exported) needs --tokenizer; with it, it works, and
  // gives the same text as the checkpoint itself.
  const fs::path model = dir_ / "exported.safetensors";
  E2E_EXPECT_OK(run_diffmoe(
      {"checkpoint", "export", "--checkpoint", (ckpt_root_ / "step_000000006").string(), "--out", model.string()}));
  expect_clean_error(run_diffmoe({"generate", "--checkpoint", model.string(), "--prompt", "x"}),
                     {model.string(), "--tokenizer"});
  const RunResult e =
      run_diffmoe({"generate", "--checkpoint", model.string(), "--tokenizer", (dir_ / "tokenizer.json").string(),
                   "--prompt", prompt, "--max-new-tokens", "10", "--seed", "0", "--temperature", "0"});
  E2E_EXPECT_OK(e);
  EXPECT_EQ(e.out, g.out) << "the exported model generates what the checkpoint generates";
  expect_clean_error(run_diffmoe({"generate", "--checkpoint", (dir_ / "nope").string(), "--prompt", "x"}),
                     {(dir_ / "nope").string()});
}

TEST_F(Trained, EvalPrintsAFiniteLoss) {
  const RunResult r = run_diffmoe({"eval", "--checkpoint", ckpt_root_.string(), "--data", (dir_ / "shards").string(),
                                   "--batch", "4", "--seq", "32", "--batches", "3"});
  E2E_EXPECT_OK(r);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex("loss ([0-9.]+) nats/token +perplexity ([0-9.]+)"))) << r.out;
  const double loss = std::stod(m[1].str());
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_GT(loss, 0.5);
  EXPECT_LT(loss, std::log(300.0) + 1.0) << "worse than uniform over the vocabulary";
  EXPECT_NE(r.out.find("(step 6)"), std::string::npos) << r.out;
  E2E_EXPECT_OK(
      run_diffmoe({"eval", "--checkpoint", (ckpt_root_ / "step_000000003").string(), "--data",
                   (dir_ / "shards").string(), "--split", "train", "--batch", "2", "--seq", "16", "--batches", "2"}));
  expect_clean_error(
      run_diffmoe({"eval", "--checkpoint", ckpt_root_.string(), "--data", (dir_ / "no_shards").string()}),
      {(dir_ / "no_shards").string()});
}

TEST_F(E2E, ParamsAndInit) {
  const fs::path cfg = write_config(micro_config(dir_, dir_ / "run"));
  const RunResult r = run_diffmoe({"params", "--config", cfg.string()});
  E2E_EXPECT_OK(r);
  EXPECT_NE(r.out.find("total parameters"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("FLOPs per token"), std::string::npos) << r.out;
  const fs::path out = dir_ / "init.safetensors";
  E2E_EXPECT_OK(run_diffmoe({"init", "--config", cfg.string(), "--out", out.string(), "--seed", "5"}));
  EXPECT_EQ(count_non_finite(out), 0);
  E2E_EXPECT_OK(
      run_diffmoe({"init", "--config", cfg.string(), "--out", (dir_ / "init2.safetensors").string(), "--seed", "5"}));
  EXPECT_EQ(read_file(out), read_file(dir_ / "init2.safetensors")) << "init is a pure function of config and seed";
}

// `diffmoe plan`: the verdict follows the GPU size, the JSON's totals are the sums of its items, the
// layout, recompute and moment-dtype fields say what was planned, and bad options fail naming the option.
TEST_F(E2E, PlanFitsOrNotAndJson) {
  const fs::path cfg = write_config(micro_config(dir_, dir_ / "run"));
  const std::vector<std::string> base = {"plan", "--config", cfg.string(), "--micro-batch", "4", "--seq", "32"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return run_diffmoe(args);
  };
  // The micro model needs well under 1 GB (the assumed CUDA context, 0.5 GiB, is most of it).
  const RunResult fits = with({"--gpu-memory", "1GB"});
  E2E_EXPECT_OK(fits);
  EXPECT_NE(fits.out.find("\nFITS: rank 0"), std::string::npos) << fits.out;
  EXPECT_NE(fits.out.find("exact subtotal"), std::string::npos) << fits.out;
  EXPECT_NE(fits.out.find("FLOPs/token"), std::string::npos) << fits.out;
  const RunResult tight = with({"--gpu-memory", "100MB", "--recompute", "full"});
  E2E_EXPECT_OK(tight);
  EXPECT_NE(tight.out.find("\nDOES NOT FIT: rank 0"), std::string::npos) << tight.out;
  EXPECT_NE(tight.out.find("not in this plan"), std::string::npos) << tight.out;
  EXPECT_NE(tight.out.find("optim.moment_dtype: bf16"), std::string::npos) << tight.out;
  EXPECT_NE(tight.out.find("recompute    full"), std::string::npos) << tight.out;
  EXPECT_NE(tight.out.find("Adam moments: f32"), std::string::npos) << tight.out;
  const RunResult tight16 = with({"--gpu-memory", "100MB", "--recompute", "full", "--moment-dtype", "bf16"});
  E2E_EXPECT_OK(tight16);
  EXPECT_NE(tight16.out.find("Adam moments: bf16"), std::string::npos) << tight16.out;
  EXPECT_EQ(tight16.out.find("optim.moment_dtype: bf16"), std::string::npos) << "chosen, not offered\n" << tight16.out;
  expect_clean_error(with({"--moment-dtype", "f16"}), {"--moment-dtype"});
  // Every mode with expert parallelism: the EP buffers and their dropless worst case follow it.
  const RunResult ep_none = with({"--world", "4", "--ep", "2", "--recompute", "none"});
  E2E_EXPECT_OK(ep_none);
  for (const char* mode : {"moe", "full"}) {
    const RunResult ep = with({"--world", "4", "--ep", "2", "--recompute", mode});
    E2E_EXPECT_OK(ep);
    EXPECT_NE(ep.out.find(fmt::format("with recompute {}, total", mode)), std::string::npos) << ep.out;
    EXPECT_NE(ep.out.find(fmt::format("recompute {}: ", mode)), std::string::npos) << ep.out;
  }
  expect_clean_error(with({"--world", "4", "--ep", "2", "--recompute", "some"}), {"--recompute"});

  const RunResult js = with({"--world", "4", "--ep", "2", "--precision", "bf16", "--recompute", "attention",
                             "--gpu-memory", "2GiB", "--json"});
  E2E_EXPECT_OK(js);
  const nlohmann::json j = nlohmann::json::parse(js.out);
  EXPECT_EQ(j["world"], 4);
  EXPECT_EQ(j["ep"], 2);
  EXPECT_EQ(j["expert_dp"], 2);
  EXPECT_EQ(j["precision"], "bf16");
  EXPECT_EQ(j["tokens_per_rank"], 128);
  EXPECT_EQ(j["recompute_requested"], "attention");
  EXPECT_EQ(j["recompute_planned"], "attention");
  EXPECT_EQ(j["moment_dtype"], "f32");
  EXPECT_EQ(j["gpu_memory_bytes"], uint64_t{2} << 30);
  ASSERT_GE(j["ranks"].size(), 1u);
  for (const auto& rank : j["ranks"]) {
    uint64_t exact = 0, total = 0;
    std::set<std::string> keys;
    for (const auto& it : rank["items"]) {
      keys.insert(it["key"].get<std::string>());
      total += it["bytes"].get<uint64_t>();
      if (!it["estimate"].get<bool>()) exact += it["bytes"].get<uint64_t>();
    }
    EXPECT_EQ(keys, (std::set<std::string>{"compute_weights", "gradients", "optimizer_masters", "optimizer_moments",
                                           "reduced_gradients", "activations", "ep_buffers", "token_buffers",
                                           "nccl_buffers", "backend_scratch", "cuda_context"}));
    EXPECT_EQ(rank["exact_bytes"].get<uint64_t>(), exact);
    EXPECT_EQ(rank["total_bytes"].get<uint64_t>(), total);
    EXPECT_EQ(rank["fits"].get<bool>(), total <= (uint64_t{2} << 30));
    EXPECT_GT(exact, 0u);
  }
  EXPECT_TRUE(j["fits"].get<bool>());
  EXPECT_EQ(j["ep_dispatch"]["rows_per_layer_balanced"], 128 * 2);   // N·K
  EXPECT_EQ(j["ep_dispatch"]["rows_per_layer_worst"], 2 * 128 * 2);  // EP·N·min(K, E/EP)
  EXPECT_GT(j["parameters"]["total"].get<int64_t>(), j["parameters"]["active"].get<int64_t>());

  expect_clean_error(with({"--world", "4", "--ep", "3"}), {"--ep"});
  expect_clean_error(with({"--gpu-memory", "80"}), {"--gpu-memory", "unit"});
  expect_clean_error(with({"--gpu-memory", "lots"}), {"--gpu-memory"});
  expect_clean_error(run_diffmoe({"plan", "--config", cfg.string(), "--seq", "33"}), {"--seq", "max_seq_len"});
}

TEST_F(E2E, TokenizerTrainEncodeDecodeRoundTrip) {
  const fs::path tok = dir_ / "tok.json";
  const RunResult t = run_diffmoe(
      {"tokenizer", "train", "--input", (dir_ / "corpus.txt").string(), "--out", tok.string(), "--vocab-size", "300"});
  E2E_EXPECT_OK(t);
  ASSERT_TRUE(fs::exists(tok));
  const std::string text = "Mrs. Elizabeth wondered, again: the whale? Ünïcödé & <|endoftext|> 123";
  const RunResult enc = run_diffmoe({"tokenizer", "encode", "--tokenizer", tok.string(), "--text", text});
  E2E_EXPECT_OK(enc);
  std::vector<std::string> ids;
  std::istringstream in(enc.out);
  for (std::string id; in >> id;) {
    ASSERT_TRUE(std::regex_match(id, std::regex("[0-9]+"))) << enc.out;
    ASSERT_LT(std::stoi(id), 300);
    ids.push_back(id);
  }
  ASSERT_FALSE(ids.empty());
  EXPECT_LT(ids.size(), text.size()) << "the BPE merged nothing";
  std::vector<std::string> dec_args = {"tokenizer", "decode", "--tokenizer", tok.string()};
  dec_args.insert(dec_args.end(), ids.begin(), ids.end());
  const RunResult dec = run_diffmoe(dec_args);
  E2E_EXPECT_OK(dec);
  EXPECT_EQ(dec.out, text);
  // Standard input both ways.
  const RunResult enc2 = run_diffmoe({"tokenizer", "encode", "--tokenizer", tok.string()}, with_stdin(text));
  E2E_EXPECT_OK(enc2);
  EXPECT_EQ(enc2.out, enc.out);
  const RunResult dec2 = run_diffmoe({"tokenizer", "decode", "--tokenizer", tok.string()}, with_stdin(enc.out));
  E2E_EXPECT_OK(dec2);
  EXPECT_EQ(dec2.out, text);
  // Special tokens: one id with --special.
  const RunResult sp =
      run_diffmoe({"tokenizer", "encode", "--tokenizer", tok.string(), "--special", "--text", "<|endoftext|>"});
  E2E_EXPECT_OK(sp);
  EXPECT_TRUE(std::regex_match(sp.out, std::regex("[0-9]+\n"))) << sp.out;
  expect_clean_error(run_diffmoe({"tokenizer", "decode", "--tokenizer", tok.string(), "299999"}), {"299999"});
  // Ids on standard input are read strictly: every token must be an id in [0, 2^31), or the
  // command fails naming it (not stop early, not truncate 2^32 + 72 to 72).
  const std::vector<std::string> dec_stdin = {"tokenizer", "decode", "--tokenizer", tok.string()};
  expect_clean_error(run_diffmoe(dec_stdin, with_stdin("72 abc 101\n")), {"decode: 'abc' is not a token id"});
  expect_clean_error(run_diffmoe(dec_stdin, with_stdin("72 4294967368\n")), {"decode: '4294967368' is not a token id"});
  expect_clean_error(run_diffmoe(dec_stdin, with_stdin("72 2147483648")), {"decode: '2147483648' is not a token id"});
  expect_clean_error(run_diffmoe(dec_stdin, with_stdin("-1 72")), {"decode: '-1' is not a token id"});
  expect_clean_error(run_diffmoe(dec_stdin, with_stdin("72 1e3")), {"decode: '1e3' is not a token id"});
}

TEST_F(E2E, DataPrepareAndInspect) {
  const fs::path tok = dir_ / "tok.json";
  E2E_EXPECT_OK(run_diffmoe(
      {"tokenizer", "train", "--input", (dir_ / "corpus.txt").string(), "--out", tok.string(), "--vocab-size", "300"}));
  const fs::path shards = dir_ / "shards";
  const RunResult p = run_diffmoe({"data", "prepare", "--input", (dir_ / "corpus.txt").string(), "--tokenizer",
                                   tok.string(), "--out", shards.string(), "--val-fraction", "0.2", "--shard-tokens",
                                   "20000", "--threads", "2", "--seed", "1"});
  E2E_EXPECT_OK(p);
  EXPECT_TRUE(fs::exists(shards / "meta.json"));
  const auto train_shards = list_dir(shards, "train_");
  EXPECT_GE(train_shards.size(), 2u) << "--shard-tokens 20000 cuts the stream";
  EXPECT_FALSE(list_dir(shards, "val_").empty());
  const RunResult i = run_diffmoe({"data", "inspect", shards.string(), "--tokenizer", tok.string(), "--sample", "16"});
  E2E_EXPECT_OK(i);
  for (const auto& f : train_shards) EXPECT_NE(i.out.find(f.string()), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("vocab 300"), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("sample: "), std::string::npos) << i.out;
  E2E_EXPECT_OK(run_diffmoe({"data", "inspect", train_shards.front().string()}));

  // A training run on these prepared shards (no data.inputs needed).
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set_path("tokenizer.path", tok);
  y.set("data.inputs", "''");
  y.set("train.max_steps", "2");
  E2E_EXPECT_OK(train(write_config(y)));
  expect_clean_error(run_diffmoe({"data", "inspect", (dir_ / "empty_dir").string()}), {(dir_ / "empty_dir").string()});
}

TEST(E2EHelp, EverySubcommandHasHelp) {
  const std::vector<std::vector<std::string>> cmds = {{},
                                                      {"params"},
                                                      {"plan"},
                                                      {"train"},
                                                      {"eval"},
                                                      {"generate"},
                                                      {"init"},
                                                      {"tokenizer"},
                                                      {"tokenizer", "train"},
                                                      {"tokenizer", "encode"},
                                                      {"tokenizer", "decode"},
                                                      {"data"},
                                                      {"data", "prepare"},
                                                      {"data", "inspect"},
                                                      {"bench"}};
  for (auto args : cmds) {
    args.push_back("--help");
    const RunResult r = run_diffmoe(args);
    E2E_EXPECT_OK(r);
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << r.describe();
    EXPECT_NE(r.out.find("--help"), std::string::npos) << r.describe();
  }
  // Usage errors: non-zero exit, no crash.
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{}, {"frobnicate"}, {"train"}, {"train", "--config"}}) {
    const RunResult r = run_diffmoe(args);
    EXPECT_TRUE(r.exited) << r.describe();
    EXPECT_NE(r.code, 0) << r.describe();
  }
}

}  // namespace
}  // namespace diffmoe::e2e
