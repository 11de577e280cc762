// Eval task definitions: a small YAML file per task (docs/evaluation.md "Task configs"), or a
// built-in format on a file from the command line (`--task arc:arc_easy_test.jsonl`).
//
//   task: arc_easy                 # the name in the report (default: the file's stem)
//   file: arc_easy_test.jsonl      # relative to the YAML file's folder; .gz/.zst read too
//   format: arc                    # hellaswag | arc | piqa | fields | text
//   num_fewshot: 0
//
// Multiple-choice formats read JSONL, one document per line:
//   hellaswag  ctx_a + " " + ctx_b.capitalize() (or ctx), endings, label; activity_label (optional)
//              + ": " before the context; lm-eval's hellaswag preprocessing of both
//   arc        question, choices {text: [...], label: [...]}, answerKey (one of choices.label)
//   piqa       goal, sol1, sol2, label (0 or 1)
//   fields     doc_to_text (a template: "{{key}}" is the document's string under key, a dotted key
//              reaches into objects), choices (a key holding a list of strings, or a list of keys
//              holding one string each), label (a key holding the answer's index, as a number or
//              a digit string; with choice_labels, a key holding a list of labels the answer is
//              looked up in). arc and piqa are presets of these keys, which a config may override.
// Few-shot (num_fewshot > 0): each document's context is
//   description + ex_1 + fewshot_delimiter + … + ex_k + fewshot_delimiter + doc_to_text(doc)
// with ex_i = doc_to_text + target_delimiter + the gold choice of k documents drawn without
// replacement from fewshot_file (default: the task's file, the document itself excluded) by a
// generator seeded with fewshot_seed and the document's index.
// format: text is a perplexity task over `file` (an input spec: files, directories, globs;
// text_field for JSONL, stride: targets per window, 0 = the sequence length).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::eval {

enum class TaskFormat { kHellaswag, kArc, kPiqa, kFields, kText };
std::string_view task_format_name(TaskFormat f);

struct TaskConfig {
  std::string name;
  TaskFormat format = TaskFormat::kFields;
  std::string file;    // the documents (format text: an input spec)
  std::string source;  // the YAML file, or "--task <spec>", for messages
  // Multiple choice (fields; preset for arc and piqa).
  std::string doc_to_text;
  std::vector<std::string> choices;  // one key holding a list, or one key per choice
  std::string label;
  std::string choice_labels;  // empty: `label` is an index
  std::string target_delimiter = " ";
  std::string fewshot_delimiter = "\n\n";
  std::string description;
  int64_t num_fewshot = 0;
  std::string fewshot_file;  // empty: `file`
  uint64_t fewshot_seed = 1234;
  // Perplexity (text).
  std::string text_field = "text";
  int64_t stride = 0;

  bool multiple_choice() const { return format != TaskFormat::kText; }
};

// Reads a task YAML file. Errors name the file and the key.
TaskConfig load_task_config(const std::string& path);

// A --task argument: "FORMAT:FILE" (hellaswag, arc, piqa or text) with the format's defaults, or
// the path of a task YAML file.
TaskConfig parse_task_spec(const std::string& spec);

}  // namespace diffmoe::eval
