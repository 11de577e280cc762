// YAML config files as JSON values (config_file.h).
//
// yaml-cpp does the parsing; we convert its node tree to nlohmann::ordered_json ourselves because
// yaml-cpp keeps scalars untyped. Plain scalars are typed with the YAML 1.2 core schema (null,
// bool, int, float); quoted and block scalars (yaml-cpp tag "!") are always strings. yaml-cpp also
// accepts duplicate mapping keys silently, so the conversion rejects them with the key's line.
//
// to_yaml is our own small block-style emitter rather than YAML::Emitter: round-tripping exactly
// needs control over which strings get quoted (any string the core schema would read as something
// else) and over how doubles are printed (shortest round-trip form, always with '.' or exponent).
#include "io/config_file.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>

#include "core/error.h"
#include "io/file_util.h"

namespace diffmoe {

namespace {

using Json = nlohmann::ordered_json;

// What a plain (unquoted) scalar means under the YAML 1.2 core schema.
enum class PlainKind { kNull, kBool, kDecimalInt, kHexInt, kOctalInt, kFloat, kString };

bool all_of_digits(std::string_view s, bool (*is_digit)(char)) {
  if (s.empty()) return false;
  for (char c : s)
    if (!is_digit(c)) return false;
  return true;
}
bool is_dec(char c) { return c >= '0' && c <= '9'; }
bool is_hex(char c) { return is_dec(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
bool is_oct(char c) { return c >= '0' && c <= '7'; }

std::string_view strip_sign(std::string_view s) { return !s.empty() && (s[0] == '+' || s[0] == '-') ? s.substr(1) : s; }

bool is_inf_text(std::string_view s) { return s == ".inf" || s == ".Inf" || s == ".INF"; }
bool is_nan_text(std::string_view s) { return s == ".nan" || s == ".NaN" || s == ".NAN"; }

// Core schema float: [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
bool is_float_text(std::string_view s) {
  s = strip_sign(s);
  const size_t e = s.find_first_of("eE");
  const std::string_view mantissa = s.substr(0, e);
  if (e != std::string_view::npos && !all_of_digits(strip_sign(s.substr(e + 1)), is_dec)) return false;
  const size_t dot = mantissa.find('.');
  if (dot == std::string_view::npos) return all_of_digits(mantissa, is_dec);
  const std::string_view whole = mantissa.substr(0, dot), frac = mantissa.substr(dot + 1);
  if (whole.empty()) return all_of_digits(frac, is_dec);
  return all_of_digits(whole, is_dec) && (frac.empty() || all_of_digits(frac, is_dec));
}

// The decimal order of magnitude of a core-schema float text (is_float_text): the power of ten of
// its first non-zero digit ("123.4" 2, "0.05" -2, "1e-400" -400), saturating; 0 for a zero.
// Tells an overflow from an underflow when from_chars reports neither value.
int64_t decimal_order(std::string_view s) {
  s = strip_sign(s);
  const size_t e = s.find_first_of("eE");
  int64_t exponent = 0;
  if (e != std::string_view::npos) {
    std::string_view digits = s.substr(e + 1);
    const bool negative = !digits.empty() && digits[0] == '-';
    digits = strip_sign(digits);
    for (const char c : digits) exponent = std::min<int64_t>(exponent * 10 + (c - '0'), int64_t{1} << 40);
    if (negative) exponent = -exponent;
  }
  const std::string_view mantissa = s.substr(0, e);
  const size_t dot = std::min(mantissa.find('.'), mantissa.size());
  for (size_t i = 0; i < mantissa.size(); ++i) {
    if (mantissa[i] == '.' || mantissa[i] == '0') continue;
    return exponent + (i < dot ? static_cast<int64_t>(dot - i - 1) : -static_cast<int64_t>(i - dot));
  }
  return 0;
}

PlainKind classify_plain(std::string_view s) {
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return PlainKind::kNull;
  if (s == "true" || s == "True" || s == "TRUE" || s == "false" || s == "False" || s == "FALSE")
    return PlainKind::kBool;
  if (all_of_digits(strip_sign(s), is_dec)) return PlainKind::kDecimalInt;
  if (s.starts_with("0x") && all_of_digits(s.substr(2), is_hex)) return PlainKind::kHexInt;
  if (s.starts_with("0o") && all_of_digits(s.substr(2), is_oct)) return PlainKind::kOctalInt;
  if (is_inf_text(strip_sign(s)) || is_nan_text(s) || is_float_text(s)) return PlainKind::kFloat;
  return PlainKind::kString;
}

// Whether `s` is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
// YAML text is Unicode; yaml-cpp passes other bytes through, and nlohmann's dump() (every error
// message that quotes a value) throws on them, so they stop at the parser.
bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    for (size_t k = 1; k <= n; ++k) {
      if (i + k >= s.size()) return false;
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static constexpr uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

// "source:line:col: " for a yaml-cpp mark (0-based, or -1 when unknown).
std::string location(std::string_view source, const YAML::Mark& mark) {
  if (mark.is_null() || mark.line < 0) return fmt::format("{}: ", source);
  return fmt::format("{}:{}:{}: ", source, mark.line + 1, mark.column + 1);
}

// The typed value of a plain scalar; `where` prefixes errors (out-of-range integers).
Json resolve_plain(const std::string& s, const std::string& where) {
  switch (classify_plain(s)) {
    case PlainKind::kNull: return nullptr;
    case PlainKind::kBool: return s[0] == 't' || s[0] == 'T';
    case PlainKind::kDecimalInt:
    case PlainKind::kHexInt:
    case PlainKind::kOctalInt: {
      const PlainKind kind = classify_plain(s);
      const int base = kind == PlainKind::kHexInt ? 16 : kind == PlainKind::kOctalInt ? 8 : 10;
      std::string_view digits = kind == PlainKind::kDecimalInt ? std::string_view(s) : std::string_view(s).substr(2);
      if (!digits.empty() && digits[0] == '+') digits.remove_prefix(1);  // from_chars takes '-' only
      int64_t v = 0;
      const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v, base);
      DIFFMOE_CHECK(ec == std::errc() && end == digits.data() + digits.size(), "{}integer '{}' does not fit in 64 bits",
                    where, s);
      return v;
    }
    case PlainKind::kFloat: {
      const std::string_view body = strip_sign(s);
      const bool negative = s[0] == '-';
      if (is_nan_text(s)) return std::numeric_limits<double>::quiet_NaN();
      if (is_inf_text(body)) return negative ? -HUGE_VAL : HUGE_VAL;
      double v = 0;
      // from_chars rejects a leading '+', and is locale-independent unlike strtod.
      const std::string_view text = s[0] == '+' ? std::string_view(s).substr(1) : std::string_view(s);
      const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
      // Out of range: too large (1e999) becomes ±inf, the usual YAML/JSON reading; too small
      // (1e-400) becomes ±0, never inf.
      if (ec == std::errc::result_out_of_range) {
        const double huge = decimal_order(text) >= 0 ? HUGE_VAL : 0.0;
        return negative ? -huge : huge;
      }
      DIFFMOE_CHECK(ec == std::errc() && end == text.data() + text.size(), "{}cannot read '{}' as a float", where, s);
      return v;
    }
    case PlainKind::kString: break;
  }
  return s;
}

// The value of a scalar node: quoted/block scalars (tag "!") and !!str are strings; plain scalars
// are typed by resolve_plain; the other core tags must agree with what the text is.
Json convert_scalar(const YAML::Node& node, std::string_view source) {
  const std::string& tag = node.Tag();
  const std::string& text = node.Scalar();
  const std::string where = location(source, node.Mark());
  DIFFMOE_CHECK(valid_utf8(text), "{}a scalar is not valid UTF-8", where);
  if (tag == "!" || tag == "tag:yaml.org,2002:str") return text;
  if (tag == "?" || tag.empty()) return resolve_plain(text, where);

  static const std::map<std::string, PlainKind> kCoreTags = {
      {"tag:yaml.org,2002:null", PlainKind::kNull},
      {"tag:yaml.org,2002:bool", PlainKind::kBool},
      {"tag:yaml.org,2002:int", PlainKind::kDecimalInt},
      {"tag:yaml.org,2002:float", PlainKind::kFloat},
  };
  const auto it = kCoreTags.find(tag);
  DIFFMOE_CHECK(it != kCoreTags.end(), "{}unsupported tag '{}'", where, tag);
  PlainKind kind = classify_plain(text);
  if (kind == PlainKind::kHexInt || kind == PlainKind::kOctalInt) kind = PlainKind::kDecimalInt;
  if (it->second == PlainKind::kFloat && kind == PlainKind::kDecimalInt) {
    return static_cast<double>(resolve_plain(text, where).get<int64_t>());  // "!!float 3" is 3.0
  }
  DIFFMOE_CHECK(kind == it->second, "{}'{}' is not a valid {}", where, text, tag);
  return resolve_plain(text, where);
}

// Bounds on the converted tree. yaml-cpp resolves aliases to shared nodes, so an alias inside its own
// anchor ("a: &x {b: *x}") is a cycle and fanned-out aliases ("billion laughs") expand
// exponentially; both stop here instead of overflowing the stack or exhausting memory.
constexpr int kMaxDepth = 64;
constexpr int64_t kMaxNodes = 1'000'000;

struct ConvertState {
  std::string_view source;
  int64_t nodes = 0;  // converted so far, aliases counted at every use
};

Json convert_node(const YAML::Node& node, ConvertState& state, int depth) {
  DIFFMOE_CHECK(depth <= kMaxDepth && ++state.nodes <= kMaxNodes, "{}nesting too deep or a recursive alias",
                location(state.source, node.Mark()));
  const std::string_view source = state.source;
  switch (node.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null: return nullptr;
    case YAML::NodeType::Scalar: return convert_scalar(node, source);
    case YAML::NodeType::Sequence: {
      Json out = Json::array();
      for (const auto& item : node) out.push_back(convert_node(item, state, depth + 1));
      return out;
    }
    case YAML::NodeType::Map: {
      Json out = Json::object();
      std::map<std::string, YAML::Mark> seen;  // key -> where it was first defined
      for (const auto& kv : node) {
        const YAML::Node& key = kv.first;
        DIFFMOE_CHECK(key.IsScalar() || key.IsNull(), "{}mapping keys must be scalars", location(source, key.Mark()));
        const std::string name = key.IsScalar() ? key.Scalar() : std::string();
        DIFFMOE_CHECK(valid_utf8(name), "{}a mapping key is not valid UTF-8", location(source, key.Mark()));
        const auto [it, inserted] = seen.emplace(name, key.Mark());
        DIFFMOE_CHECK(inserted, "{}duplicate key '{}' (first defined at line {})", location(source, key.Mark()), name,
                      it->second.line + 1);
        out[name] = convert_node(kv.second, state, depth + 1);
      }
      return out;
    }
  }
  return nullptr;
}

// The events of a parse, dropped: for counting documents (parse_yaml).
class IgnoreEvents final : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark&) override {}
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
};

// ---- emitter ----

// U+FEFF in UTF-8. At the start of a stream (or of a document) a YAML reader takes it for a byte-order
// mark and drops it, so the emitter never writes it as it is: plain scalars holding it are quoted and
// quoted ones escape it.
constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";

// A string may be written plain only if reading it back yields the same string: it must not look
// like null/bool/number, must not start with an indicator, and must not contain ": " or " #",
// line breaks or control characters. Everything else is double-quoted. (UTF-8 text stays plain.)
bool can_be_plain(const std::string& s) {
  if (s.empty() || classify_plain(s) != PlainKind::kString) return false;
  if (std::string_view("-?:,[]{}#&*!|>'\"%@` ").find(s.front()) != std::string_view::npos) return false;
  if (s.back() == ' ' || s.back() == ':') return false;
  if (s.starts_with("...")) return false;  // "..." at the start of a line ends a YAML document
  if (s.find(": ") != std::string::npos || s.find(" #") != std::string::npos) return false;
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return false;
  if (s.find(kUtf8Bom) != std::string::npos) return false;  // a reader may drop it as a byte-order mark
  return true;
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (std::string_view(s).substr(i).starts_with(kUtf8Bom)) {
      out += "\\uFEFF";
      i += kUtf8Bom.size() - 1;
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          out += fmt::format("\\x{:02X}", c);
        } else {
          out += static_cast<char>(c);  // UTF-8 bytes pass through unchanged
        }
    }
  }
  return out + "\"";
}

