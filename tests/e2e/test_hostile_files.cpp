// Files that lie: checkpoints with unlisted or altered files (the manifest vouches for every file a
// reader opens, a model file named directly included), pointers and manifests naming endless
// files (/dev/zero, FIFOs), tokenizers with absurd ids, shards with ids outside their vocabulary,
// outputs that name device nodes or FIFOs, and memory a config cannot have.
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <xxhash.h>

#include "e2e_util.h"
#include "io/checkpoint.h"

namespace diffmoe::e2e {
namespace {

// A hang shows up as the harness's kill after this many seconds, never as a passing test.
RunOptions quick(rlim_t address_space = 0) {
  RunOptions o;
  o.timeout_s = 30;
  o.address_space_limit = address_space;
  return o;
}
constexpr rlim_t kFourGiB = rlim_t{4} << 30;

// One short run with a checkpoint at every step (1..n).
class Checkpointed : public E2E {
 protected:
  void SetUp() override {
    E2E::SetUp();
    Yaml y = micro_config(dir_, dir_ / "run");
    y.set("train.max_steps", "2");
    y.set("checkpoint.every", "1");
    y.set("eval.every", "0");
    config_ = write_config(y);
    E2E_EXPECT_OK(train(config_));
    ck_ = dir_ / "run" / "checkpoints";
    ASSERT_EQ(read_file(ck_ / "latest"), "step_000000002\n");
  }
  RunResult eval(const fs::path& checkpoint, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {
        "eval",  "--checkpoint", checkpoint.string(), "--data", (dir_ / "shards").string(), "--batch", "2",
        "--seq", "16",           "--batches",         "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_diffmoe(args, quick());
  }
  fs::path config_, ck_;
};

TEST_F(Checkpointed, EveryFileOfACheckpointIsListedAndChecked) {
  const fs::path step2 = ck_ / "step_000000002";
  // A file the manifest does not list makes the checkpoint invalid: named explicitly it is an
  // error, as `latest` the readers fall back to step 1 with a warning.
  write_file(step2 / "extra.json", "{}");
  expect_clean_error(eval(step2), {(step2 / "extra.json").string(), "not listed"});
  expect_clean_error(train(config_, {"--resume", step2.string(), "--set", "train.max_steps=3"}),
                     {(step2 / "extra.json").string()});
  const RunResult fallback = eval(ck_);
  E2E_EXPECT_OK(fallback);
  EXPECT_NE(fallback.err.find("extra.json"), std::string::npos) << fallback.err;
  EXPECT_NE(fallback.out.find("(step 1)"), std::string::npos) << fallback.out;
  fs::remove(step2 / "extra.json");

  // A model file named directly is checked against the manifest beside it: one flipped bit in the
  // last weight (same size) is found; --no-verify reads it anyway.
  const fs::path model = step2 / kShard0;
  std::string bytes = read_file(model);
  bytes[bytes.size() - 4] ^= 0x01;  // the lowest mantissa byte of the last f32
  write_file(model, bytes);
  expect_clean_error(eval(model), {model.string(), "xxh3", "corrupted"});
  expect_clean_error(run_diffmoe({"generate", "--checkpoint", model.string(), "--tokenizer",
                                  (dir_ / "tokenizer.json").string(), "--prompt", "The", "--max-new-tokens", "2"},
                                 quick()),
                     {model.string(), "corrupted"});
  expect_clean_error(
      run_diffmoe({"bench", "--checkpoint", step2.string(), "--no-decode", "--steps", "1", "--warmup", "0"}, quick()),
      {model.string(), "corrupted"});
  expect_clean_error(run_diffmoe({"serve", "--checkpoint", model.string(), "--port", "0"}, quick()),
                     {model.string(), "corrupted"});
  E2E_EXPECT_OK(run_diffmoe(
      {"bench", "--checkpoint", step2.string(), "--no-decode", "--steps", "1", "--warmup", "0", "--no-verify"},
      quick()));
  E2E_EXPECT_OK(eval(model, {"--no-verify"}));
  E2E_EXPECT_OK(
      run_diffmoe({"generate", "--checkpoint", model.string(), "--tokenizer", (dir_ / "tokenizer.json").string(),
                   "--prompt", "The", "--max-new-tokens", "2", "--no-verify"},
                  quick()));
  E2E_EXPECT_OK(eval(step2, {"--no-verify"}));
  // A model file that is not the one the manifest lists under that name (a copy under another
  // name in the checkpoint) is not vouched for.
  fs::copy_file(ck_ / "step_000000001" / kShard0, ck_ / "step_000000001" / "model_copy.safetensors");
  expect_clean_error(eval(ck_ / "step_000000001" / "model_copy.safetensors"), {"model_copy.safetensors", "not listed"});
}

// A state shard named directly stands for its checkpoint: verified with it (and its tokenizer
// used), exported from it; without the manifest beside it, it is refused unless --no-verify.
TEST_F(Checkpointed, AStateShardNamedDirectlyIsReadWithItsCheckpoint) {
  const fs::path step2 = ck_ / "step_000000002", shard = step2 / kShard0;
  const std::vector<std::string> gen = {
      "generate", "--checkpoint", shard.string(), "--prompt", "The", "--max-new-tokens", "2"};
  const RunResult g = run_diffmoe(gen, quick());  // no --tokenizer: the checkpoint's copy
  E2E_EXPECT_OK(g);
  EXPECT_NE(g.err.find("checkpoint step 2"), std::string::npos) << g.err;
  const fs::path exported = dir_ / "exported.safetensors";
  E2E_EXPECT_OK(
      run_diffmoe({"checkpoint", "export", "--checkpoint", shard.string(), "--out", exported.string()}, quick()));
  E2E_EXPECT_OK(eval(exported));  // an exported model file has no manifest, and needs none

  fs::rename(step2 / "manifest.json", dir_ / "manifest.json");
  expect_clean_error(run_diffmoe(gen, quick()), {shard.string(), (step2 / "manifest.json").string(), "--no-verify"});
  expect_clean_error(eval(shard), {shard.string(), (step2 / "manifest.json").string(), "--no-verify"});
  expect_clean_error(
      run_diffmoe({"checkpoint", "export", "--checkpoint", shard.string(), "--out", exported.string()}, quick()),
      {step2.string(), "no valid checkpoint"});
  std::vector<std::string> unverified = gen;
  unverified.push_back("--no-verify");
  E2E_EXPECT_OK(run_diffmoe(unverified, quick()));
  E2E_EXPECT_OK(eval(shard, {"--no-verify"}));
}

TEST_F(Checkpointed, PointersAndManifestsNamingEndlessFilesFailFast) {
  // `latest` -> /dev/zero, then a FIFO: a warning, and the newest step directory that verifies.
  for (const char* kind : {"dev-zero", "fifo"}) {
    SCOPED_TRACE(kind);
    fs::remove(ck_ / "latest");
    if (std::string(kind) == "fifo") ASSERT_EQ(::mkfifo((ck_ / "latest").c_str(), 0644), 0);
    else fs::create_symlink("/dev/zero", ck_ / "latest");
    const RunResult r = eval(ck_);
    E2E_EXPECT_OK(r);
    EXPECT_NE(r.err.find((ck_ / "latest").string()), std::string::npos) << r.err;
    EXPECT_NE(r.out.find("(step 2)"), std::string::npos) << r.out;
    // One warning with the reason, not a second one about the (empty) name it did not read (the
    // machine's own warning about OpenBLAS's kernels, backend/cpu/openblas_kernels.h, aside).
    size_t warnings = 0;
    for (const std::string& line : split_lines(r.err)) warnings += line.find("OPENBLAS_CORETYPE") == std::string::npos;
    EXPECT_EQ(warnings, 1u) << r.err;
    EXPECT_EQ(r.err.find("holds ''"), std::string::npos) << r.err;
    const RunResult resumed = train(config_, {"--resume", "--set", "train.max_steps=2"}, quick());
    E2E_EXPECT_OK(resumed);
    EXPECT_NE(resumed.out.find("at step 2"), std::string::npos) << resumed.out;
  }
  fs::remove(ck_ / "latest");
  // A manifest that is /dev/zero or a FIFO: that checkpoint is refused naming it; step 1 is used.
  const fs::path manifest = ck_ / "step_000000002" / "manifest.json";
  for (const char* kind : {"dev-zero", "fifo"}) {
    SCOPED_TRACE(kind);
    fs::remove(manifest);
    if (std::string(kind) == "fifo") ASSERT_EQ(::mkfifo(manifest.c_str(), 0644), 0);
    else fs::create_symlink("/dev/zero", manifest);
    expect_clean_error(eval(ck_ / "step_000000002"), {manifest.string(), "not a regular file"});
    const RunResult r = eval(ck_);
    E2E_EXPECT_OK(r);
    EXPECT_NE(r.out.find("(step 1)"), std::string::npos) << r.out;
  }
}

TEST_F(E2E, ConfigPathsNamingEndlessFilesFailFast) {
  const fs::path fifo = dir_ / "config.fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  for (const std::string& path : {std::string("/dev/zero"), fifo.string()}) {
    SCOPED_TRACE(path);
    expect_clean_error(run_diffmoe({"train", "--config", path}, quick(kFourGiB)), {path, "not a regular file"});
    expect_clean_error(run_diffmoe({"params", "--config", path}, quick(kFourGiB)), {path, "not a regular file"});
    expect_clean_error(run_diffmoe({"tokenizer", "encode", "--tokenizer", path, "--text", "hi"}, quick(kFourGiB)),
                       {path, "not a regular file"});
  }
  // Text found by fuzzing: a leading ',' (yaml-cpp's LoadAll looped forever, eating memory) and a
  // value that is not UTF-8 (the error message itself used to throw, naming nothing).
  write_file(dir_ / "comma.yaml", ",\nmodel: {}\n");
  std::string bad = micro_config(dir_, dir_ / "run").str();
  bad.replace(bad.find("dim: 32"), 7, "dim: \"\xc8\x01\"");
  write_file(dir_ / "not_utf8.yaml", bad);
  for (const auto& [name, needle] : std::vector<std::pair<std::string, std::string>>{
           {"comma.yaml", "one YAML document"}, {"not_utf8.yaml", "not valid UTF-8"}}) {
    SCOPED_TRACE(name);
    const std::string path = (dir_ / name).string();
    expect_clean_error(run_diffmoe({"train", "--config", path}, quick(kFourGiB)), {path, needle});
    expect_clean_error(run_diffmoe({"params", "--config", path}, quick(kFourGiB)), {path, needle});
  }
}

// A trained tokenizer.json, edited by `edit`, written to <dir>/<name>.
fs::path edited_tokenizer(const fs::path& dir, const std::string& name,
                          const std::function<void(nlohmann::ordered_json&)>& edit) {
  const fs::path tok = dir / "tok.json";
  if (!fs::exists(tok)) {
    const RunResult r = run_diffmoe(
        {"tokenizer", "train", "--input", (dir / "corpus.txt").string(), "--out", tok.string(), "--vocab-size", "300"});
    EXPECT_TRUE(r.exited && r.code == 0) << r.describe();
  }
  auto j = nlohmann::ordered_json::parse(read_file(tok));
  edit(j);
  write_file(dir / name, j.dump());
  return dir / name;
}

TEST_F(E2E, TokenizerIdsAreBoundedAndDense) {
  struct Case {
    std::string name;
    std::function<void(nlohmann::ordered_json&)> edit;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"huge_vocab_id.json", [](auto& j) { j["model"]["vocab"]["zzzz"] = 1000000000; }, "1000000000"},
      {"huge_added_id.json",
       [](auto& j) {
         j["added_tokens"].push_back({{"id", 1000000000}, {"content", "<|x|>"}, {"special", true}});
       },
       "1000000000"},
      {"wrapping_id.json", [](auto& j) { j["model"]["vocab"]["zzzz"] = 4294967296 + 7; }, "4294967303"},
      {"holes.json", [](auto& j) { j["model"]["vocab"]["zzzz"] = 5000; }, "not dense"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path tok = edited_tokenizer(dir_, c.name, c.edit);
    expect_clean_error(
        run_diffmoe({"tokenizer", "encode", "--tokenizer", tok.string(), "--text", "hi"}, quick(kFourGiB)),
        {tok.string(), c.needle});
  }
  // A .tiktoken line with rank 10^9 (the gpt2 preset by file name).
  std::string ranks;
  static const char* kB64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int b = 0; b < 256; ++b) ranks += fmt::format("{}{}== {}\n", kB64[b >> 2], kB64[(b & 3) << 4], b);
  ranks += "YWI= 1000000000\n";  // "ab"
  write_file(dir_ / "gpt2.tiktoken", ranks);
  expect_clean_error(
      run_diffmoe({"tokenizer", "encode", "--tokenizer", (dir_ / "gpt2.tiktoken").string(), "--text", "hi"},
                  quick(kFourGiB)),
      {(dir_ / "gpt2.tiktoken").string(), "1000000000"});
}

TEST_F(E2E, ShardIdsOutsideTheVocabularyNameTheShardAndOffset) {
  Yaml y = micro_config(dir_, dir_ / "first");
  y.set("train.max_steps", "1");
  E2E_EXPECT_OK(train(write_config(y, "first.yaml")));
  const fs::path shard = dir_ / "shards" / "train_0000.bin";
  std::string bytes = read_file(shard);
  ASSERT_GT(bytes.size(), 64u + 8 + 2000);
  const uint16_t bad = 65000;  // the shard's vocabulary is 300 (u16 ids)
  for (size_t t = 10; 64 + 2 * t + 2 <= bytes.size() - 8; t += 97) std::memcpy(&bytes[64 + 2 * t], &bad, 2);
  const uint64_t sum =
      XXH64(bytes.data() + 64, bytes.size() - 64 - 8, 0);  // a consistent footer: only the ids are wrong
  std::memcpy(&bytes[bytes.size() - 8], &sum, 8);
  write_file(shard, bytes);
  Yaml z = micro_config(dir_, dir_ / "second");
  z.set("train.max_steps", "2");
  const RunResult r = train(write_config(z, "second.yaml"), {}, quick());
  expect_clean_error(r, {shard.string(), "outside the shard's vocabulary", "65000", "byte offset"});
  expect_clean_error(
      run_diffmoe({"data", "inspect", shard.string(), "--tokenizer", (dir_ / "tokenizer.json").string()}, quick()),
      {shard.string(), "token 10 (byte offset 84)", "65000"});
}

TEST_F(E2E, OutputsThatAreNotRegularFilesAreRefused) {
  const fs::path fifo = dir_ / "out.fifo", file = dir_ / "file.txt";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  write_file(file, "not a directory\n");
  std::vector<fs::path> nodes = {fifo};
  // A character device node of our own (/dev/null's numbers) where mknod is allowed.
  const fs::path dev = dir_ / "null.dev";
  if (::mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0) nodes.push_back(dev);
  const fs::path cfg = write_config(micro_config(dir_, dir_ / "run"));
  for (const fs::path& node : nodes) {
    SCOPED_TRACE(node.string());
    const std::string what = node == fifo ? "a FIFO" : "a character device";
    expect_clean_error(run_diffmoe({"tokenizer", "train", "--input", (dir_ / "corpus.txt").string(), "--out",
                                    node.string(), "--vocab-size", "300"},
                                   quick()),
                       {node.string(), what});
    expect_clean_error(run_diffmoe({"init", "--config", cfg.string(), "--out", node.string()}, quick()),
                       {node.string(), what});
    expect_clean_error(run_diffmoe({"data", "prepare", "--input", (dir_ / "corpus.txt").string(), "--tokenizer",
                                    (dir_ / "tokenizer.json").string(), "--out", node.string()},
                                   quick()),
                       {node.string()});
    Yaml y = micro_config(dir_, dir_ / "run");
    y.set_path("tokenizer.path", node);
    expect_clean_error(train(write_config(y, "node_tok.yaml"), {}, quick()), {node.string()});
    struct stat st {};
    ASSERT_EQ(::stat(node.c_str(), &st), 0);
    EXPECT_FALSE(S_ISREG(st.st_mode)) << node << " was replaced by a regular file";
  }
  expect_clean_error(run_diffmoe({"data", "prepare", "--input", (dir_ / "corpus.txt").string(), "--tokenizer",
                                  (dir_ / "tokenizer.json").string(), "--out", file.string()},
                                 quick()),
                     {file.string(), "a regular file", "expected a directory"});
  // The run's own directories: a file or a FIFO where a directory belongs.
  for (const char* key : {"train.out_dir", "checkpoint.dir", "data.shards"}) {
    SCOPED_TRACE(key);
    Yaml y = micro_config(dir_, dir_ / "run");
    y.set_path(key, std::string(key) == "data.shards" ? file : fifo);
    expect_clean_error(train(write_config(y, "dirs.yaml"), {}, quick()),
                       {key, std::string(key) == "data.shards" ? file.string() : fifo.string()});
  }
  EXPECT_EQ(read_file(file), "not a directory\n");
}

// Report and port files are replaced by rename: named as a FIFO, a device node or a directory they
// are refused before any work (a rename over /dev/null would replace the device node itself).
TEST_F(Checkpointed, ReportAndPortFilesThatAreNotRegularFilesAreRefused) {
  const fs::path fifo = dir_ / "report.fifo", directory = dir_ / "report_dir";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  fs::create_directory(directory);
  std::vector<std::pair<fs::path, std::string>> nodes = {{fifo, "a FIFO"}, {directory, "a directory"}};
  const fs::path dev = dir_ / "null.dev";  // /dev/null's numbers, where mknod is allowed
  if (::mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0) nodes.emplace_back(dev, "a character device");
  for (const auto& [node, what] : nodes) {
    SCOPED_TRACE(node.string());
    expect_clean_error(eval(ck_, {"--report", node.string()}), {node.string(), "eval report", what});
    expect_clean_error(run_diffmoe({"bench", "--config", config_.string(), "--report", node.string()}, quick()),
                       {node.string(), "bench report", what});
    expect_clean_error(
        run_diffmoe({"serve", "--checkpoint", ck_.string(), "--port", "0", "--port-file", node.string()}, quick()),
        {node.string(), "port file", what});
    struct stat st {};
    ASSERT_EQ(::stat(node.c_str(), &st), 0);
    EXPECT_FALSE(S_ISREG(st.st_mode)) << node << " was replaced by a regular file";
  }
  EXPECT_TRUE(fs::is_empty(directory));
}

// Inputs that never end: a FIFO named as a model file, a data input or a shard is refused at once
// (opening one for reading used to wait for a writer forever); a val shard that cannot be read is an
// error naming it, not a run without validation.
TEST_F(Checkpointed, InputFifosAndUnreadableValShardsAreRefused) {
  const fs::path fifo = dir_ / "model.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  expect_clean_error(run_diffmoe({"generate", "--checkpoint", fifo.string(), "--tokenizer",
                                  (dir_ / "tokenizer.json").string(), "--prompt", "The", "--max-new-tokens", "2"},
                                 quick()),
                     {fifo.string(), "a FIFO"});
  expect_clean_error(run_diffmoe({"data", "prepare", "--input", fifo.string(), "--tokenizer",
                                  (dir_ / "tokenizer.json").string(), "--out", (dir_ / "fifo_shards").string()},
                                 quick()),
                     {fifo.string(), "not a regular file"});
  const fs::path val = dir_ / "shards" / "val_0000.bin";
  const std::string good = read_file(val);
  Yaml y = micro_config(dir_, dir_ / "again");
  y.set("train.max_steps", "1");
  const fs::path cfg = write_config(y, "again.yaml");
  fs::remove(val);
  ASSERT_EQ(::mkfifo(val.c_str(), 0644), 0);
  expect_clean_error(train(cfg, {}, quick()), {val.string(), "a FIFO"});
  expect_clean_error(eval(ck_), {val.string(), "a FIFO"});
  fs::remove(val);
  std::string bad = good;
  bad[100] ^= 0x01;  // a token id: the footer's checksum no longer matches
  write_file(val, bad);
  const RunResult r = train(cfg, {"--overwrite"}, quick());
  expect_clean_error(r, {val.string(), "checksum"});
  EXPECT_EQ(r.out.find("validation: none"), std::string::npos) << r.out;
  fs::remove(val);
  expect_clean_error(train(cfg, {"--overwrite"}, quick()), {val.string()});  // listed in meta.json, missing
}

