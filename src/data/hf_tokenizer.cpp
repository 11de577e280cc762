// HF byte-level BPE tokenizer.json loader and encoder (see hf_tokenizer.h, docs/formats.md §1c).
#include "data/hf_tokenizer.h"

#include <nlohmann/json.hpp>
#include <unordered_set>

#include "core/error.h"
#include "data/bpe.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_base.h"
#include "io/file_util.h"

namespace diffmoe::data {
namespace {

using nlohmann::json;

struct PreStep {
  std::unique_ptr<Pretokenizer> regex;  // split into matches and the gaps between them
  bool prefix_space = false;            // ByteLevel add_prefix_space: prepend ' ' unless present
};

std::string type_of(const json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "";
}

bool flag(const json& j, const char* key, bool fallback) {
  return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : fallback;
}

// Escapes a literal for PCRE2 (Split with {"String": ...}).
std::string quote_regex(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

class HfTokenizer final : public TokenizerBase {
 public:
  HfTokenizer(const json& j, std::string_view origin, std::optional<std::string> eos_hint)
      : TokenizerBase(default_name(j, origin),
                      j.contains("diffmoe") ? TokenizerKind::kDiffmoe : TokenizerKind::kHuggingFace),
        origin_(origin) {
    check_unsupported(j);
    bool saw_byte_level = false;
    if (j.contains("pre_tokenizer")) parse_pre(j["pre_tokenizer"], "pre_tokenizer", saw_byte_level);
    if (!saw_byte_level) fail("pre_tokenizer", "has no ByteLevel step; only byte-level BPE is supported");
    parse_model(j["model"], j.contains("added_tokens") ? j["added_tokens"] : json::array());
    set_eos(find_eos(eos_hint));
  }

 protected:
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const override {
    for_each_utf8_run(text, [&](std::string_view run, bool valid) {
      if (valid) apply(0, run, out);
      else encode_piece(run, out);  // invalid UTF-8: one piece of its own (tokenizer.h)
    });
  }

 private:
  [[noreturn]] void fail(std::string_view field, std::string_view what) const {
    DIFFMOE_FAIL("[hf_tokenizer] '{}': {} {}", origin_, field, what);
  }

  static std::string default_name(const json& j, std::string_view origin) {
    if (j.contains("diffmoe") && j["diffmoe"].is_object() && j["diffmoe"].contains("name") &&
        j["diffmoe"]["name"].is_string())
      return j["diffmoe"]["name"].get<std::string>();
    const std::filesystem::path p(origin);
    if (p.filename() == "tokenizer.json" && p.has_parent_path() && !p.parent_path().filename().empty())
      return p.parent_path().filename().string();
    return p.stem().string();
  }

  void check_unsupported(const json& j) const {
    if (j.contains("normalizer") && !j["normalizer"].is_null())
      fail("normalizer",
           fmt::format("'{}' is not supported (only null, for byte-level BPE)", type_of(j["normalizer"])));
    const json& m = j["model"];
    const std::string t = type_of(m);
    if (!(t == "BPE" || (t.empty() && m.contains("merges"))))
      fail("model.type", fmt::format("'{}' is not supported (only byte-level BPE)", t));
    if (m.contains("dropout") && !m["dropout"].is_null() &&
        !(m["dropout"].is_number() && m["dropout"].get<double>() == 0))
      fail("model.dropout", "is not supported (BPE dropout is random)");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !(m[k].is_string() && m[k].get<std::string>().empty()))
        fail(fmt::format("model.{}", k), "is not supported (byte-level BPE has none)");
    if (flag(m, "byte_fallback", false)) fail("model.byte_fallback", "is not supported (SentencePiece-style model)");
    if (j.contains("decoder") && !j["decoder"].is_null() && type_of(j["decoder"]) != "ByteLevel")
      fail("decoder", fmt::format("'{}' is not supported (only ByteLevel)", type_of(j["decoder"])));
  }

  void parse_pre(const json& p, const std::string& field, bool& saw_byte_level) {
    if (p.is_null()) return;
    const std::string t = type_of(p);
    if (t == "Sequence") {
      if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) fail(field, "Sequence without pretokenizers");
      for (size_t i = 0; i < p["pretokenizers"].size(); ++i)
        parse_pre(p["pretokenizers"][i], fmt::format("{}.pretokenizers[{}]", field, i), saw_byte_level);
    } else if (t == "ByteLevel") {
      saw_byte_level = true;
      if (flag(p, "add_prefix_space", false)) steps_.push_back({nullptr, true});
      if (flag(p, "use_regex", true)) steps_.push_back({std::make_unique<Pretokenizer>(patterns::kGpt2Legacy), false});
    } else if (t == "Split") {
      const json& pat = p.contains("pattern") ? p["pattern"] : json();
      std::string regex;
      if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) regex = pat["Regex"].get<std::string>();
      else if (pat.is_object() && pat.contains("String") && pat["String"].is_string())
        regex = quote_regex(pat["String"].get<std::string>());
      else fail(field + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
      const std::string behavior =
          p.contains("behavior") && p["behavior"].is_string() ? p["behavior"].get<std::string>() : "";
      const bool invert = flag(p, "invert", false);
      // Both supported forms keep every match as a piece; gaps between matches (none for the
      // GPT-2/cl100k/o200k patterns, which match every character) are kept too so that the round
      // trip stays exact (tokenizer.h).
      if (!((behavior == "Isolated" && !invert) || (behavior == "Removed" && invert)))
        fail(field + ".behavior", fmt::format("'{}' with invert={} is not supported (only Isolated, or Removed with "
                                              "invert=true)",
                                              behavior, invert));
      try {
        steps_.push_back({std::make_unique<Pretokenizer>(regex), false});
      } catch (const Error& e) {
        fail(field + ".pattern", e.what());
      }
    } else {
      fail(field, fmt::format("type '{}' is not supported (only Sequence, Split, ByteLevel)", t));
    }
  }

