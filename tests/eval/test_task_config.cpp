// Task configs and documents: the built-in formats on the fixtures of tests/fixtures/eval (written
// for these tests), the fields format's templates, few-shot contexts, and errors that name the
// file, the line and the field.
#include <gtest/gtest.h>

#include "eval/task_config.h"
#include "eval/task_docs.h"
#include "eval_test_util.h"

namespace diffmoe {
namespace {

using eval::McDoc;
using eval::TaskConfig;
using Strings = std::vector<std::string>;

std::string fixture(const std::string& name) { return (test::eval_fixtures() / name).string(); }

void expect_error(const std::function<void()>& f, const Strings& needles) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming " << ::testing::PrintToString(needles);
  } catch (const Error& e) {
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "'" << n << "' not in: " << e.what();
  }
}

TEST(TaskDocs, Hellaswag) {
  const TaskConfig t = eval::parse_task_spec("hellaswag:" + fixture("hellaswag.jsonl"));
  EXPECT_EQ(t.name, "hellaswag");
  const std::vector<McDoc> d = eval::load_task_docs(t);
  ASSERT_EQ(d.size(), 4u);
  // activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
  EXPECT_EQ(d[0].context, "Baking bread: A man kneads a ball of dough on a floured table. He");
  EXPECT_EQ(d[0].choices,
            (Strings{"shapes it into a loaf and places it in a tin.", "throws the table out of the window.",
                     "reads a newspaper upside down while singing.", "paints the dough bright blue."}));
  EXPECT_EQ(d[0].gold, 0);
  EXPECT_EQ(d[1].gold, 1) << "label as a digit string";
  // " [title]" -> ". ", "[...]" dropped, "  " -> " " (after the strip, as lm-eval: the leading
  // space left by "[step] " stays).
  EXPECT_EQ(d[2].context, "Tying shoes: How to tie a shoe. Cross the laces. Then");
  EXPECT_EQ(d[2].choices[0], " Loop one lace under the other and pull tight.");
  EXPECT_EQ(d[2].gold, 0) << "label as a number";
  EXPECT_EQ(d[3].context, "Playing fetch: A dog runs across a park. The owner");
  EXPECT_EQ(d[3].gold, 3);
  EXPECT_EQ(d[3].where, fixture("hellaswag.jsonl") + ":4");
  EXPECT_EQ(eval::load_task_docs(t, 2).size(), 2u) << "--limit";
}

TEST(TaskDocs, HellaswagPreprocess) {
  EXPECT_EQ(eval::hellaswag_preprocess("  a [title] b [x]c  d [unclosed "), "a. b c d [unclosed");
  EXPECT_EQ(eval::hellaswag_preprocess("a    b"), "a  b") << "one pass of replace(\"  \", \" \")";
  EXPECT_EQ(eval::hellaswag_preprocess("a [b\nc] d"), "a [b\nc] d") << "'.' does not cross a newline";
}

TEST(TaskDocs, ArcAndPiqa) {
  const std::vector<McDoc> arc = eval::load_task_docs(eval::parse_task_spec("arc:" + fixture("arc.jsonl")));
  ASSERT_EQ(arc.size(), 4u);
  EXPECT_EQ(arc[0].context, "Question: Which of these is needed for a plant to make its own food?\nAnswer:");
  EXPECT_EQ(arc[0].choices, (Strings{"sunlight", "sand", "salt", "smoke"}));
  EXPECT_EQ(arc[0].gold, 0);
  EXPECT_EQ(arc[1].choices.size(), 3u);
  EXPECT_EQ(arc[1].gold, 1);
  EXPECT_EQ(arc[2].gold, 2) << "numeric labels \"1\"..\"4\", answerKey \"3\"";
  EXPECT_EQ(arc[3].gold, 2);
  EXPECT_EQ(arc[3].choices[3], "\xC3\xA9lectricit\xC3\xA9");
  const std::vector<McDoc> piqa = eval::load_task_docs(eval::parse_task_spec("piqa:" + fixture("piqa.jsonl")));
  ASSERT_EQ(piqa.size(), 4u);
  EXPECT_EQ(piqa[1].context, "Question: How do you open a jar with a tight lid?\nAnswer:");
  EXPECT_EQ(piqa[1].choices,
            (Strings{"Hit the jar against a wall until it breaks.", "Run the lid under hot water, then twist it."}));
  EXPECT_EQ(piqa[1].gold, 1);
}

