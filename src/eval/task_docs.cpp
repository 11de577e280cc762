#include "eval/task_docs.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"
#include "data/text_source.h"

namespace diffmoe::eval {

using Json = nlohmann::json;

std::vector<JsonRecord> read_jsonl_records(const std::string& path, int64_t limit) {
  const data::InputKind kind = data::detect_input_kind(path);
  const std::unique_ptr<data::ByteSource> src = data::open_byte_source(path, kind.compression);
  std::vector<JsonRecord> out;
  std::string buf, chunk(1 << 16, '\0');
  int64_t line = 0;
  bool eof = false;
  size_t pos = 0;
  while (limit <= 0 || static_cast<int64_t>(out.size()) < limit) {
    size_t nl = buf.find('\n', pos);
    while (nl == std::string::npos && !eof) {
      buf.erase(0, pos);
      pos = 0;
      const size_t n = src->read(chunk.data(), chunk.size());
      if (n == 0) eof = true;
      buf.append(chunk.data(), n);
      nl = buf.find('\n', pos);
    }
    if (nl == std::string::npos && pos >= buf.size()) break;
    const size_t end = nl == std::string::npos ? buf.size() : nl;
    std::string_view text(buf.data() + pos, end - pos);
    pos = end + 1;
    ++line;
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    if (text.find_first_not_of(" \t") == std::string_view::npos) continue;
    const std::string where = fmt::format("{}:{}", path, line);
    Json v = Json::parse(text, nullptr, false);
    DIFFMOE_CHECK(!v.is_discarded(), "{}: not a JSON object (one document per line)", where);
    DIFFMOE_CHECK(v.is_object(), "{}: expected a JSON object, got {}", where, v.type_name());
    out.push_back(JsonRecord{std::move(v), where});
  }
  return out;
}

namespace {

// The value under a dotted key ("choices.text"); null when absent.
const Json* lookup(const Json& doc, std::string_view key) {
  const Json* v = &doc;
  for (size_t pos = 0; pos <= key.size();) {
    const size_t dot = std::min(key.find('.', pos), key.size());
    const std::string part(key.substr(pos, dot - pos));
    if (!v->is_object() || !v->contains(part)) return nullptr;
    v = &(*v)[part];
    pos = dot + 1;
  }
  return v;
}

const Json& field(const JsonRecord& r, std::string_view key, std::string_view what) {
  const Json* v = lookup(r.value, key);
  DIFFMOE_CHECK(v != nullptr && !v->is_null(), "{}: field '{}': missing ({})", r.where, key, what);
  return *v;
}

std::string string_field(const JsonRecord& r, std::string_view key, std::string_view what) {
  const Json& v = field(r, key, what);
  DIFFMOE_CHECK(v.is_string(), "{}: field '{}': expected a string, got {}", r.where, key, v.dump());
  return v.get<std::string>();
}

std::vector<std::string> string_list(const JsonRecord& r, std::string_view key, std::string_view what) {
  const Json& v = field(r, key, what);
  DIFFMOE_CHECK(v.is_array() && !v.empty(), "{}: field '{}': expected a non-empty list of strings, got {}", r.where,
                key, v.dump());
  std::vector<std::string> out;
  for (const Json& e : v) {
    DIFFMOE_CHECK(e.is_string(), "{}: field '{}': expected a list of strings, got {}", r.where, key, v.dump());
    out.push_back(e.get<std::string>());
  }
  return out;
}

// An answer index given as a number or a digit string ("3").
int64_t index_field(const JsonRecord& r, std::string_view key, size_t n_choices) {
  const Json& v = field(r, key, "the answer's index");
  int64_t i = -1;
  const std::string digits = v.is_string() ? v.get<std::string>() : "";
  if (v.is_number_integer()) {
    i = v.get<int64_t>();
  } else if (!digits.empty() && digits.size() < 10 &&
             std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    i = std::stoll(digits);
  } else {
    DIFFMOE_FAIL("{}: field '{}': expected the answer's index (an integer), got {}", r.where, key, v.dump());
  }
  DIFFMOE_CHECK(i >= 0 && i < static_cast<int64_t>(n_choices),
                "{}: field '{}': answer {} is not one of the {} choices (0..{})", r.where, key, i, n_choices,
                n_choices - 1);
  return i;
}

// "{{key}}" -> the document's string under key (a number as JSON writes it).
std::string render(const JsonRecord& r, std::string_view tmpl) {
  std::string out;
  size_t pos = 0;
  while (pos < tmpl.size()) {
    const size_t open = tmpl.find("{{", pos);
    if (open == std::string_view::npos) break;
    const size_t close = tmpl.find("}}", open + 2);
    DIFFMOE_CHECK(close != std::string_view::npos, "doc_to_text: '{{{{' without '}}}}' in \"{}\"", tmpl);
    out.append(tmpl.substr(pos, open - pos));
    std::string_view key = tmpl.substr(open + 2, close - open - 2);
    while (!key.empty() && key.front() == ' ') key.remove_prefix(1);
    while (!key.empty() && key.back() == ' ') key.remove_suffix(1);
    const Json& v = field(r, key, "named in doc_to_text");
    DIFFMOE_CHECK(v.is_string() || v.is_number(),
                  "{}: field '{}': expected a string or a number (named in doc_to_text), got {}", r.where, key,
                  v.dump());
    out += v.is_string() ? v.get<std::string>() : v.dump();
    pos = close + 2;
  }
  out.append(tmpl.substr(pos));
  return out;
}

// Python's str.capitalize() on ASCII: the first character upper case, the rest lower case.
std::string capitalize(std::string s) {
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    s[i] = static_cast<char>(i == 0 ? std::toupper(c) : std::tolower(c));
  }
  return s;
}

McDoc hellaswag_doc(const JsonRecord& r) {
  McDoc d;
  d.where = r.where;
  // lm-eval builds the context from ctx_a and ctx_b (capitalised); files with only ctx use it as is.
  std::string ctx;
  if (lookup(r.value, "ctx_a") != nullptr && lookup(r.value, "ctx_b") != nullptr) {
    ctx = string_field(r, "ctx_a", "the context") + " " +
          capitalize(string_field(r, "ctx_b", "the context's second part"));
  } else {
    ctx = string_field(r, "ctx", "the context: ctx, or ctx_a and ctx_b");
  }
  const Json* label = lookup(r.value, "activity_label");
  if (label != nullptr && !label->is_null()) ctx = string_field(r, "activity_label", "the activity") + ": " + ctx;
  d.context = hellaswag_preprocess(ctx);
  for (const std::string& e : string_list(r, "endings", "the candidate endings"))
    d.choices.push_back(hellaswag_preprocess(e));
  d.gold = index_field(r, "label", d.choices.size());
  return d;
}

McDoc fields_doc(const TaskConfig& t, const JsonRecord& r) {
  McDoc d;
  d.where = r.where;
  d.context = render(r, t.doc_to_text);
  if (t.choices.size() == 1) {
    d.choices = string_list(r, t.choices[0], "the choices");
  } else {
    for (const std::string& key : t.choices) d.choices.push_back(string_field(r, key, "a choice"));
  }
  if (t.choice_labels.empty()) {
    d.gold = index_field(r, t.label, d.choices.size());
  } else {
    const std::vector<std::string> labels = string_list(r, t.choice_labels, "the choices' labels");
    DIFFMOE_CHECK(labels.size() == d.choices.size(), "{}: field '{}': {} labels for {} choices", r.where,
                  t.choice_labels, labels.size(), d.choices.size());
    const Json& ans = field(r, t.label, "the answer's label");
    const std::string a = ans.is_string() ? ans.get<std::string>() : ans.dump();
    const auto it = std::find(labels.begin(), labels.end(), a);
    DIFFMOE_CHECK(it != labels.end(), "{}: field '{}': answer '{}' is not one of the labels in '{}'", r.where, t.label,
                  a, t.choice_labels);
    d.gold = it - labels.begin();
  }
  return d;
}

}  // namespace

