// The report: stderr of the mean as lm-eval computes it, the JSON fields (NaN and missing stderr as
// null), the table, and the atomic write.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "eval/report.h"
#include "eval_test_util.h"

namespace diffmoe {
namespace {

TEST(Report, StderrOfTheMean) {
  // {1, 0, 1, 1}: mean 3/4, sample variance (3·(1/4)² + (3/4)²)/3 = 1/4, stderr = (1/2)/√4 = 1/4.
  const std::vector<double> v = {1, 0, 1, 1};
  EXPECT_DOUBLE_EQ(eval::mean(v), 0.75);
  ASSERT_TRUE(eval::mean_stderr(v).has_value());
  EXPECT_DOUBLE_EQ(*eval::mean_stderr(v), 0.25);
  EXPECT_FALSE(eval::mean_stderr(std::vector<double>{1}).has_value()) << "n − 1 = 0";
  EXPECT_DOUBLE_EQ(*eval::mean_stderr(std::vector<double>{2, 2, 2}), 0.0);
}

eval::EvalReport sample_report() {
  eval::EvalReport r;
  r.model = "runs/x/checkpoints/step_000000006";
  r.step = 6;
  r.tokenizer = "tok.json";
  r.device = "cpu";
  r.precision = "f32";
  r.batch = 8;
  r.rows.push_back({.task = "arc", .metric = "acc", .value = 0.75, .stderr_of_mean = 0.25, .count = 4});
  r.rows.push_back(
      {.task = "arc", .metric = "acc_norm", .value = 0.5, .stderr_of_mean = std::sqrt(1.0 / 12.0), .count = 4});
  r.rows.push_back(
      {.task = "wiki", .metric = "bits_per_byte", .value = 1.25, .stderr_of_mean = std::nullopt, .count = 2});
  r.rows.push_back(
      {.task = "wiki", .metric = "word_perplexity", .value = std::nan(""), .stderr_of_mean = std::nullopt, .count = 0});
  r.tasks["arc"] = {{"documents", 4}};
  return r;
}

TEST(Report, JsonFields) {
  const nlohmann::ordered_json j = eval::report_json(sample_report());
  EXPECT_EQ(j["model"], "runs/x/checkpoints/step_000000006");
  EXPECT_EQ(j["step"], 6);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["batch"], 8);
  ASSERT_EQ(j["results"].size(), 4u);
  const auto& acc = j["results"][0];
  EXPECT_EQ(acc["task"], "arc");
  EXPECT_EQ(acc["metric"], "acc");
  EXPECT_DOUBLE_EQ(acc["value"].get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(acc["stderr"].get<double>(), 0.25);
  EXPECT_EQ(acc["count"], 4);
  EXPECT_TRUE(j["results"][2]["stderr"].is_null());
  EXPECT_TRUE(j["results"][3]["value"].is_null()) << "NaN is not JSON";
  EXPECT_EQ(j["tasks"]["arc"]["documents"], 4);
  eval::EvalReport bare = sample_report();
  bare.step = -1;
  EXPECT_TRUE(eval::report_json(bare)["step"].is_null()) << "a bare model file has no step";
}

TEST(Report, TableAndFile) {
  const eval::EvalReport r = sample_report();
  const std::string t = eval::report_table(r);
  EXPECT_NE(t.find("| arc  | acc             |     0.7500 | ±   0.2500 |       4 |"), std::string::npos) << t;
  EXPECT_NE(t.find("|      | acc_norm        |     0.5000 | ±   0.2887 |       4 |"), std::string::npos) << t;
  EXPECT_NE(t.find("| wiki | bits_per_byte   |     1.2500 |            |       2 |"), std::string::npos) << t;
  test::TempDir tmp;
  const std::string path = (tmp.path() / "report.json").string();
  eval::write_report(path, r);
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(nlohmann::ordered_json::parse(ss.str()), eval::report_json(r));
  try {
    eval::write_report((tmp.path() / "no_dir" / "r.json").string(), r);
    ADD_FAILURE() << "writing into a missing folder must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no_dir/r.json: cannot write the report"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace diffmoe
