// tiktoken rank-file tokenizer (docs/formats.md §1c "tiktoken rank files", "Encode algorithm").
#include "data/tiktoken_tokenizer.h"

#include <charconv>

#include "core/error.h"
#include "data/bpe.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_base.h"
#include "io/file_util.h"

namespace diffmoe::data {

std::optional<TiktokenPreset> tiktoken_preset(std::string_view name) {
  // Special token ids: docs/formats.md §1c "Special tokens"; rank counts: §1c "Official hashes"
  // (cl100k 100,256 lines, o200k 199,998) and the r50k/p50k files.
  if (name == "gpt2" || name == "r50k_base")
    return TiktokenPreset{std::string(name), patterns::kR50k, {{"<|endoftext|>", 50256}}, 50256};
  if (name == "p50k_base") return TiktokenPreset{std::string(name), patterns::kR50k, {{"<|endoftext|>", 50256}}, 50280};
  if (name == "cl100k_base")
    return TiktokenPreset{std::string(name),
                          patterns::kCl100k,
                          {{"<|endoftext|>", 100257},
                           {"<|fim_prefix|>", 100258},
                           {"<|fim_middle|>", 100259},
                           {"<|fim_suffix|>", 100260},
                           {"<|endofprompt|>", 100276}},
                          100256};
  if (name == "o200k_base")
    return TiktokenPreset{
        std::string(name), patterns::kO200k, {{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}}, 199998};
  return std::nullopt;
}

namespace {

// Standard base64 (RFC 4648 with padding), as written by tiktoken's dump_tiktoken_bpe.
bool base64_decode(std::string_view in, std::string& out) {
  static const auto table = [] {
    std::array<int8_t, 256> t{};
    t.fill(-1);
    const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(alphabet[i])] = static_cast<int8_t>(i);
    return t;
  }();
  out.clear();
  if (in.empty() || in.size() % 4 != 0) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = in[i + k];
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
      } else {
        if (pad > 0) return false;  // data after padding
        v[k] = table[static_cast<unsigned char>(c)];
        if (v[k] < 0) return false;
      }
    }
    const uint32_t w = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) | (uint32_t(v[2]) << 6) | uint32_t(v[3]);
    out.push_back(static_cast<char>(w >> 16));
    if (pad < 2) out.push_back(static_cast<char>((w >> 8) & 0xFF));
    if (pad < 1) out.push_back(static_cast<char>(w & 0xFF));
  }
  return true;
}

class TiktokenTokenizer final : public TokenizerBase {
 public:
  TiktokenTokenizer(std::string name, BytesMap ranks, std::vector<std::pair<int32_t, std::string>> tokens,
                    std::string_view pattern, const std::vector<SpecialToken>& specials)
      : TokenizerBase(std::move(name), TokenizerKind::kTiktoken), ranks_(std::move(ranks)), pre_(pattern) {
    for (auto& [rank, bytes] : tokens) set_token(rank, bytes);
    std::vector<AtomicToken> atomic;
    std::optional<int32_t> eos;
    for (const SpecialToken& s : specials) {
      atomic.push_back({s.text, s.id, true, false, false, false});
      if (s.text == "<|endoftext|>") eos = s.id;
    }
    set_atomic_tokens(std::move(atomic));
    set_eos(eos);
  }

 protected:
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const override {
    for_each_utf8_run(text, [&](std::string_view run, bool valid) {
      if (!valid) return encode_piece(run, out);  // invalid UTF-8: one piece (tokenizer.h)
      Pretokenizer::Matches m(pre_, run);
      size_t b = 0, e = 0, last = 0;
      while (m.next(&b, &e)) {
        // Bytes the pattern skips would be dropped by tiktoken; our patterns cover every
        // character, and encoding any gap keeps the round trip exact for custom patterns.
        if (b > last) encode_piece(run.substr(last, b - last), out);
        encode_piece(run.substr(b, e - b), out);
        last = e;
      }
      if (last < run.size()) encode_piece(run.substr(last), out);
    });
  }