std::string hellaswag_preprocess(std::string_view text) {
  std::string s(text);
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  while (!s.empty() && space(s.back())) s.pop_back();
  size_t lead = 0;
  while (lead < s.size() && space(s[lead])) ++lead;
  s.erase(0, lead);
  std::string titled;  // str.replace(" [title]", ". ")
  for (size_t i = 0; i < s.size();) {
    if (s.compare(i, 8, " [title]") == 0) {
      titled += ". ";
      i += 8;
    } else {
      titled += s[i++];
    }
  }
  s = titled;
  std::string out;  // re.sub("\\[.*?\\]", "", s): '.' does not cross a newline
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '[') {
      const size_t close = s.find(']', i + 1);
      if (close != std::string::npos && s.find('\n', i + 1) > close) {
        i = close + 1;
        continue;
      }
    }
    out += s[i++];
  }
  std::string single;  // str.replace("  ", " "): one pass, left to right
  for (size_t i = 0; i < out.size(); ++i) {
    single += out[i];
    if (out[i] == ' ' && i + 1 < out.size() && out[i + 1] == ' ') ++i;
  }
  return single;
}

McDoc doc_from_record(const TaskConfig& task, const JsonRecord& record) {
  McDoc d = task.format == TaskFormat::kHellaswag ? hellaswag_doc(record) : fields_doc(task, record);
  for (size_t i = 0; i < d.choices.size(); ++i)
    DIFFMOE_CHECK(!d.choices[i].empty(), "{}: choice {} is empty (acc_norm divides by the choice's length)",
                  record.where, i);
  return d;
}

