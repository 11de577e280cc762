// Logs: TensorBoard event files (read back here, every CRC checked) and JSONL metrics. An
// interrupted and resumed run, so there are two event files and a step that was logged twice.
#include <map>
#include <set>

#include "e2e_util.h"
#include "io/tfevents.h"

namespace diffmoe::e2e {
namespace {

struct Point {
  int64_t step;
  float value;
};

TEST_F(E2E, TensorBoardAndJsonlLogsReadBack) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "8");
  y.set("train.stop_after", "5");  // interrupted after step 5; the last checkpoint is step 4
  y.set("checkpoint.every", "4");
  y.set("eval.every", "4");
  const fs::path cfg = write_config(y);
  E2E_EXPECT_OK(train(cfg));
  const RunResult resumed = train(cfg, {"--set", "train.stop_after=0", "--resume"});
  E2E_EXPECT_OK(resumed);

  // ---- TensorBoard: every record of every file, both CRCs checked by read_event_records.
  const std::vector<fs::path> files = list_dir(dir_ / "run" / "tb", "events.out.tfevents.");
  ASSERT_EQ(files.size(), 2u) << "one event file per invocation";
  std::vector<std::map<std::string, std::vector<Point>>> per_file;
  std::vector<int64_t> start_steps;
  for (const fs::path& f : files) {
    std::vector<std::string> records;
    try {
      records = read_event_records(f.string());
    } catch (const std::exception& e) {
      FAIL() << "CRC or framing error: " << e.what();
    }
    ASSERT_GE(records.size(), 3u) << f;
    std::vector<DecodedEvent> events;
    for (const auto& rec : records) events.push_back(decode_event(rec));
    ASSERT_TRUE(events[0].file_version.has_value()) << f << ": the first record must be the file_version";
    EXPECT_EQ(events[0].file_version->rfind("brain.Event:", 0), 0u) << *events[0].file_version;
    ASSERT_TRUE(events[1].session_status.has_value()) << f << ": the second record must be SessionLog START";
    EXPECT_EQ(*events[1].session_status, SessionStatus::kStart);
    start_steps.push_back(events[1].step);
    std::map<std::string, std::vector<Point>> tags;
    double last_wall = 0;
    for (const auto& ev : events) {
      EXPECT_GE(ev.wall_time, last_wall) << f << ": wall time goes backwards";
      last_wall = ev.wall_time;
      for (const auto& v : ev.values) {
        ASSERT_TRUE(v.simple_value.has_value()) << v.tag;
        EXPECT_TRUE(std::isfinite(*v.simple_value)) << v.tag << " at step " << ev.step;
        tags[v.tag].push_back({ev.step, *v.simple_value});
      }
    }
    for (const auto& [tag, points] : tags)
      for (size_t i = 1; i < points.size(); ++i)
        EXPECT_LT(points[i - 1].step, points[i].step) << f << ": " << tag << " steps not increasing";
    per_file.push_back(std::move(tags));
  }
  // START at 0 (fresh) and, resumed from the step-4 checkpoint, at 5: the first step the resumed
  // run logs. (At 4 it would purge step 4's train and val points, which no later file repeats.)
  EXPECT_EQ(start_steps, (std::vector<int64_t>{0, 5}));