 private:
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
    const int32_t whole = ranks_.find(piece);  // tiktoken: a piece that is a token is emitted as is
    if (whole >= 0) out.push_back(whole);
    else bpe_merge_by_bytes(piece, ranks_, out);
  }

  BytesMap ranks_;
  Pretokenizer pre_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_tiktoken(const std::filesystem::path& path, const TiktokenOptions& options) {
  return load_tiktoken_from_string(io::read_small_file(path.string(), io::kMaxTokenizerBytes, "tiktoken rank file"),
                                   path, options);
}

std::unique_ptr<Tokenizer> load_tiktoken_from_string(std::string_view content, const std::filesystem::path& path,
                                                     const TiktokenOptions& options) {
  const std::string file = path.string();

  BytesMap ranks;
  std::vector<std::pair<int32_t, std::string>> tokens;
  std::string bytes;
  size_t line_no = 0;
  for (size_t pos = 0; pos < content.size();) {
    size_t eol = content.find('\n', pos);
    if (eol == std::string::npos) eol = content.size();
    std::string_view line(content.data() + pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const size_t sp = line.find(' ');
    int32_t rank = -1;
    const std::string_view rank_str = sp == std::string_view::npos ? std::string_view() : line.substr(sp + 1);
    const auto [ptr, ec] = std::from_chars(rank_str.data(), rank_str.data() + rank_str.size(), rank);
    DIFFMOE_CHECK(sp != std::string_view::npos && ec == std::errc() && ptr == rank_str.data() + rank_str.size() &&
                      rank >= 0 && base64_decode(line.substr(0, sp), bytes),
                  "[tiktoken] '{}' line {}: expected \"<base64 token> <rank>\", got '{}'", file, line_no,
                  line.substr(0, 80));
    DIFFMOE_CHECK(rank < kMaxTokenizerVocab, "[tiktoken] '{}' line {}: rank {} is over the largest supported id {}",
                  file, line_no, rank, kMaxTokenizerVocab - 1);
    DIFFMOE_CHECK(ranks.insert(bytes, rank), "[tiktoken] '{}' line {}: duplicate token", file, line_no);
    tokens.emplace_back(rank, bytes);
  }
  DIFFMOE_CHECK(!tokens.empty(), "[tiktoken] '{}' has no ranks", file);

  std::optional<TiktokenPreset> preset;
  if (!options.preset.empty()) {
    preset = tiktoken_preset(options.preset);
    DIFFMOE_CHECK(preset.has_value(), "[tiktoken] '{}': unknown preset '{}'", file, options.preset);
  } else {
    preset = tiktoken_preset(path.stem().string());
    if (!preset) {
      for (const char* n : {"r50k_base", "p50k_base", "cl100k_base", "o200k_base"}) {
        auto p = tiktoken_preset(n);
        if (p->n_ranks == static_cast<int32_t>(tokens.size())) preset = p;
      }
    }
  }
  DIFFMOE_CHECK(preset.has_value() || options.pattern.has_value(),
                "[tiktoken] '{}': cannot tell which encoding this is ({} ranks; file stem '{}'); name the file "
                "after its encoding (r50k_base, p50k_base, cl100k_base or o200k_base .tiktoken)",
                file, tokens.size(), path.stem().string());
  const std::string name = options.name ? *options.name : preset ? preset->name : path.stem().string();
  const std::string pattern = options.pattern ? *options.pattern : std::string(preset->pattern);
  const std::vector<SpecialToken> specials = options.specials ? *options.specials
                                             : preset         ? preset->specials
                                                              : std::vector<SpecialToken>{};
  for (int b = 0; b < 256; ++b)
    DIFFMOE_CHECK(ranks.find(std::string(1, static_cast<char>(b))) >= 0,
                  "[tiktoken] '{}': byte 0x{:02x} has no rank; every single byte must be a token", file, b);
  try {
    return std::make_unique<TiktokenTokenizer>(name, std::move(ranks), std::move(tokens), pattern, specials);
  } catch (const Error& e) {
    DIFFMOE_FAIL("[tiktoken] '{}': {}", file, e.what());
  }
}

}  // namespace diffmoe::data
