#include "serve/chat_template.h"

namespace diffmoe::serve {

namespace {

// The pieces of the template in order; `eos` marks where the end-of-text token goes.
struct Piece {
  std::string text;
  bool eos = false;
};

std::vector<Piece> pieces(const std::vector<ChatMessage>& messages) {
  std::vector<Piece> out;
  for (const ChatMessage& m : messages) {
    out.push_back({"<|" + m.role + "|>\n"});
    if (!m.content.empty()) out.push_back({m.content});
    if (m.role == "assistant") out.push_back({"", true});
    out.push_back({"\n"});
  }
  out.push_back({"<|assistant|>\n"});
  return out;
}

}  // namespace

std::vector<int32_t> apply_chat_template(const std::vector<ChatMessage>& messages, const data::Tokenizer& tok) {
  std::vector<int32_t> ids;
  for (const Piece& p : pieces(messages)) {
    if (p.eos) {
      if (tok.eos_id()) ids.push_back(*tok.eos_id());
      continue;
    }
    const std::vector<int32_t> part = tok.encode(p.text);
    ids.insert(ids.end(), part.begin(), part.end());
  }
  return ids;
}

std::string chat_template_text(const std::vector<ChatMessage>& messages) {
  std::string s;
  for (const Piece& p : pieces(messages)) s += p.eos ? "<|endoftext|>" : p.text;
  return s;
}

std::vector<std::string> chat_stop_strings() { return {"<|user|>", "<|system|>", "<|assistant|>"}; }

}  // namespace diffmoe::serve