  // What TensorBoard shows: a later file's START at step s purges the earlier points with step >= s.
  std::map<std::string, std::map<int64_t, float>> shown;
  for (size_t i = 0; i < per_file.size(); ++i)
    for (const auto& [tag, points] : per_file[i])
      for (const Point& p : points) {
        bool purged = false;
        for (size_t j = i + 1; j < per_file.size(); ++j) purged = purged || p.step >= start_steps[j];
        if (!purged) shown[tag][p.step] = p.value;
      }
  std::set<int64_t> all_steps, eval_steps = {4, 8};
  for (int64_t s = 1; s <= 8; ++s) all_steps.insert(s);
  auto steps_of = [&](const std::string& tag) {
    std::set<int64_t> s;
    for (const auto& [step, v] : shown[tag]) s.insert(step);
    return s;
  };
  for (const char* tag :
       {"train/loss", "train/lr", "train/grad_norm", "train/aux_loss", "train/tokens_per_s", "train/step_time_s",
        "train/mfu_pct", "train/tokens_seen", "train/imbalance_l1", "train/imbalance_max", "train/lambda_l0"})
    EXPECT_EQ(steps_of(tag), all_steps) << tag;
  for (const char* tag : {"val/val_loss", "val/val_ppl", "val/val_tokens"}) EXPECT_EQ(steps_of(tag), eval_steps) << tag;
  // Step 5 was logged by both invocations (the first was cut off after it); same loss both times.
  ASSERT_FALSE(per_file[0]["train/loss"].empty());
  EXPECT_EQ(per_file[0]["train/loss"].back().step, 5);
  EXPECT_EQ(per_file[0]["train/loss"].back().value, shown["train/loss"][5]);
  EXPECT_EQ(shown["train/tokens_seen"][8], 8.0f * 4 * 32);
  EXPECT_GT(shown["train/lr"][2], shown["train/lr"][8]) << "cosine decay after warm-up";

  // ---- JSONL: every line parses; after the same "later rows win" rule, the same steps and values.
  const auto rows = read_jsonl(dir_ / "run" / "metrics.jsonl");
  ASSERT_FALSE(rows.empty());
  std::map<std::string, std::map<int64_t, nlohmann::json>> jsonl;
  std::vector<int64_t> train_order;
  for (const auto& r : rows) {
    ASSERT_TRUE(r.is_object() && r.contains("step") && r.contains("kind")) << r.dump();
    jsonl[r.at("kind").get<std::string>()][r.at("step").get<int64_t>()] = r;
    if (r.at("kind") == "train") train_order.push_back(r.at("step").get<int64_t>());
  }
  // The resumed run dropped the interrupted run's row of step 5 (after its checkpoint at 4).
  EXPECT_EQ(train_order, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8})) << "one row per step across the resume";
  for (const std::string kind : {"train", "val"}) {
    std::set<int64_t> steps;
    for (const auto& [s, r] : jsonl[kind]) steps.insert(s);
    EXPECT_EQ(steps, kind == "train" ? all_steps : eval_steps) << kind;
    for (const auto& [step, row] : jsonl[kind])
      for (const auto& [key, value] : row.items()) {
        if (key == "step" || key == "kind") continue;
        const std::string tag = kind + "/" + key;
        ASSERT_TRUE(value.is_number()) << tag << " = " << value.dump();
        ASSERT_TRUE(shown[tag].contains(step))
            << tag << " at step " << step << " is in metrics.jsonl but not in TensorBoard";
        EXPECT_EQ(static_cast<float>(value.get<double>()), shown[tag][step]) << tag << " at step " << step;
      }
  }
  // And nothing in TensorBoard that the JSONL lacks.
  for (const auto& [tag, points] : shown) {
    const auto slash = tag.find('/');
    const std::string kind = tag.substr(0, slash), key = tag.substr(slash + 1);
    for (const auto& [step, v] : points)
      EXPECT_TRUE(jsonl[kind].contains(step) && jsonl[kind][step].contains(key)) << tag << " " << step;
  }
}

TEST_F(E2E, LogsCanBeSwitchedOff) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "2");
  y.set("log.tensorboard", "false");
  y.set("log.jsonl", "false");
  E2E_EXPECT_OK(train(write_config(y)));
  EXPECT_FALSE(fs::exists(dir_ / "run" / "metrics.jsonl"));
  EXPECT_TRUE(list_dir(dir_ / "run" / "tb").empty());
  EXPECT_TRUE(fs::exists(dir_ / "run" / "checkpoints" / "step_000000002" / "manifest.json"));
}

}  // namespace
}  // namespace diffmoe::e2e
