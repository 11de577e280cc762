// `diffmoe generate --checkpoint X --prompt "..." [--max-new-tokens N] [--temperature T]
//                   [--top-k K] [--top-p P] [--seed S]`: sampling with the latent KV cache,
// printing text as it is produced.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "backend/backend_registry.h"
#include "cli/commands.h"
#include "model/generator.h"
#include "model/sampler.h"
#include "train/checkpoint_reader.h"

namespace diffmoe::cli {

namespace {

struct GenerateArgs {
  std::string checkpoint, tokenizer, prompt, device = "cpu";
  int64_t max_new_tokens = 200;
  double temperature = 0.8, top_p = 0.95;
  int64_t top_k = 0;
  uint64_t seed = 0;
  bool no_verify = false;
};

// Length of the longest prefix of `s` that does not end inside a UTF-8 sequence, so streaming
// never prints half a character (invalid bytes are printed as they are once complete).
size_t complete_utf8_prefix(const std::string& s) {
  size_t n = s.size(), i = n;
  for (int back = 0; back < 4 && i > 0; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte (or ASCII): is its sequence complete?
      const size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
      return (n - (i - 1) >= need) ? n : i - 1;
    }
    --i;
  }
  return n;
}

int run_generate(const GenerateArgs& a) {
  DIFFMOE_CHECK(a.max_new_tokens >= 0, "--max-new-tokens: must be >= 0, got {}", a.max_new_tokens);
  DIFFMOE_CHECK(std::isfinite(a.temperature) && a.temperature >= 0,
                "--temperature: must be a finite number >= 0 (0 = greedy), got {}", a.temperature);
  DIFFMOE_CHECK(a.top_p > 0 && a.top_p <= 1, "--top-p: must be in (0, 1], got {}", a.top_p);
  DIFFMOE_CHECK(a.top_k >= 0, "--top-k: must be >= 0 (0 = all), got {}", a.top_k);
  auto be = make_backend(a.device);
  LoadedCheckpoint ck = open_trained_model(a.checkpoint, *be, DType::kF32,
                                           OpenModelOptions{.tokenizer_path = a.tokenizer, .verify = !a.no_verify});
  DIFFMOE_CHECK(ck.tokenizer != nullptr, "{}: no tokenizer in the checkpoint; pass --tokenizer", a.checkpoint);
  const data::Tokenizer& tok = *ck.tokenizer;
  std::vector<int32_t> ids = tok.encode(a.prompt);
  if (ids.empty() && tok.eos_id()) ids.push_back(*tok.eos_id());  // an empty prompt starts a new document
  const int64_t max_len = ck.model->config().max_seq_len;
  DIFFMOE_CHECK(static_cast<int64_t>(ids.size()) < max_len, "--prompt: {} tokens leave no room in max_seq_len = {}",
                ids.size(), max_len);
  const int64_t budget = std::min<int64_t>(a.max_new_tokens, max_len - static_cast<int64_t>(ids.size()));
  if (budget < a.max_new_tokens)
    fmt::print(stderr, "warning: --max-new-tokens {}: the prompt's {} tokens leave room for {} in max_seq_len = {}\n",
               a.max_new_tokens, ids.size(), budget, max_len);

  Generator gen(*ck.model, GeneratorOptions{.batch = 1, .max_len = max_len});
  const Sampler sampler(
      SamplerOptions{.temperature = a.temperature, .top_k = a.top_k, .top_p = a.top_p, .seed = a.seed});
  const auto t0 = std::chrono::steady_clock::now();
  Tensor logits = gen.prefill({}, gen.upload_tokens(ids, static_cast<int64_t>(ids.size())));
  fmt::print("{}", a.prompt);
  std::fflush(stdout);
  std::vector<int32_t> out;
  std::string printed;
  std::vector<float> host_logits(static_cast<size_t>(ck.model->config().vocab_size));
  const int32_t usable = static_cast<int32_t>(std::min<int64_t>(tok.vocab_size(), ck.model->config().vocab_size));
  for (int64_t i = 0; i < budget; ++i) {
    // Sample among the tokenizer's ids only: the model's vocabulary may be padded past them, and
    // tiktoken vocabularies have unused ids in between.
    be->download(host_logits.data(), logits);
    for (int32_t id = 0; id < usable; ++id)
      if (!tok.is_token(id)) host_logits[static_cast<size_t>(id)] = -std::numeric_limits<float>::infinity();
    const int32_t next = sampler.sample(std::span<const float>(host_logits.data(), static_cast<size_t>(usable)),
                                        static_cast<uint64_t>(i));
    if (tok.eos_id() && next == *tok.eos_id()) break;
    out.push_back(next);
    const std::string text = tok.decode(out);
    const size_t ready = complete_utf8_prefix(text);
    if (ready > printed.size()) {
      fmt::print("{}", text.substr(printed.size(), ready - printed.size()));
      std::fflush(stdout);
      printed = text.substr(0, ready);
    }
    if (i + 1 < budget) logits = gen.step({}, gen.upload_tokens(std::vector<int32_t>{next}, 1));
  }
  const std::string text = tok.decode(out);
  if (text.size() > printed.size()) fmt::print("{}", text.substr(printed.size()));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("\n");
  fmt::print(stderr, "[{} prompt + {} new tokens in {:.2f} s: {:.1f} tokens/s; checkpoint step {}]\n", ids.size(),
             out.size(), s, static_cast<double>(out.size()) / s, ck.step);
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, std::function<int()>& run) {
  auto* cmd = app.add_subcommand("generate", "Sample text from a trained model (streams to stdout)");
  auto a = std::make_shared<GenerateArgs>();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint root, step directory or model .safetensors")->required();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer file (default: the checkpoint's copy)");
  cmd->add_option("--prompt", a->prompt, "text to continue")->required();
  cmd->add_option("--max-new-tokens", a->max_new_tokens, "tokens to generate (default 200)");
  cmd->add_option("--temperature", a->temperature, "sampling temperature; 0 = greedy (default 0.8)");
  cmd->add_option("--top-k", a->top_k, "keep the k most likely tokens; 0 = all (default)");
  cmd->add_option("--top-p", a->top_p, "nucleus sampling mass (default 0.95)");
  cmd->add_option("--seed", a->seed, "sampling seed (default 0)");
  cmd->add_option("--device", a->device, "cpu (default) or cuda");
  cmd->add_flag("--no-verify", a->no_verify, "read the checkpoint without checking it against its manifest");
  cmd->callback([&run, a] { run = [a] { return run_generate(*a); }; });
}

}  // namespace diffmoe::cli
