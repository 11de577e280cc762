// Text handling of a completion as it grows a token at a time: where a UTF-8 sequence is complete
// (a stream never sends half a character), and where the first stop string starts (generation ends
// before it; the stop string is not part of the text). Stop strings are searched in the decoded
// bytes, so one may span several tokens.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::serve {

// Length of the longest prefix of `s` that does not end inside a UTF-8 sequence (a broken sequence
// counts as complete once no continuation byte could follow).
size_t complete_utf8_prefix(std::string_view s);

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // The earliest start of a stop string in `text` among matches that end after byte `new_from` (the
  // bytes before it were searched already), or none.
  std::optional<size_t> find(std::string_view text, size_t new_from) const;
  // Bytes at the end of the text that may still become the start of a stop string: a stream holds
  // them back until more text decides (the longest stop string's length − 1).
  size_t holdback() const { return holdback_; }
  bool empty() const { return stops_.empty(); }

 private:
  std::vector<std::string> stops_;
  size_t holdback_ = 0;
};

}  // namespace diffmoe::serve
