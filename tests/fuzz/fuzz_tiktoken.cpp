// tiktoken rank files (data/tiktoken_tokenizer.h), with the GPT-2 split pattern and no special
// tokens (the file alone decides the vocabulary). A file that loads must round-trip any text.
#include "core/error.h"
#include "data/pretokenizer.h"
#include "data/tiktoken_tokenizer.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  diffmoe::data::TiktokenOptions options;
  options.pattern = std::string(diffmoe::data::patterns::kR50k);
  options.specials = std::vector<diffmoe::data::SpecialToken>{};
  std::unique_ptr<diffmoe::data::Tokenizer> tok;
  try {
    tok = diffmoe::data::load_tiktoken_from_string(diffmoe::fuzz::as_text(data, size), "fuzz.tiktoken", options);
  } catch (const diffmoe::Error&) {
    return 0;
  }
  for (const std::string_view text :
       {std::string_view("Hello, world! It's 2024 \xe2\x80\x94 caf\xc3\xa9 \xff\xfe \n\n  x"),
        diffmoe::fuzz::as_text(data, std::min<size_t>(size, 256))}) {
    const std::vector<int32_t> ids = tok->encode(text);
    for (int32_t id : ids)
      if (!tok->is_token(id)) diffmoe::fuzz::finding("encode returned an id that is not a token");
    if (tok->decode(ids) != text) diffmoe::fuzz::finding("decode(encode(x)) != x");
  }
  return 0;
}
