// BPE trainer (bpe_trainer.h): merges computed by hand on tiny corpora, determinism, exact round
// trips, and the saved diffmoe tokenizer.json loading back through load_tokenizer().
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "data/bpe_trainer.h"
#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"
#include "tokenizer_test_util.h"

namespace diffmoe::data {
namespace {

namespace fs = std::filesystem;

std::vector<std::pair<std::string, std::string>> merge_strings(const TrainedBpe& bpe) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& m : bpe.merges) out.emplace_back(bpe.tokens[m.left], bpe.tokens[m.right]);
  return out;
}

using Merges = std::vector<std::pair<std::string, std::string>>;

TrainedBpe train_on(const std::string& text, BpeTrainerOptions opt) {
  BpeTrainer t(std::move(opt));
  t.add_text(text);
  return t.train();
}

TEST(BpeTrainer, HandComputedAaabdaaabac) {
  // One pre-token "aaabdaaabac". Pair counts: aa 4, ab 2, bd/da/ba/ac 1.
  //  1. (a,a)  -> "aa":  words become [aa a b d aa a b a c]; counts: (aa,a) 2, (a,b) 2, rest 1.
  //  2. tie at 2: (a,b) wins over (aa,a) because left "a" < "aa" -> [aa ab d aa ab a c].
  //  3. (aa,ab) 2 -> "aaab"; every remaining pair occurs once < min_frequency 2: stop.
  const TrainedBpe bpe = train_on("aaabdaaabac", {.vocab_size = 1000});
  EXPECT_EQ(merge_strings(bpe), (Merges{{"a", "a"}, {"a", "b"}, {"aa", "ab"}}));
  ASSERT_EQ(bpe.tokens.size(), 259u);
  EXPECT_EQ(bpe.tokens[256], "aa");
  EXPECT_EQ(bpe.tokens[258], "aaab");
  ASSERT_EQ(bpe.specials.size(), 1u);
  EXPECT_EQ(bpe.specials[0].text, "<|endoftext|>");
  EXPECT_EQ(bpe.specials[0].id, 259);
  const auto tok = load_hf_tokenizer_from_string(trained_bpe_to_json(bpe), "inline");
  EXPECT_EQ(tok->encode("aaabdaaabac"), (std::vector<int32_t>{258, 'd', 258, 'a', 'c'}));
}

TEST(BpeTrainer, HandComputedWeightedWords) {
  // Pre-tokens: "ab" x1, " ab" x2, " cd" x1. Pair counts: (a,b) 3, (' ',a) 2, (' ',c) 1, (c,d) 1.
  //  1. (a,b) 3.  2. (' ',ab) 2.  3. tie at 1: (' ',c) before (c,d) since " " < "c".  4. (" c",d) 1.
  const TrainedBpe bpe = train_on("ab ab ab cd", {.vocab_size = 1000, .min_frequency = 1});
  EXPECT_EQ(merge_strings(bpe), (Merges{{"a", "b"}, {" ", "ab"}, {" ", "c"}, {" c", "d"}}));
  // The vocab_size budget (bytes + merges + specials) stops training early.
  const TrainedBpe two = train_on("ab ab ab cd", {.vocab_size = 256 + 2 + 1, .min_frequency = 1});
  EXPECT_EQ(merge_strings(two), (Merges{{"a", "b"}, {" ", "ab"}}));
  EXPECT_EQ(two.vocab_size(), 259);
}

TEST(BpeTrainer, SpecialTokensAreNotLearned) {
  std::string text;
  for (int i = 0; i < 200; ++i) text += "x<|endoftext|>";
  const TrainedBpe bpe = train_on(text, {.vocab_size = 400, .min_frequency = 1});
  for (const std::string& t : bpe.tokens) {
    EXPECT_EQ(t.find("endoftext"), std::string::npos) << t;
    EXPECT_EQ(t.find("<|"), std::string::npos) << t;
  }
}

// A deterministic synthetic corpus: Zipf-ish pseudo-words with punctuation, digits, newlines,
// some non-ASCII and a few invalid bytes.
std::string synthetic_corpus(size_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> words;
  const char* syll[] = {"th", "e", "an", "re", "in", "on", "at", "er", "st", "ou", "ing", "ed", "qu", "\xc3\xa9"};
  for (int i = 0; i < 500; ++i) {
    std::string w;
    for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n; ++k) w += syll[rng() % 14];
    words.push_back(w);
  }
  std::string s;
  while (s.size() < bytes) {
    const uint64_t r = rng();
    const size_t idx = static_cast<size_t>((r % 500) * (r % 500) / 500);  // skewed towards small indices
    s += r % 7 == 0 ? "  " : " ";
    s += words[idx];
    if (r % 13 == 0) s += ",";
    if (r % 29 == 0) s += ".\n";
    if (r % 97 == 0) s += fmt::format(" {}", r % 100000);
    if (r % 1009 == 0) s += "\xff\xfe";
  }
  return s;
}