TEST(TaskConfig, FieldsFormatFromYaml) {
  const TaskConfig t = eval::parse_task_spec(fixture("capitals.yaml"));
  EXPECT_EQ(t.name, "capitals");
  EXPECT_EQ(t.format, eval::TaskFormat::kFields);
  EXPECT_EQ(t.file, fixture("capitals.jsonl")) << "relative to the config's folder";
  const std::vector<McDoc> d = eval::load_task_docs(t);
  ASSERT_EQ(d.size(), 5u);
  EXPECT_EQ(d[0].context, "Question (Europe): what is the capital of France?\nAnswer:")
      << "{{meta.region}} and {{ country }}";
  EXPECT_EQ(d[2].choices, (Strings{"Mombasa", "Kisumu", "Nairobi"}));
  EXPECT_EQ(d[2].gold, 2);
  EXPECT_EQ(d[4].gold, 1);
}

TEST(TaskConfig, TextTask) {
  const TaskConfig t = eval::parse_task_spec(fixture("text.yaml"));
  EXPECT_EQ(t.name, "sample_text");
  EXPECT_FALSE(t.multiple_choice());
  EXPECT_EQ(t.stride, 16);
  EXPECT_EQ(t.file, fixture("text"));
  const TaskConfig s = eval::parse_task_spec("text:a.txt,b.jsonl");
  EXPECT_EQ(s.file, "a.txt,b.jsonl");
  EXPECT_EQ(s.name, "text");
}

TEST(TaskDocs, FewShotContexts) {
  const TaskConfig t = eval::parse_task_spec(fixture("arc_fewshot.yaml"));
  EXPECT_EQ(t.num_fewshot, 2);
  const std::vector<McDoc> plain = eval::load_task_docs(eval::parse_task_spec("arc:" + fixture("arc.jsonl")));
  const std::vector<McDoc> d = eval::load_task_docs(t), again = eval::load_task_docs(t);
  ASSERT_EQ(d.size(), plain.size());
  for (size_t i = 0; i < d.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(d[i].context, again[i].context) << "the draw is a function of the seed and the document";
    const std::string& c = d[i].context;
    ASSERT_EQ(c.rfind("The following are science questions.\n\n", 0), 0u) << c;
    ASSERT_TRUE(c.ends_with("\n\n" + plain[i].context)) << c;
    // Exactly two examples, each a question of another document with its gold answer.
    int examples = 0;
    for (size_t j = 0; j < plain.size(); ++j) {
      const std::string ex = plain[j].context + " " + plain[j].choices[static_cast<size_t>(plain[j].gold)] + "\n\n";
      if (c.find(ex) != std::string::npos) {
        ++examples;
        EXPECT_NE(j, i) << "a document is never its own example";
      }
    }
    EXPECT_EQ(examples, 2) << c;
    EXPECT_EQ(d[i].choices, plain[i].choices);
    EXPECT_EQ(d[i].gold, plain[i].gold);
  }
  // Asking for more examples than there are other documents is an error naming the config.
  test::TempDir tmp;
  const auto cfg = tmp.write("t.yaml", "file: " + fixture("arc.jsonl") + "\nformat: arc\nnum_fewshot: 4\n");
  expect_error([&] { eval::load_task_docs(eval::load_task_config(cfg.string())); },
               {cfg.string(), "num_fewshot: 4 examples asked"});
}

