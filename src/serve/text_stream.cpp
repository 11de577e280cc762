#include "serve/text_stream.h"

#include <algorithm>

namespace diffmoe::serve {

size_t complete_utf8_prefix(std::string_view s) {
  const size_t n = s.size();
  size_t i = n;
  for (int back = 0; back < 4 && i > 0; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte (or ASCII): is its sequence complete?
      const size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
      return n - (i - 1) >= need ? n : i - 1;
    }
    --i;
  }
  return n;  // four continuation bytes in a row: no lead byte can complete them
}

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (std::string& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
  for (const std::string& s : stops_) holdback_ = std::max(holdback_, s.size() - 1);
}

std::optional<size_t> StopMatcher::find(std::string_view text, size_t new_from) const {
  std::optional<size_t> best;
  for (const std::string& s : stops_) {
    // A match that ends after new_from starts at or after new_from − (|s| − 1).
    const size_t from = new_from >= s.size() - 1 ? new_from - (s.size() - 1) : 0;
    const size_t at = text.find(s, from);
    if (at != std::string_view::npos && (!best || at < *best)) best = at;
  }
  return best;
}

}  // namespace diffmoe::serve