  void parse_model(const json& m, const json& added) {
    if (!added.is_array()) fail("added_tokens", "must be an array");
    std::vector<AtomicToken> atomic;
    std::unordered_set<int32_t> added_ids;
    for (size_t i = 0; i < added.size(); ++i) {
      const json& a = added[i];
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
          !a["content"].is_string())
        fail(fmt::format("added_tokens[{}]", i), "needs integer \"id\" and string \"content\"");
      if (a["id"].get<int64_t>() < 0 || a["id"].get<int64_t>() >= kMaxTokenizerVocab)
        fail(fmt::format("added_tokens[{}].id", i),
             fmt::format("{} is outside [0, {})", a["id"].dump(), kMaxTokenizerVocab));
      atomic.push_back({a["content"].get<std::string>(), a["id"].get<int32_t>(), flag(a, "special", false),
                        flag(a, "lstrip", false), flag(a, "rstrip", false), flag(a, "single_word", false)});
      added_ids.insert(atomic.back().id);
    }
    if (!m.contains("vocab") || !m["vocab"].is_object()) fail("model.vocab", "must be an object {token: id}");
    const json& vocab = m["vocab"];
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (!it.value().is_number_integer()) fail("model.vocab", fmt::format("id of '{}' is not an integer", it.key()));
      if (it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= kMaxTokenizerVocab)
        fail("model.vocab",
             fmt::format("id {} of '{}' is outside [0, {})", it.value().dump(), it.key(), kMaxTokenizerVocab));
      const int32_t id = it.value().get<int32_t>();
      if (added_ids.count(id)) continue;  // its bytes are the added token's content
      const auto bytes = byte_level_decode(it.key());
      if (!bytes) fail("model.vocab", fmt::format("token '{}' is not in the GPT-2 byte-level alphabet", it.key()));
      if (!vocab_bytes_.insert(*bytes, id)) fail("model.vocab", fmt::format("token '{}' appears twice", it.key()));
      set_token(id, *bytes);
    }
    byte_ids_.fill(-1);
    for (int b = 0; b < 256; ++b) byte_ids_[b] = vocab_bytes_.find(std::string(1, static_cast<char>(b)));
    for (int b = 0; b < 256; ++b)
      if (byte_ids_[b] < 0) fail("model.vocab", fmt::format("has no token for byte 0x{:02x}", b));

