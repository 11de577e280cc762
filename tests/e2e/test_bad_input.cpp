// Bad input: an unknown or wrong-typed config key, a missing file, a truncated shard or checkpoint,
// a tokenizer file of the wrong kind ... each gets a one-line error naming the file and field and a
// non-zero exit, never a crash. A test for each.
// (NaN/inf losses and a full disk are in test_failures.cpp.)
#include "e2e_util.h"
#include "io/checkpoint.h"

namespace diffmoe::e2e {
namespace {

// (a) an unknown key, in the file and through --set
TEST_F(E2E, UnknownConfigKey) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.bogus", "1");
  const fs::path cfg = write_config(y);
  expect_clean_error(train(cfg), {cfg.string(), "train.bogus", "unknown key"});
  EXPECT_FALSE(fs::exists(dir_ / "run")) << "nothing may start before the config is checked";

  const fs::path good = write_config(micro_config(dir_, dir_ / "run"), "good.yaml");
  expect_clean_error(train(good, {"--set", "optim.bogus_rate=2"}), {good.string(), "optim.bogus_rate"});
  Yaml z = micro_config(dir_, dir_ / "run");
  z.set("bogus_section.key", "1");
  const fs::path cfg2 = write_config(z, "section.yaml");
  expect_clean_error(train(cfg2), {cfg2.string(), "bogus_section"});
}

// (b) a wrong-typed key
TEST_F(E2E, WrongTypedConfigKey) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("optim.lr", "fast");
  const fs::path cfg = write_config(y);
  expect_clean_error(train(cfg), {cfg.string(), "optim.lr", "fast"});

  Yaml z = micro_config(dir_, dir_ / "run");
  z.set("train.max_steps", "1.5");
  const fs::path cfg2 = write_config(z, "float_steps.yaml");
  expect_clean_error(train(cfg2), {cfg2.string(), "train.max_steps"});
  const fs::path good = write_config(micro_config(dir_, dir_ / "run"), "good.yaml");
  expect_clean_error(train(good, {"--set", "log.tensorboard=maybe"}), {good.string(), "log.tensorboard"});
  expect_clean_error(train(good, {"--set", "train.stop_after=-1"}), {good.string(), "train.stop_after"});
  EXPECT_FALSE(fs::exists(dir_ / "run"));
}

// (c) an unknown or wrong-typed model key
TEST_F(E2E, BadModelKey) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("model.n_wizards", "3");
  const fs::path cfg = write_config(y);
  expect_clean_error(train(cfg), {cfg.string(), "model.n_wizards", "unknown key"});
  expect_clean_error(run_diffmoe({"params", "--config", cfg.string()}), {cfg.string(), "model.n_wizards"});

  Yaml z = micro_config(dir_, dir_ / "run");
  z.set("model.dim", "wide");
  const fs::path cfg2 = write_config(z, "dim.yaml");
  expect_clean_error(train(cfg2), {cfg2.string(), "model.dim"});
  Yaml w = micro_config(dir_, dir_ / "run");
  w.set("model.n_heads", "3");  // parses, but a differential model pairs its heads
  const fs::path cfg3 = write_config(w, "heads.yaml");
  expect_clean_error(train(cfg3), {cfg3.string(), "model.n_heads"});
}

// (d) a missing config file, and a config that is not YAML
TEST_F(E2E, MissingOrUnparsableConfigFile) {
  const fs::path missing = dir_ / "no_such_config.yaml";
  expect_clean_error(train(missing), {missing.string()});
  expect_clean_error(run_diffmoe({"params", "--config", missing.string()}), {missing.string()});
  write_file(dir_ / "broken.yaml", "model:\n  dim: [32\n  n_layers: 2\n");
  expect_clean_error(train(dir_ / "broken.yaml"), {(dir_ / "broken.yaml").string()});
}

