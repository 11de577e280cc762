#include "eval/task_config.h"

#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/config_file.h"

namespace diffmoe::eval {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

std::string_view task_format_name(TaskFormat f) {
  switch (f) {
    case TaskFormat::kHellaswag: return "hellaswag";
    case TaskFormat::kArc: return "arc";
    case TaskFormat::kPiqa: return "piqa";
    case TaskFormat::kFields: return "fields";
    case TaskFormat::kText: return "text";
  }
  return "?";
}

namespace {

constexpr const char* kFormats = "hellaswag, arc, piqa, fields or text";

bool parse_format(std::string_view s, TaskFormat& f) {
  for (const TaskFormat c :
       {TaskFormat::kHellaswag, TaskFormat::kArc, TaskFormat::kPiqa, TaskFormat::kFields, TaskFormat::kText})
    if (s == task_format_name(c)) {
      f = c;
      return true;
    }
  return false;
}

// The lm-eval prompts of the presets (arc_easy.yaml, piqa.yaml); a config may override each key.
void apply_preset(TaskConfig& t) {
  if (t.format == TaskFormat::kArc) {
    t.doc_to_text = "Question: {{question}}\nAnswer:";
    t.choices = {"choices.text"};
    t.label = "answerKey";
    t.choice_labels = "choices.label";
  } else if (t.format == TaskFormat::kPiqa) {
    t.doc_to_text = "Question: {{goal}}\nAnswer:";
    t.choices = {"sol1", "sol2"};
    t.label = "label";
  }
}

class KeyReader {
 public:
  KeyReader(const Json& doc, std::string source) : doc_(doc), source_(std::move(source)) {}
  bool has(const char* key) {
    used_.insert(key);
    return doc_.contains(key) && !doc_[key].is_null();
  }
  std::string str(const char* key, std::string fallback) {
    if (!has(key)) return fallback;
    DIFFMOE_CHECK(doc_[key].is_string(), "{}: {}: expected a string, got {}", source_, key, doc_[key].dump());
    return doc_[key].get<std::string>();
  }
  int64_t integer(const char* key, int64_t fallback, int64_t min) {
    if (!has(key)) return fallback;
    DIFFMOE_CHECK(doc_[key].is_number_integer(), "{}: {}: expected an integer, got {}", source_, key, doc_[key].dump());
    const int64_t v = doc_[key].get<int64_t>();
    DIFFMOE_CHECK(v >= min, "{}: {}: must be >= {}, got {}", source_, key, min, v);
    return v;
  }
  std::vector<std::string> str_list(const char* key, std::vector<std::string> fallback) {
    if (!has(key)) return fallback;
    const Json& v = doc_[key];
    if (v.is_string()) return {v.get<std::string>()};
    DIFFMOE_CHECK(v.is_array() && !v.empty(), "{}: {}: expected a key or a list of keys, got {}", source_, key,
                  v.dump());
    std::vector<std::string> out;
    for (const Json& e : v) {
      DIFFMOE_CHECK(e.is_string(), "{}: {}: expected a list of keys (strings), got {}", source_, key, v.dump());
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  void finish() const {
    for (const auto& [key, v] : doc_.items()) {
      if (used_.contains(key)) continue;
      std::string known;
      for (const auto& k : used_) known += (known.empty() ? "" : ", ") + k;
      DIFFMOE_FAIL("{}: {}: unknown key (known: {})", source_, key, known);
    }
  }

 private:
  const Json& doc_;
  std::string source_;
  std::set<std::string> used_;
};

void validate(const TaskConfig& t) {
  DIFFMOE_CHECK(!t.file.empty(), "{}: file: missing (the documents to evaluate on)", t.source);
  if (!t.multiple_choice()) return;
  if (t.format != TaskFormat::kHellaswag) {
    DIFFMOE_CHECK(!t.doc_to_text.empty(),
                  "{}: doc_to_text: missing (format fields needs doc_to_text, choices and label)", t.source);
    DIFFMOE_CHECK(!t.choices.empty(), "{}: choices: missing (format fields needs doc_to_text, choices and label)",
                  t.source);
    DIFFMOE_CHECK(!t.label.empty(), "{}: label: missing (format fields needs doc_to_text, choices and label)",
                  t.source);
  }
}

}  // namespace

TaskConfig load_task_config(const std::string& path) {
  const Json doc = load_yaml_file(path);
  DIFFMOE_CHECK(doc.is_object(), "{}: expected a mapping (task:, file:, format:, ...)", path);
  KeyReader k(doc, path);
  TaskConfig t;
  t.source = path;
  const std::string format = k.str("format", "");
  DIFFMOE_CHECK(!format.empty(), "{}: format: missing ({})", path, kFormats);
  DIFFMOE_CHECK(parse_format(format, t.format), "{}: format: '{}' is not {}", path, format, kFormats);
  apply_preset(t);
  std::string file = k.str("file", "");
  DIFFMOE_CHECK(!file.empty(), "{}: file: missing (the documents to evaluate on)", path);
  // Relative paths are the config's neighbours (a glob or a comma list for text keeps its items).
  const fs::path dir = fs::path(path).parent_path();
  const auto resolve = [&](const std::string& p) {
    if (p.empty() || fs::path(p).is_absolute() || dir.empty()) return p;
    return (dir / p).string();
  };
  if (t.format == TaskFormat::kText) {
    std::string spec;
    for (size_t pos = 0; pos <= file.size();) {
      const size_t comma = std::min(file.find(',', pos), file.size());
      spec += (spec.empty() ? "" : ",") + resolve(file.substr(pos, comma - pos));
      pos = comma + 1;
    }
    t.file = spec;
  } else {
    t.file = resolve(file);
  }
  t.name = k.str("task", fs::path(file).stem().string());
  t.num_fewshot = k.integer("num_fewshot", 0, 0);
  if (t.multiple_choice()) {
    t.doc_to_text = k.str("doc_to_text", t.doc_to_text);
    t.choices = k.str_list("choices", t.choices);
    t.label = k.str("label", t.label);
    t.choice_labels = k.str("choice_labels", t.choice_labels);
    t.target_delimiter = k.str("target_delimiter", t.target_delimiter);
    t.fewshot_delimiter = k.str("fewshot_delimiter", t.fewshot_delimiter);
    t.description = k.str("description", t.description);
    t.fewshot_file = resolve(k.str("fewshot_file", ""));
    t.fewshot_seed = static_cast<uint64_t>(k.integer("fewshot_seed", static_cast<int64_t>(t.fewshot_seed), 0));
  } else {
    DIFFMOE_CHECK(t.num_fewshot == 0, "{}: num_fewshot: a text (perplexity) task has no few-shot examples", path);
    t.text_field = k.str("text_field", t.text_field);
    t.stride = k.integer("stride", 0, 0);
  }
  k.finish();
  validate(t);
  return t;
}

TaskConfig parse_task_spec(const std::string& spec) {
  const size_t colon = spec.find(':');
  TaskFormat f = TaskFormat::kFields;
  if (colon != std::string::npos && parse_format(spec.substr(0, colon), f) && f != TaskFormat::kFields) {
    TaskConfig t;
    t.format = f;
    t.source = "--task " + spec;
    apply_preset(t);
    t.file = spec.substr(colon + 1);
    DIFFMOE_CHECK(!t.file.empty(), "--task {}: no file after '{}:'", spec, task_format_name(f));
    t.name = f == TaskFormat::kText ? "text" : std::string(task_format_name(f));
    validate(t);
    return t;
  }
  DIFFMOE_CHECK(fs::is_regular_file(spec),
                "--task {}: neither a task YAML file nor FORMAT:FILE with FORMAT hellaswag, arc, piqa or text", spec);
  return load_task_config(spec);
}

}  // namespace diffmoe::eval