    if (!m.contains("merges") || !m["merges"].is_array()) fail("model.merges", "must be an array");
    const json& merges = m["merges"];
    auto id_of = [&](const std::string& s, size_t i) {
      auto it = vocab.find(s);
      if (it == vocab.end()) fail(fmt::format("model.merges[{}]", i), fmt::format("'{}' is not in model.vocab", s));
      return it->get<int32_t>();
    };
    for (size_t i = 0; i < merges.size(); ++i) {
      std::string a, b;
      const json& e = merges[i];
      if (e.is_string()) {  // legacy "a b": byte-level tokens contain no literal space
        const std::string s = e.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail(fmt::format("model.merges[{}]", i), fmt::format("'{}' is not \"a b\"", s));
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      } else {
        fail(fmt::format("model.merges[{}]", i), "must be \"a b\" or [\"a\", \"b\"]");
      }
      // A duplicated pair keeps its first (lowest) rank.
      merges_.insert(id_of(a, i), id_of(b, i), {static_cast<int32_t>(i), id_of(a + b, i)});
    }
    ignore_merges_ = flag(m, "ignore_merges", false);
    set_atomic_tokens(std::move(atomic));
  }

  std::optional<int32_t> find_eos(const std::optional<std::string>& hint) const {
    if (hint) {
      if (auto id = special_id(*hint)) return id;
      const int32_t id = vocab_bytes_.find(*hint);
      if (id >= 0) return id;
    }
    for (const char* name : {"<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"})
      if (auto id = special_id(name)) return id;
    return std::nullopt;
  }

  // Applies pre-tokenizer steps [step, end) to `piece`, then BPE.
  void apply(size_t step, std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.empty()) return;
    if (step == steps_.size()) return encode_piece(piece, out);
    const PreStep& s = steps_[step];
    if (s.prefix_space) {
      if (piece.front() == ' ') return apply(step + 1, piece, out);
      std::string spaced;
      spaced.reserve(piece.size() + 1);
      spaced.push_back(' ');
      spaced.append(piece);
      return apply(step + 1, spaced, out);
    }
    Pretokenizer::Matches m(*s.regex, piece);
    size_t b = 0, e = 0, last = 0;
    while (m.next(&b, &e)) {
      if (b > last) apply(step + 1, piece.substr(last, b - last), out);
      apply(step + 1, piece.substr(b, e - b), out);
      last = e;
    }
    if (last < piece.size()) apply(step + 1, piece.substr(last), out);
  }

  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
    if (ignore_merges_) {  // docs/formats.md §1c: a pre-token that is in the vocab is emitted directly
      const int32_t id = vocab_bytes_.find(piece);
      if (id >= 0) return out.push_back(id);
    }
    bpe_merge_by_pairs(piece, byte_ids_, merges_, out);
  }

  std::string origin_;
  std::vector<PreStep> steps_;
  BytesMap vocab_bytes_;
  std::array<int32_t, 256> byte_ids_{};
  PairMap merges_;
  bool ignore_merges_ = false;
};

std::optional<std::string> read_eos_hint(const std::filesystem::path& config) {
  std::error_code ec;
  if (!std::filesystem::exists(config, ec)) return std::nullopt;
  const json c = json::parse(io::read_small_file(config.string(), io::kMaxConfigBytes, "tokenizer config"), nullptr,
                             /*allow_exceptions=*/false);
  if (!c.is_object() || !c.contains("eos_token")) return std::nullopt;
  const json& e = c["eos_token"];
  if (e.is_string()) return e.get<std::string>();
  if (e.is_object() && e.contains("content") && e["content"].is_string()) return e["content"].get<std::string>();
  return std::nullopt;
}

std::unique_ptr<Tokenizer> load_from_json(std::string_view text, std::string_view origin,
                                          std::optional<std::string> eos_hint) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  DIFFMOE_CHECK(!j.is_discarded(), "[hf_tokenizer] '{}' is not valid JSON", origin);
  DIFFMOE_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(),
                "[hf_tokenizer] '{}' is JSON but not a tokenizer (no \"model\" object; expected an HF "
                "tokenizer.json or a diffmoe tokenizer)",
                origin);
  try {
    return std::make_unique<HfTokenizer>(j, origin, std::move(eos_hint));
  } catch (const Error& e) {  // the shared vocabulary checks name the tokenizer, not the file
    if (std::string_view(e.what()).find(origin) != std::string_view::npos) throw;
    throw Error(fmt::format("[hf_tokenizer] '{}': {}", origin, e.what()), e.location());
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& path) {
  return load_from_json(io::read_small_file(path.string(), io::kMaxTokenizerBytes, "tokenizer file"), path.string(),
                        read_hf_eos_hint(path));
}

std::unique_ptr<Tokenizer> load_hf_tokenizer_from_string(std::string_view json_text, std::string_view origin,
                                                         std::optional<std::string> eos_hint) {
  return load_from_json(json_text, origin, std::move(eos_hint));
}

std::optional<std::string> read_hf_eos_hint(const std::filesystem::path& tokenizer_path) {
  return read_eos_hint(tokenizer_path.parent_path() / "tokenizer_config.json");
}

}  // namespace diffmoe::data