// (e) data inputs that match nothing (the tokenizer trains fine; preparing the shards fails)
TEST_F(E2E, MissingDataInput) {
  Yaml y = micro_config(dir_, dir_ / "run");
  const fs::path pattern = dir_ / "nowhere" / "*.txt";
  y.set_path("data.inputs", pattern);
  expect_clean_error(train(write_config(y)), {"data.inputs", pattern.string()});
  EXPECT_FALSE(fs::exists(dir_ / "shards" / "meta.json"));
  y.set_path("data.inputs", dir_ / "missing.txt");
  expect_clean_error(train(write_config(y)), {"data.inputs", (dir_ / "missing.txt").string()});

  Yaml z = micro_config(dir_, dir_ / "run");
  z.set_path("tokenizer.path", dir_ / "missing_tokenizer.json");
  z.set("tokenizer.train_inputs", "''");  // nothing to train it on
  const fs::path cfg2 = write_config(z, "no_tokenizer.yaml");
  expect_clean_error(train(cfg2), {(dir_ / "missing_tokenizer.json").string(), "tokenizer.train_inputs"});
  Yaml w = micro_config(dir_, dir_ / "run");
  w.set_path("tokenizer.path", dir_ / "missing_tokenizer.json");
  w.set_path("tokenizer.train_inputs", dir_ / "missing_corpus.txt");
  const fs::path cfg3 = write_config(w, "no_corpus.yaml");
  expect_clean_error(train(cfg3), {(dir_ / "missing_corpus.txt").string(), "tokenizer.train_inputs"});
}

// (f) a truncated shard
TEST_F(E2E, TruncatedShard) {
  Yaml y = micro_config(dir_, dir_ / "first");
  y.set("train.max_steps", "1");
  E2E_EXPECT_OK(train(write_config(y, "first.yaml")));
  const fs::path shard = dir_ / "shards" / "train_0000.bin";
  ASSERT_TRUE(fs::exists(shard));
  fs::resize_file(shard, fs::file_size(shard) - 101);

  Yaml z = micro_config(dir_, dir_ / "second");
  z.set("train.max_steps", "1");
  expect_clean_error(train(write_config(z, "second.yaml")), {shard.string(), "n_tokens", "truncated"});
  EXPECT_FALSE(fs::exists(dir_ / "second" / "checkpoints"));
  expect_clean_error(run_diffmoe({"data", "inspect", shard.string()}), {shard.string()});
  fs::resize_file(shard, 10);  // not even a header
  expect_clean_error(train(write_config(z, "second.yaml")), {shard.string(), "header"});
}

// (g) a truncated checkpoint: named explicitly it is an error; as "latest" the run falls back to
// the previous checkpoint with a warning.
TEST_F(E2E, TruncatedCheckpoint) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "4");
  y.set("checkpoint.every", "2");
  y.set("eval.every", "0");
  const fs::path cfg = write_config(y);
  E2E_EXPECT_OK(train(cfg));
  const fs::path ck = dir_ / "run" / "checkpoints", newest = ck / "step_000000004", model = newest / kShard0;
  ASSERT_EQ(read_file(ck / "latest"), "step_000000004\n");
  fs::resize_file(model, fs::file_size(model) / 2);

  expect_clean_error(train(cfg, {"--resume", newest.string()}), {model.string(), "truncated"});
  expect_clean_error(run_diffmoe({"eval", "--checkpoint", newest.string(), "--data", (dir_ / "shards").string()}),
                     {model.string()});

  const RunResult r = train(cfg, {"--resume"});
  E2E_EXPECT_OK(r);
  EXPECT_NE(r.out.find("warning"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(model.string()), std::string::npos) << "the warning names the bad file\n" << r.out;
  EXPECT_NE(r.out.find("resumed from " + (ck / "step_000000002").string() + " at step 2"), std::string::npos) << r.out;
  // Steps 3-4 were redone and step 4 saved again: it verifies now.
  EXPECT_NO_THROW(open_checkpoint(newest.string()));
  EXPECT_EQ(read_file(ck / "latest"), "step_000000004\n");

  // A checkpoint whose manifest is missing (a save that died before its last write) is skipped too.
  fs::remove(newest / "manifest.json");
  expect_clean_error(train(cfg, {"--resume", newest.string()}), {(newest / "manifest.json").string()});
  const RunResult r2 = train(cfg, {"--resume"});
  E2E_EXPECT_OK(r2);
  EXPECT_NE(r2.out.find("at step 2"), std::string::npos) << r2.out;
  // No checkpoint at all.
  fs::remove_all(ck);
  expect_clean_error(train(cfg, {"--resume"}), {ck.string(), "no valid checkpoint"});
}

