// train.recompute end to end: a short training run of the tiny preset's model with each mode gives,
// on the CPU, exactly the metrics (every logged number but the timings) and the final weights of
// `none`, and says how big its activation arena is.
#include <map>

#include "e2e_util.h"
#include "io/config_file.h"
#include "test_util.h"

namespace diffmoe::e2e {
namespace {

TEST_F(E2E, EveryRecomputeModeTrainsExactlyAsNone) {
  // configs/tiny.yaml's model; the micro run's data, tokenizer (its 300 tokens fit the model's
  // vocabulary) and a short schedule with gradient accumulation and validation.
  const nlohmann::ordered_json tiny = load_yaml_file(test::repo_path("configs/tiny.yaml"));
  auto config = [&](const std::string& mode) {
    Yaml y = micro_config(dir_, dir_ / mode);
    for (const auto& [k, v] : tiny.at("model").items()) y.set("model." + k, v.dump());
    y.set("train.micro_batch", "2");
    y.set("train.seq_len", "32");
    y.set("train.grad_accum", "2");
    y.set("train.max_steps", "4");
    y.set("eval.every", "2");
    y.set("checkpoint.every", "4");
    y.set("log.tensorboard", "false");
    y.set("train.recompute", mode);
    return write_config(y, mode + ".yaml");
  };
  const char* modes[] = {"none", "attention", "moe", "full"};
  std::map<std::string, std::vector<nlohmann::json>> rows;
  std::map<std::string, double> arena_mib;
  for (const char* mode : modes) {
    const RunResult r = train(config(mode));
    E2E_EXPECT_OK(r);
    const std::string say = fmt::format("(train.recompute: {}, micro-batch 2 x 32)", mode);
    const size_t at = r.out.find("activation arena: ");
    ASSERT_NE(at, std::string::npos) << r.out;
    EXPECT_NE(r.out.find(say, at), std::string::npos) << r.out;
    arena_mib[mode] = std::stod(r.out.substr(at + std::strlen("activation arena: ")));
    rows[mode] = read_jsonl(dir_ / mode / "metrics.jsonl");
  }
  EXPECT_LT(arena_mib["attention"], arena_mib["none"]);
  EXPECT_LT(arena_mib["moe"], arena_mib["none"]);
  EXPECT_LT(arena_mib["full"], arena_mib["attention"]);

  const std::vector<nlohmann::json>& want = rows["none"];
  ASSERT_EQ(want.size(), 6u) << "4 train rows, validation at 2 and 4";
  for (const char* mode : modes) {
    SCOPED_TRACE(mode);
    const std::vector<nlohmann::json>& got = rows[mode];
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].size(), want[i].size()) << got[i].dump();
      for (const auto& [key, value] : want[i].items()) {
        if (key == "tokens_per_s" || key == "step_time_s" || key == "mfu_pct") continue;  // timings
        ASSERT_TRUE(got[i].contains(key)) << key;
        EXPECT_EQ(got[i].at(key), value) << key << " of row " << i << ": " << got[i].dump() << " vs none "
                                         << want[i].dump();
      }
    }
    // The final weights and optimizer state, byte for byte.
    const fs::path ck = dir_ / mode / "checkpoints" / "step_000000004" / kShard0;
    EXPECT_TRUE(read_file(ck) == read_file(dir_ / "none" / "checkpoints" / "step_000000004" / kShard0)) << ck;
  }
  EXPECT_NE(want.front().at("loss"), want[want.size() - 2].at("loss")) << "training moved";
}

TEST_F(E2E, AnUnknownRecomputeModeIsAnErrorNamingTheKey) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.recompute", "some");
  const RunResult r = train(write_config(y));
  expect_clean_error(r, {"train.recompute", "expected none, attention, moe or full, got 'some'"});
}

}  // namespace
}  // namespace diffmoe::e2e