TEST(TaskDocs, BadDocumentsNameFileLineAndField) {
  test::TempDir tmp;
  const auto docs = [&](const std::string& format, const std::string& text) {
    const auto f = tmp.write("bad_" + format + ".jsonl", text);
    return eval::load_task_docs(eval::parse_task_spec(format + ":" + f.string()));
  };
  const std::string ok = R"({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})";
  const std::string p = (tmp.path() / "bad_piqa.jsonl").string();
  expect_error([&] { docs("piqa", ok + "\n\n{not json\n"); }, {p + ":3: not a JSON object"});
  expect_error([&] { docs("piqa", ok + "\n[1, 2]\n"); }, {p + ":2: expected a JSON object"});
  expect_error([&] { docs("piqa", R"({"goal": "g", "sol1": "a", "label": 0})"); }, {p + ":1: field 'sol2': missing"});
  expect_error([&] { docs("piqa", R"({"goal": "g", "sol1": "a", "sol2": "b", "label": 2})"); },
               {p + ":1: field 'label': answer 2 is not one of the 2 choices"});
  expect_error([&] { docs("piqa", R"({"goal": "g", "sol1": "a", "sol2": "b", "label": "yes"})"); },
               {p + ":1: field 'label': expected the answer's index"});
  expect_error([&] { docs("piqa", R"({"goal": ["g"], "sol1": "a", "sol2": "b", "label": 0})"); },
               {p + ":1: field 'goal': expected a string or a number"});
  expect_error([&] { docs("piqa", R"({"goal": "g", "sol1": 1, "sol2": "b", "label": 0})"); },
               {p + ":1: field 'sol1': expected a string"});
  expect_error([&] { docs("piqa", R"({"goal": "g", "sol1": "", "sol2": "b", "label": 0})"); },
               {p + ":1: choice 0 is empty"});
  const std::string h = (tmp.path() / "bad_hellaswag.jsonl").string();
  expect_error([&] { docs("hellaswag", R"({"ctx": "c", "endings": "one", "label": 0})"); },
               {h + ":1: field 'endings': expected a non-empty list of strings"});
  expect_error([&] { docs("hellaswag", R"({"ctx": "c", "label": 0})"); }, {h + ":1: field 'endings': missing"});
  const std::string a = (tmp.path() / "bad_arc.jsonl").string();
  expect_error(
      [&] {
        docs("arc", R"({"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "E"})");
      },
      {a + ":1: field 'answerKey': answer 'E' is not one of the labels in 'choices.label'"});
  expect_error(
      [&] { docs("arc", R"({"question": "q", "choices": {"text": ["x", "y"], "label": ["A"]}, "answerKey": "A"})"); },
      {a + ":1: field 'choices.label': 1 labels for 2 choices"});
  expect_error([&] { docs("arc", ""); }, {a, "no documents"});
  const std::string missing = (tmp.path() / "nope.jsonl").string();
  expect_error([&] { eval::load_task_docs(eval::parse_task_spec("arc:" + missing)); }, {missing, "cannot open"});
}

TEST(TaskConfig, BadConfigsNameFileAndKey) {
  test::TempDir tmp;
  const auto load = [&](const std::string& yaml) {
    const auto f = tmp.write("task.yaml", yaml);
    return eval::load_task_config(f.string());
  };
  const std::string y = (tmp.path() / "task.yaml").string();
  expect_error([&] { load("file: x.jsonl\nformat: arc\nnum_shots: 2\n"); }, {y, "num_shots: unknown key"});
  expect_error([&] { load("file: x.jsonl\nformat: mmlu\n"); },
               {y, "format: 'mmlu' is not hellaswag, arc, piqa, fields or text"});
  expect_error([&] { load("file: x.jsonl\n"); }, {y, "format: missing"});
  expect_error([&] { load("format: piqa\n"); }, {y, "file: missing"});
  expect_error([&] { load("file: x.jsonl\nformat: fields\nchoices: options\nlabel: answer\n"); },
               {y, "doc_to_text: missing"});
  expect_error([&] { load("file: x.jsonl\nformat: arc\nnum_fewshot: -1\n"); }, {y, "num_fewshot: must be >= 0"});
  expect_error([&] { load("file: x.jsonl\nformat: arc\nnum_fewshot: two\n"); },
               {y, "num_fewshot: expected an integer"});
  expect_error([&] { load("file: t\nformat: text\ndoc_to_text: x\n"); }, {y, "doc_to_text: unknown key"});
  expect_error([&] { eval::parse_task_spec("mmlu:x.jsonl"); },
               {"--task mmlu:x.jsonl", "neither a task YAML file nor FORMAT:FILE"});
  // A template naming a key the document lacks.
  const auto data = tmp.write("d.jsonl", R"({"q": "x", "options": ["a", "b"], "answer": 1})"
                                         "\n");
  const auto cfg = tmp.write(
      "f.yaml", "file: d.jsonl\nformat: fields\ndoc_to_text: '{{question}}'\nchoices: options\nlabel: answer\n");
  expect_error([&] { eval::load_task_docs(eval::load_task_config(cfg.string())); },
               {data.string() + ":1: field 'question': missing (named in doc_to_text)"});
}

}  // namespace
}  // namespace diffmoe