// A resume under another model config: one line naming the checkpoint and each key that differs
// (the whole config of both, on lines of their own, named nothing).
TEST_F(E2E, ResumeUnderAnotherModelConfigNamesTheKeys) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "1");
  y.set("eval.every", "0");
  const fs::path cfg = write_config(y);
  E2E_EXPECT_OK(train(cfg));
  const fs::path step1 = dir_ / "run" / "checkpoints" / "step_000000001";
  expect_clean_error(train(cfg, {"--resume", "--set", "train.max_steps=2", "--set", "model.n_layers=3", "--set",
                                 "model.inter_dim=96"}),
                     {step1.string(), "model.n_layers 2 vs 3", "model.inter_dim 64 vs 96"});
}

// (h) a tokenizer file of the wrong kind: JSON that is not a tokenizer, plain text, binary noise
TEST_F(E2E, TokenizerFileOfTheWrongKind) {
  write_file(dir_ / "not_a_tokenizer.json", R"({"name": "settings", "values": [1, 2, 3], "model": "gpt"})");
  write_file(dir_ / "notes.txt", "hello world\nthis is not a tokenizer\n");
  std::string noise;
  for (int i = 0; i < 4096; ++i) noise += static_cast<char>((i * 7919 + 13) % 256);
  write_file(dir_ / "noise.bin", noise);
  write_file(dir_ / "empty.json", "");
  for (const char* name : {"not_a_tokenizer.json", "notes.txt", "noise.bin", "empty.json"}) {
    SCOPED_TRACE(name);
    const fs::path tok = dir_ / name;
    Yaml y = micro_config(dir_, dir_ / "run");
    y.set_path("tokenizer.path", tok);
    expect_clean_error(train(write_config(y)), {tok.string(), "tokenizer.path"});
    expect_clean_error(run_diffmoe({"tokenizer", "encode", "--tokenizer", tok.string(), "--text", "hi"}),
                       {tok.string()});
    expect_clean_error(run_diffmoe({"data", "prepare", "--input", (dir_ / "corpus.txt").string(), "--tokenizer",
                                    tok.string(), "--out", (dir_ / "shards").string()}),
                       {tok.string()});
  }
  EXPECT_FALSE(fs::exists(dir_ / "run" / "checkpoints"));
  const fs::path missing = dir_ / "missing.json";
  expect_clean_error(run_diffmoe({"tokenizer", "decode", "--tokenizer", missing.string(), "1", "2"}),
                     {missing.string()});
}

}  // namespace
}  // namespace diffmoe::e2e

namespace diffmoe::e2e {
namespace {

// Cached shards made with another tokenizer are refused, naming both files (training on them would
// silently mix two vocabularies).
TEST_F(E2E, ShardsOfAnotherTokenizer) {
  Yaml y = micro_config(dir_, dir_ / "first");
  y.set("train.max_steps", "1");
  E2E_EXPECT_OK(train(write_config(y, "first.yaml")));
  const fs::path shard = dir_ / "shards" / "train_0000.bin";
  Yaml z = micro_config(dir_, dir_ / "second");
  z.set("train.max_steps", "1");
  z.set_path("tokenizer.path", dir_ / "other_tokenizer.json");  // trained anew: another vocabulary
  z.set("tokenizer.vocab_size", "280");
  expect_clean_error(train(write_config(z, "second.yaml")),
                     {shard.string(), "different tokenizer", "other_tokenizer.json"});
  EXPECT_FALSE(fs::exists(dir_ / "second" / "checkpoints"));
}

// A model vocabulary padded past the tokenizer's: generation samples real tokens only.
TEST_F(E2E, GenerateWithAPaddedVocabulary) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "4");
  y.set("model.vocab_size", "384");
  E2E_EXPECT_OK(train(write_config(y)));
  for (const char* seed : {"1", "2", "3"}) {
    const RunResult g = run_diffmoe({"generate", "--checkpoint", (dir_ / "run" / "checkpoints").string(), "--prompt",
                                     "The", "--temperature", "1", "--max-new-tokens", "30", "--seed", seed});
    E2E_EXPECT_OK(g);
  }
}

}  // namespace
}  // namespace diffmoe::e2e