TEST(BpeTrainer, DeterministicAndIndependentOfChunking) {
  const std::string corpus = synthetic_corpus(200000, 7);
  const BpeTrainerOptions opt{.vocab_size = 600};
  const std::string a = trained_bpe_to_json(train_on(corpus, opt));
  const std::string b = trained_bpe_to_json(train_on(corpus, opt));
  EXPECT_EQ(a, b);
  // Adding the same documents in another order (split at a word boundary) gives the same file.
  const size_t cut = corpus.find(' ', corpus.size() / 2);
  BpeTrainer t(opt);
  t.add_text(corpus.substr(cut));
  t.add_text(corpus.substr(0, cut));
  EXPECT_EQ(trained_bpe_to_json(t.train()), a);
}

TEST(BpeTrainer, RoundTripAndSavedFileLoadsBack) {
  const std::string corpus = synthetic_corpus(100000, 11);
  const TrainedBpe bpe = train_on(corpus, {.vocab_size = 500, .name = "synthetic"});
  EXPECT_EQ(bpe.vocab_size(), 500);
  const fs::path dir = fs::temp_directory_path() / "diffmoe_bpe_trainer_test";
  fs::create_directories(dir);
  const fs::path path = dir / "tokenizer.json";
  save_trained_bpe(bpe, path);
  const auto loaded = load_tokenizer(path);
  const auto direct = load_hf_tokenizer_from_string(trained_bpe_to_json(bpe), "inline");
  EXPECT_EQ(loaded->kind(), TokenizerKind::kDiffmoe);
  EXPECT_EQ(loaded->name(), "synthetic");
  EXPECT_EQ(loaded->vocab_size(), 500);
  EXPECT_EQ(loaded->eos_id(), 499);
  const auto ids = loaded->encode(corpus);
  EXPECT_EQ(ids, direct->encode(corpus));
  EXPECT_EQ(loaded->decode(ids), corpus);
  EXPECT_LT(ids.size(), corpus.size() / 2);  // it actually compresses its training text
  for (int32_t id = 256; id < 499; ++id) EXPECT_EQ(loaded->token_bytes(id), bpe.tokens[id]);
  EXPECT_EQ(loaded->encode_with_special("a<|endoftext|>b"), (std::vector<int32_t>{'a', 499, 'b'}));
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200; ++i) {
    const std::string s = test::random_bytes(rng, 1 + rng() % 300);
    ASSERT_EQ(loaded->decode(loaded->encode_with_special(s)), s);
  }
  // The file is a plain HF tokenizer.json with our marker.
  std::ifstream in(path);
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["model"]["merges"].size(), bpe.merges.size());
  EXPECT_EQ(j["diffmoe"]["format"], "diffmoe-bpe");
  fs::remove_all(dir);
}

TEST(BpeTrainer, SaveErrorsNameThePathAndTheReason) {
  const TrainedBpe bpe = train_on("abab abab abab", {.vocab_size = 260});
  const fs::path dir = fs::temp_directory_path() / fmt::format("diffmoe_bpe_save_test_{}", ::getpid());
  fs::remove_all(dir);
  const fs::path path = dir / "missing" / "tokenizer.json";  // the directory does not exist
  try {
    save_trained_bpe(bpe, path);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  }
  // Saved for real: only the file itself is left (the temporary was renamed), and it loads.
  fs::create_directories(dir);
  save_trained_bpe(bpe, dir / "tokenizer.json");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  EXPECT_EQ(load_tokenizer(dir / "tokenizer.json")->vocab_size(), bpe.vocab_size());
  fs::remove_all(dir);
}

TEST(BpeTrainer, Cl100kPatternVariant) {
  const std::string corpus = synthetic_corpus(50000, 5);
  const TrainedBpe bpe = train_on(corpus, {.vocab_size = 400, .pattern = "cl100k"});
  const auto tok = load_hf_tokenizer_from_string(trained_bpe_to_json(bpe), "inline");
  EXPECT_EQ(tok->decode(tok->encode(corpus)), corpus);
  EXPECT_EQ(tok->vocab_size(), 400);
}

}  // namespace
}  // namespace diffmoe::data