std::string string_scalar(const std::string& s) { return can_be_plain(s) ? s : quote(s); }

// Shortest text that reads back as exactly this double, and as a double (not an int).
std::string double_scalar(double d) {
  if (std::isnan(d)) return ".nan";
  if (std::isinf(d)) return d > 0 ? ".inf" : "-.inf";
  std::string s = fmt::format("{}", d);  // fmt prints the shortest round-trip representation
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

std::string scalar_text(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case Json::value_t::number_integer: return std::to_string(v.get<int64_t>());
    case Json::value_t::number_unsigned: return std::to_string(v.get<uint64_t>());
    case Json::value_t::number_float: return double_scalar(v.get<double>());
    case Json::value_t::string: return string_scalar(v.get<std::string>());
    case Json::value_t::object: return "{}";  // only reached for empty containers
    case Json::value_t::array: return "[]";
    default: DIFFMOE_FAIL("[yaml] cannot write a JSON {} as YAML", v.type_name());
  }
}

bool is_block(const Json& v) { return (v.is_object() || v.is_array()) && !v.empty(); }

void emit_block(std::string& out, const Json& v, int indent, bool first_line_indented);

// YAML 1.2 §7.4.2 limits an implicit key ("key: value") to 1024 characters, and readers enforce it
// (yaml-cpp: "illegal map value"); a longer key is written in the explicit form. Bytes count here,
// never fewer than characters.
constexpr size_t kMaxImplicitKey = 1024;

