#include "serve/bench_decode.h"

#include <fmt/format.h>

#include <chrono>
#include <vector>

#include "serve/engine.h"

namespace diffmoe::serve {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Distinct experts the last step routed some row to, summed over the MoE layers.
int64_t experts_hit(const Engine& engine) {
  const ModelConfig& c = engine.config();
  std::vector<int32_t> counts(static_cast<size_t>(c.n_routed_experts));
  int64_t hit = 0;
  for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l) {
    engine.backend().download(counts.data(), engine.expert_counts(l));
    for (const int32_t n : counts) hit += n > 0 ? 1 : 0;
  }
  return hit;
}

EngineOptions engine_options(const DecodeCase& c, const BenchEngineOptions& opt) {
  // Room for exactly this case: the prefill step packs every prompt; a decode step has one row per sequence.
  return EngineOptions{.max_batch = c.batch,
                       .max_step_tokens = c.batch * c.prompt_len,
                       .max_context = c.prompt_len + c.new_tokens,
                       .block_size = opt.block_size,
                       .max_logit_rows = c.batch,
                       .fp8_weights = opt.fp8_weights,
                       .cuda_graphs = opt.cuda_graphs,
                       .expanded_prefill = opt.expanded_prefill};
}

// One run of the case on `engine`: its sequences are added, prefilled, decoded and released.
DecodeTiming run_case(Engine& engine, const DecodeCase& c) {
  const ModelConfig& cfg = engine.config();
  Backend& be = engine.backend();
  const std::vector<int32_t> prompt = decode_prompt(cfg, c);
  std::vector<int64_t> seqs;
  std::vector<StepSequence> batch;
  for (int64_t b = 0; b < c.batch; ++b) {
    seqs.push_back(engine.add_sequence());
    batch.push_back({.seq = seqs.back(),
                     .tokens = std::span<const int32_t>(prompt).subspan(static_cast<size_t>(b * c.prompt_len),
                                                                        static_cast<size_t>(c.prompt_len))});
  }
  const bool moe = cfg.n_layers > cfg.n_dense_layers;
  std::vector<float> logits;
  std::vector<int32_t> next;
  int64_t hit = 0;
  DecodeTiming t;
  t.tokens.reserve(static_cast<size_t>(c.batch * c.new_tokens));
  be.synchronize({});
  auto t0 = Clock::now();
  StepOutput out = engine.step({}, batch);
  be.synchronize({});
  t.prefill_s = seconds_since(t0);
  if (c.on_decode) c.on_decode();
  t0 = Clock::now();
  for (int64_t i = 0; i < c.new_tokens; ++i) {
    choose_greedy(be, out.logits, logits, next, t.tokens);  // the step's logit rows are in batch order
    for (int64_t b = 0; b < c.batch; ++b)
      batch[static_cast<size_t>(b)].tokens = std::span<const int32_t>(next).subspan(static_cast<size_t>(b), 1);
    out = engine.step({}, batch);
    if (c.count_experts && moe) hit += experts_hit(engine);
  }
  be.synchronize({});
  t.decode_s = seconds_since(t0);
  for (const int64_t s : seqs) engine.release(s);
  if (c.count_experts && moe)
    t.experts_per_layer =
        static_cast<double>(hit) / static_cast<double>(c.new_tokens * (cfg.n_layers - cfg.n_dense_layers));
  return t;
}

void add_stats(GraphStats& sum, const GraphStats& s) {
  sum.captures += s.captures;
  sum.replays += s.replays;
  sum.eager_padded += s.eager_padded;
  sum.dropped += s.dropped;
}

}  // namespace

DecodeTiming time_engine_decode(Model& model, const DecodeCase& c, const BenchEngineOptions& opt) {
  check_decode_case(model.config(), c);
  Engine engine(model, engine_options(c, opt));
  return run_case(engine, c);
}

struct EngineDecodeBench::State {
  BenchEngineOptions opt;
  const Model* model = nullptr;
  DecodeCase key;
  std::unique_ptr<Engine> engine;
  GraphStats done;  // of the engines dropped so far
  std::string error;
  std::string prefill_error;
};

EngineDecodeBench::EngineDecodeBench(BenchEngineOptions opt) : state_(std::make_shared<State>()) { state_->opt = opt; }

DecodeTiming EngineDecodeBench::operator()(Model& model, const DecodeCase& c) {
  check_decode_case(model.config(), c);
  State& s = *state_;
  const bool same = s.engine && s.model == &model && s.key.batch == c.batch && s.key.prompt_len == c.prompt_len &&
                    s.key.new_tokens == c.new_tokens;
  if (!same) {
    if (s.engine) add_stats(s.done, s.engine->graph_stats());
    s.engine.reset();  // its cache and arena first: the next engine may need the memory
    s.engine = std::make_unique<Engine>(model, engine_options(c, s.opt));
    if (!s.engine->expanded_prefill_error().empty()) s.prefill_error = s.engine->expanded_prefill_error();
    s.model = &model;
    s.key = c;
  }
  DecodeTiming t = run_case(*s.engine, c);
  if (!s.engine->graph_error().empty()) s.error = s.engine->graph_error();
  return t;
}

GraphStats EngineDecodeBench::graph_stats() const {
  GraphStats sum = state_->done;
  if (state_->engine) add_stats(sum, state_->engine->graph_stats());
  return sum;
}

std::string EngineDecodeBench::graph_error() const { return state_->error; }

std::string EngineDecodeBench::expanded_prefill_error() const { return state_->prefill_error; }

std::unordered_map<std::string, int64_t> engine_stored_bytes(const Model& model, const BenchEngineOptions& opt) {
  const ModelConfig& c = model.config();
  std::unordered_map<std::string, int64_t> bytes;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string name = fmt::format("layers.{}.attn.wkv_b.weight", l);
    const Tensor w = model.params().get(name);  // [W^UK_j ; 0] [H, d_qk, r_kv] and W^UV [H·d_v, r_kv] (engine.h)
    bytes[name] = c.n_heads * (c.d_qk() + c.v_head_dim) * c.kv_lora_rank * static_cast<int64_t>(dtype_size(w.dtype));
  }
  if (opt.fp8_weights) {
    for (const std::string& name : fp8_weight_names(c)) {
      const Tensor w = model.params().get(name);  // e4m3 [N, K] and f32 scales [ceil(N/128), fp8_block_scale_cols(K)]
      bytes[name] = w.numel() + fp8_tiles(w.dim(0)) * fp8_block_scale_cols(w.dim(1)) * 4;
    }
  }
  return bytes;
}

}  // namespace diffmoe::serve