// meta.json names the shards of its own directory only: a path elsewhere is an error naming it.
TEST_F(Checkpointed, AShardIndexNamesFilesOfItsDirectoryOnly) {
  const fs::path meta = dir_ / "shards" / "meta.json";
  const std::string good = read_file(meta);
  for (const std::string& name : {std::string("../shards/val_0000.bin"), std::string("/dev/zero"), std::string("..")}) {
    SCOPED_TRACE(name);
    nlohmann::json j = nlohmann::json::parse(good);
    j["val"]["shards"] = nlohmann::json::array({name});
    write_file(meta, j.dump());
    expect_clean_error(eval(ck_), {meta.string(), "val.shards", name, "not a file name"});
  }
}

TEST_F(E2E, CommandLineValuesAreChecked) {
  const fs::path nowhere = dir_ / "no_checkpoint";
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{{"--max-new-tokens", "-5"},
                                                                                    {"--temperature", "nan"},
                                                                                    {"--temperature", "-1"},
                                                                                    {"--top-p", "0"},
                                                                                    {"--top-p", "1.5"},
                                                                                    {"--top-k", "-2"}}) {
    SCOPED_TRACE(flag + " " + value);
    expect_clean_error(
        run_diffmoe({"generate", "--checkpoint", nowhere.string(), "--prompt", "x", flag, value}, quick()), {flag});
  }
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{
           {"--batch", "0"}, {"--seq", "-1"}, {"--batches", "-3"}, {"--split", "test"}}) {
    SCOPED_TRACE(flag + " " + value);
    expect_clean_error(
        run_diffmoe({"eval", "--checkpoint", nowhere.string(), "--data", nowhere.string(), flag, value}, quick()),
        {flag});
  }
  // serve: checked before the model loads (a port past 65535 used to wrap to another port).
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{{"--port", "70000"},
                                                                                    {"--port", "-1"},
                                                                                    {"--shutdown-timeout", "nan"},
                                                                                    {"--shutdown-timeout", "-1"},
                                                                                    {"--max-tokens", "0"},
                                                                                    {"--max-request-bytes", "0"},
                                                                                    {"--max-waiting", "0"}}) {
    SCOPED_TRACE(flag + " " + value);
    expect_clean_error(run_diffmoe({"serve", "--checkpoint", nowhere.string(), flag, value}, quick()), {flag});
  }
  expect_clean_error(run_diffmoe({"data", "prepare", "--input", (dir_ / "corpus.txt").string(), "--tokenizer", "x",
                                  "--out", (dir_ / "s").string(), "--val-fraction", "nan"},
                                 quick()),
                     {"--val-fraction"});
  // An id the tokenizer lacks: the error names the tokenizer file.
  const fs::path tok = dir_ / "tok.json";
  E2E_EXPECT_OK(run_diffmoe(
      {"tokenizer", "train", "--input", (dir_ / "corpus.txt").string(), "--out", tok.string(), "--vocab-size", "300"}));
  expect_clean_error(run_diffmoe({"tokenizer", "decode", "--tokenizer", tok.string(), "72", "4000"}, quick()),
                     {tok.string(), "4000"});
}