// After "key:" or "-": a scalar goes on the same line, a non-empty container below it
// (a mapping/sequence item inside a sequence starts on the "- " line, the compact form).
void emit_child(std::string& out, const Json& v, int indent, bool in_sequence) {
  if (!is_block(v)) {
    out += ' ';
    out += scalar_text(v);
    out += '\n';
  } else if (in_sequence) {
    out += " ";
    emit_block(out, v, indent, false);
  } else {
    out += "\n";
    emit_block(out, v, indent, true);
  }
}

void emit_block(std::string& out, const Json& v, int indent, bool first_line_indented) {
  const std::string pad(static_cast<size_t>(indent), ' ');
  bool first = true;
  if (v.is_object()) {
    for (const auto& [key, value] : v.items()) {
      if (!first || first_line_indented) out += pad;
      const std::string k = string_scalar(key);
      if (k.size() <= kMaxImplicitKey) {
        out += k + ":";
      } else {  // the explicit form "? key" / ": value", which has no length limit
        out += "? " + k + "\n" + pad + ":";
      }
      emit_child(out, value, indent + 2, false);
      first = false;
    }
  } else {
    for (const auto& item : v) {
      if (!first || first_line_indented) out += pad;
      out += "-";
      emit_child(out, item, indent + 2, true);
      first = false;
    }
  }
}

}  // namespace

