// HF tokenizer.json and diffmoe tokenizer files (data/hf_tokenizer.h). A tokenizer that loads must
// keep the interface's promise: decode(encode(x)) == x for any x, also invalid UTF-8 and special
// token text (except where the file asks for ByteLevel add_prefix_space, which inserts spaces by
// design: tokenizer.h), and every id it returns is a token.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/hf_tokenizer.h"
#include "fuzz_util.h"

namespace {
// Whether any object of the document sets "add_prefix_space": true.
bool adds_prefix_space(const nlohmann::json& j) {
  if (j.is_object()) {
    if (j.contains("add_prefix_space") && j["add_prefix_space"] == true) return true;
    for (const auto& [k, v] : j.items())
      if (adds_prefix_space(v)) return true;
  } else if (j.is_array()) {
    for (const auto& v : j)
      if (adds_prefix_space(v)) return true;
  }
  return false;
}

void check_round_trip(const diffmoe::data::Tokenizer& tok, std::string_view text, bool exact) {
  for (const bool special : {false, true}) {
    const std::vector<int32_t> ids = special ? tok.encode_with_special(text) : tok.encode(text);
    for (int32_t id : ids)
      if (!tok.is_token(id)) diffmoe::fuzz::finding("encode returned an id that is not a token");
    const std::string back = tok.decode(ids);
    if (exact && back != text) diffmoe::fuzz::finding("decode(encode(x)) != x");
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<diffmoe::data::Tokenizer> tok;
  try {
    tok = diffmoe::data::load_hf_tokenizer_from_string(diffmoe::fuzz::as_text(data, size), "fuzz/tokenizer.json");
  } catch (const diffmoe::Error&) {
    return 0;
  }
  const std::string_view text = diffmoe::fuzz::as_text(data, size);
  const bool exact =
      !adds_prefix_space(nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false));
  check_round_trip(*tok, "Hello, world! It's 2024 \xe2\x80\x94 caf\xc3\xa9 \xff\xfe <|endoftext|> \n\n  x", exact);
  // The file's own bytes, as text (whatever they are).
  check_round_trip(*tok, text.substr(0, 256), exact);
  return 0;
}