// More memory than the process may have (RLIMIT_AS): the error names the sizes, the keys that set
// them and `diffmoe plan`, instead of "std::bad_alloc".
TEST_F(E2E, OutOfHostMemoryNamesTheSizesAndKeys) {
  Yaml prep = micro_config(dir_, dir_ / "prep");
  prep.set("train.max_steps", "1");
  E2E_EXPECT_OK(train(write_config(prep, "prep.yaml")));  // tokenizer and shards, outside the limit
  Yaml wide = micro_config(dir_, dir_ / "wide");
  wide.set("model.dim", "4096");
  wide.set("model.inter_dim", "65536");  // the dense layer alone: 3·4096·65536 f32 = 3 GiB, twice with gradients
  Yaml tall = micro_config(dir_, dir_ / "tall");
  tall.set("train.micro_batch", "200000");  // 6.4 M tokens of activations
  Yaml longer = micro_config(dir_, dir_ / "longer");
  longer.set("model.max_seq_len", "2147483647");  // RoPE tables for 2^31 positions
  for (const auto& [name, y] :
       std::vector<std::pair<std::string, Yaml>>{{"wide", wide}, {"tall", tall}, {"longer", longer}}) {
    SCOPED_TRACE(name);
    const fs::path cfg = write_config(y, name + ".yaml");
    expect_clean_error(
        train(cfg, {}, quick(rlim_t{3} << 30)),
        {"out of host memory", "GiB", "model.dim", "train.micro_batch", "train.seq_len", "diffmoe plan", cfg.string()});
  }
  // Dimensions past 2^31 - 1 would overflow sizes (to a small allocation, then memory corruption).
  const fs::path cfg = write_config(micro_config(dir_, dir_ / "huge"), "huge.yaml");
  for (const char* set : {"model.dim=4294967296", "model.vocab_size=3000000000", "model.n_routed_experts=2147483648"}) {
    SCOPED_TRACE(set);
    const std::string key = std::string(set).substr(0, std::string(set).find('='));
    expect_clean_error(train(cfg, {"--set", set}, quick(rlim_t{3} << 30)), {cfg.string(), key, "at most 2147483647"});
  }
}

}  // namespace
}  // namespace diffmoe::e2e