nlohmann::ordered_json parse_yaml(std::string_view text, std::string_view source) {
  std::vector<YAML::Node> docs;
  try {
    // yaml-cpp 0.7's LoadAll never returns on a document that starts with ',': the parser reports
    // an empty document without consuming the token, again and again, and the list grows until
    // memory runs out. So the documents are counted first, by a loop that stops at the second.
    std::istringstream in{std::string(text)};
    YAML::Parser parser(in);
    IgnoreEvents ignore;
    for (int n = 0; parser.HandleNextDocument(ignore);)
      DIFFMOE_CHECK(++n <= 1, "{}: expected one YAML document, found more (or a document starting with ',')", source);
    docs = YAML::LoadAll(std::string(text));
  } catch (const YAML::Exception& e) {
    DIFFMOE_FAIL("{}{}", location(source, e.mark), e.msg);
  }
  DIFFMOE_CHECK(docs.size() <= 1, "{}: expected one YAML document, found {}", source, docs.size());
  ConvertState state{.source = source};
  return docs.empty() ? Json() : convert_node(docs[0], state, 0);
}

nlohmann::ordered_json load_yaml_file(const std::string& path) {
  return parse_yaml(io::read_small_file(path, io::kMaxConfigBytes, "config file"), path);
}

std::string to_yaml(const nlohmann::ordered_json& value) {
  if (!is_block(value)) return scalar_text(value) + "\n";
  std::string out;
  emit_block(out, value, 0, true);
  return out;
}

void apply_override(nlohmann::ordered_json& config, std::string_view assignment, bool allow_new) {
  const size_t eq = assignment.find('=');
  DIFFMOE_CHECK(eq != std::string_view::npos, "override '{}' must look like key.path=value", assignment);
  const std::string key(assignment.substr(0, eq));
  const std::string_view raw = assignment.substr(eq + 1);
  DIFFMOE_CHECK(raw.find_first_not_of(" \t") != std::string_view::npos,
                "override '{}': no value after '=' (to use the default, leave the key out)", assignment);

  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    const size_t dot = key.find('.', start);
    parts.push_back(key.substr(start, dot - start));
    DIFFMOE_CHECK(!parts.back().empty(), "override '{}': empty component in key '{}'", assignment, key);
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  Json value = parse_yaml(assignment.substr(eq + 1), fmt::format("override '{}'", assignment));

  if (config.is_null() && allow_new) config = Json::object();
  Json* node = &config;
  std::string walked;  // the dotted path of `node`, for messages
  for (size_t i = 0; i < parts.size(); ++i) {
    DIFFMOE_CHECK(node->is_object(), "override '{}': config key '{}' is a {}, not a section", assignment,
                  walked.empty() ? "<root>" : walked, node->type_name());
    if (!walked.empty()) walked += '.';
    walked += parts[i];
    const bool last = i + 1 == parts.size();
    if (!node->contains(parts[i])) {
      DIFFMOE_CHECK(allow_new, "unknown config key '{}'{}", key,
                    last ? std::string() : fmt::format(" (no '{}')", walked));
      (*node)[parts[i]] = last ? Json() : Json::object();
    }
    node = &(*node)[parts[i]];
  }
  // "lr=1" on a float key stays a float, so a config's types don't depend on how it was typed.
  if (node->is_number_float() && value.is_number_integer()) value = static_cast<double>(value.get<int64_t>());
  *node = std::move(value);
}

}  // namespace diffmoe