std::vector<McDoc> load_task_docs(const TaskConfig& task, int64_t limit) {
  DIFFMOE_CHECK(task.multiple_choice(), "{}: format text is a perplexity task, not multiple choice", task.source);
  std::vector<McDoc> docs;
  for (const JsonRecord& r : read_jsonl_records(task.file, limit)) docs.push_back(doc_from_record(task, r));
  DIFFMOE_CHECK(!docs.empty(), "{}: no documents", task.file);
  if (task.num_fewshot == 0) {
    for (McDoc& d : docs) d.context = task.description + d.context;
    return docs;
  }

  // Few-shot examples (task_config.h): from fewshot_file, or the task's own documents minus the one asked.
  const bool own = task.fewshot_file.empty() || task.fewshot_file == task.file;
  std::vector<McDoc> pool;
  if (own) {
    for (const JsonRecord& r : read_jsonl_records(task.file)) pool.push_back(doc_from_record(task, r));
  } else {
    for (const JsonRecord& r : read_jsonl_records(task.fewshot_file)) pool.push_back(doc_from_record(task, r));
  }
  const size_t k = static_cast<size_t>(task.num_fewshot);
  DIFFMOE_CHECK(pool.size() >= k + (own ? 1 : 0), "{}: num_fewshot: {} examples asked, {} has {} documents{}",
                task.source, k, own ? task.file : task.fewshot_file, pool.size(),
                own ? " (the document itself excluded)" : "");
  for (size_t d = 0; d < docs.size(); ++d) {
    std::vector<size_t> idx(pool.size());
    std::iota(idx.begin(), idx.end(), 0);
    if (own) idx.erase(idx.begin() + static_cast<std::ptrdiff_t>(d));
    std::string ctx = task.description;
    for (size_t j = 0; j < k; ++j) {  // partial Fisher-Yates: k draws without replacement
      const size_t pick = j + std::min(idx.size() - j - 1, static_cast<size_t>(uniform_at(task.fewshot_seed, d, j) *
                                                                               static_cast<double>(idx.size() - j)));
      std::swap(idx[j], idx[pick]);
      const McDoc& ex = pool[idx[j]];
      ctx += ex.context + task.target_delimiter + ex.choices[static_cast<size_t>(ex.gold)] + task.fewshot_delimiter;
    }
    docs[d].context = ctx + docs[d].context;
  }
  return docs;
}

}  // namespace diffmoe::eval
