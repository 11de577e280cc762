// The documents of a multiple-choice task (task_config.h formats), read from JSONL (optionally
// .gz/.zst) into McDocs with their contexts (few-shot examples included). A line that is not a
// JSON object, a missing or mistyped field, or an answer that names no choice is an error
// "file:line: field 'name': why".
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/multiple_choice.h"
#include "eval/task_config.h"

namespace diffmoe::eval {

// One JSONL record and where it came from.
struct JsonRecord {
  nlohmann::json value;
  std::string where;  // "file:line"
};

// Every non-blank line of a JSONL file (.gz/.zst decompressed); up to `limit` records (0 = all).
std::vector<JsonRecord> read_jsonl_records(const std::string& path, int64_t limit = 0);

// A document's prompt, choices and answer under the task's format, before few-shot examples.
McDoc doc_from_record(const TaskConfig& task, const JsonRecord& record);

// lm-eval's hellaswag preprocessing: strip, " [title]" -> ". ", drop "[...]" markers, "  " -> " ".
std::string hellaswag_preprocess(std::string_view text);

// The task's documents (the first `limit`, 0 = all), contexts with num_fewshot examples.
std::vector<McDoc> load_task_docs(const TaskConfig& task, int64_t limit = 0);

}  // namespace diffmoe::eval
