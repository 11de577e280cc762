// The chat template of `diffmoe serve` (docs/serving.md "Chat template"): how /v1/chat/completions
// turns messages into prompt tokens. Each message becomes
//     <|role|>\n{content}\n                      role: system, user
//     <|assistant|>\n{content}<|endoftext|>\n    an earlier assistant turn ends with the end-of-text token
// and the prompt ends with "<|assistant|>\n", where the model's answer starts. The markers are plain
// text (no special tokens of their own); every piece (marker, content, newline) is tokenized on its
// own with the ordinary encoder, so text inside a message can never produce a special token, and
// the end-of-text id is inserted as an id. A chat completion stops at the end-of-text token or at
// the start of a new turn marker (chat_stop_strings).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace diffmoe::serve {

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant"
  std::string content;
};

std::vector<int32_t> apply_chat_template(const std::vector<ChatMessage>& messages, const data::Tokenizer& tok);
// The text form of the template (with "<|endoftext|>" written out): for docs and tests.
std::string chat_template_text(const std::vector<ChatMessage>& messages);
// Stop strings every chat completion has besides the request's: the turn markers.
std::vector<std::string> chat_stop_strings();

}  // namespace diffmoe::serve
