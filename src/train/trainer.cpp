#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>

#include "backend/backend_registry.h"
#include "core/error.h"
#include "data/loader.h"
#include "io/checkpoint.h"
#include "io/config_file.h"
#include "model/model_file.h"
#include "model/parameters.h"
#include "train/evaluator.h"
#include "train/lr_schedule.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/run_setup.h"
#include "train/sharded_state.h"
#include "train/token_buffers.h"

namespace diffmoe {

namespace fs = std::filesystem;

namespace {

// Per-layer routing and λ statistics for the log (a host sync: log steps only).
void routing_stats(const Model& m, std::map<std::string, double>& out) {
  const ModelConfig& c = m.config();
  double worst = 0;
  for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l) {
    std::vector<int32_t> counts(static_cast<size_t>(c.n_routed_experts));
    m.backend().download(counts.data(), m.expert_counts(l));
    double sum = 0, mx = 0;
    for (int32_t v : counts) {
      sum += v;
      mx = std::max(mx, static_cast<double>(v));
    }
    const double imbalance = sum > 0 ? mx / (sum / static_cast<double>(counts.size())) : 0.0;  // max / mean (spec §5)
    out[fmt::format("imbalance_l{}", l)] = imbalance;
    worst = std::max(worst, imbalance);
    const Tensor bias = m.params().get(fmt::format("layers.{}.ffn.gate.bias", l));
    std::vector<float> b(static_cast<size_t>(bias.numel()));
    m.backend().download(b.data(), bias);
    const auto [lo, hi] = std::minmax_element(b.begin(), b.end());
    out[fmt::format("bias_range_l{}", l)] = static_cast<double>(*hi - *lo);
  }
  if (c.n_dense_layers < c.n_layers) {
    out["imbalance_max"] = worst;
    out["dropped_tokens"] = 0;  // dropless routing
  }
  if (c.differential) {
    for (int64_t l = 0; l < c.n_layers; ++l) {
      float lambda;
      m.backend().download(&lambda, m.lambda(l));
      out[fmt::format("lambda_l{}", l)] = lambda;
    }
  }
}

std::string copy_tokenizer_into(const std::string& src, const std::string& dst_dir_file) {
  fs::copy_file(src, dst_dir_file, fs::copy_options::overwrite_existing);
  return dst_dir_file;
}

// One training run (train() below): setup() builds everything a step needs, start() initialises or
// resumes the state, step() runs one optimizer step, save() writes a checkpoint, run() loops.
class TrainRun {
 public:
  TrainRun(const RunConfig& rc, const TrainOptions& opt) : rc_(rc), ts_(rc.train), opt_(opt) {}

  TrainResult run() {
    setup();
    start();
    loop();
    metrics_->close();  // flush errors surface here, as errors, not in a destructor
    return TrainResult{.steps = step_, .last_loss = last_loss_, .val_loss = val_loss_, .last_checkpoint = last_ckpt_};
  }

 private:
  void say(const std::string& s) const {
    fmt::print("{}\n", s);
    std::fflush(stdout);
  }

  // The backend, the tokenizer and shards (made when missing), the model, the optimizer and the loaders.
  void setup() {
    fs::create_directories(ts_.out_dir);
    const std::string config_yaml = to_yaml(rc_.resolved);
    say(fmt::format("diffmoe train: config {} (resolved, with defaults):\n{}", opt_.config_path, config_yaml));
    atomic_write_text(ts_.out_dir + "/config.yaml", config_yaml);

    be_ = make_backend(ts_.device);  // first: a missing backend fails before any data work
    say(fmt::format("backend: {}", be_->name()));
    tokenizer_ = ensure_tokenizer(rc_, [this](const std::string& s) { say(s); });
    shards_ = ensure_shards(rc_, *tokenizer_, [this](const std::string& s) { say(s); });

    const int64_t B = ts_.micro_batch, T = ts_.seq_len;
    model_ = std::make_unique<Model>(rc_.model, *be_, DType::kF32,
                                     ModelOptions{.precision = parse_precision(ts_.precision, "train.precision"),
                                                  .recompute = parse_recompute(ts_.recompute, "train.recompute")});
    model_->set_batch_shape(B, T);
    say(fmt::format("activation arena: {:.1f} MiB (train.recompute: {}, micro-batch {} x {})",
                    static_cast<double>(model_->acts().bytes()) / (1024.0 * 1024.0), ts_.recompute, B, T));
    optim_ = std::make_unique<AdamW>(*model_, rc_.optim);
    loader_ = std::make_unique<data::TokenLoader>(data::find_shards(shards_, "train"),
                                                  data::TokenLoaderOptions{.batch = B, .seq = T, .seed = ts_.seed, .shuffle = true});
    DIFFMOE_CHECK(loader_->vocab_size() <= static_cast<uint32_t>(rc_.model.vocab_size),
                  "{}: shards were made with a {}-token vocabulary but model.vocab_size is {}", shards_, loader_->vocab_size(),
                  rc_.model.vocab_size);
    try {
      val_ = std::make_unique<data::TokenLoader>(data::find_shards(shards_, "val"),
                                                 data::TokenLoaderOptions{.batch = B, .seq = T, .seed = ts_.seed, .shuffle = false,
                                                                          .max_batches = rc_.eval.batches});
    } catch (const Error& e) {
      say(fmt::format("validation: none ({})", e.what()));
    }
    tb_ = std::make_unique<TokenBuffers>(*be_, B, T);
    flops_per_token_ = count_parameters(rc_.model, T).flops_per_token;
    tokens_per_step_ = B * T * ts_.grad_accum;
  }

  // A fresh start from the seed, or an exact resume (formats.md §4.6: model, optimizer, trainer and
  // loader state).
  void start() {
    if (!opt_.resume.empty()) {
      resume();
    } else {
      model_->init_weights(ts_.seed);
      optim_->init_masters(ts_.seed);
    }
    first_step_ = step_;
    metrics_ = std::make_unique<MetricsLogger>(rc_, step_, ts_.max_steps, /*resumed=*/!opt_.resume.empty());
    say(fmt::format("training: {} steps of {} tokens ({}x{} x {} micro-batches), {:.2f} MFLOP/token, {} train tokens", ts_.max_steps,
                    tokens_per_step_, ts_.micro_batch, ts_.seq_len, ts_.grad_accum, flops_per_token_ / 1e6, loader_->n_tokens()));
  }

  void resume() {
    std::vector<std::string> warnings;
    const auto info = resolve_resume(opt_.resume, rc_.checkpoint.dir, &warnings);
    for (const auto& w : warnings) say("resume: warning: " + w);
    DIFFMOE_CHECK(info.has_value(), "{}: no valid checkpoint to resume from", rc_.checkpoint.dir);
    const StateReader reader(info->dir);
    DIFFMOE_CHECK(reader.has_moments(), "{}: holds model weights but no optimizer state: cannot resume training from it", info->dir);
    load_state(*optim_, reader, {});
    try {
      step_ = info->state.at("step").get<int64_t>();
      tokens_seen_ = info->state.at("tokens_seen").get<uint64_t>();
      loader_->restore(data::LoaderState::from_json(info->state.at("loader").get<std::string>()));
    } catch (const std::exception& e) {
      DIFFMOE_FAIL("{}/trainer_state.json: {}", info->dir, e.what());
    }
    optim_->set_steps_taken(step_);
    last_ckpt_ = info->dir;
    say(fmt::format("resumed from {} at step {} ({} tokens seen)", info->dir, step_, tokens_seen_));
  }

  void save(int64_t at_step) {
    const std::string tok_name = "tokenizer" + fs::path(rc_.tokenizer.path).extension().string();
    nlohmann::ordered_json state = {{"step", at_step},
                                    {"tokens_seen", tokens_seen_},
                                    {"loader", loader_->state().to_json()},
                                    {"seed", ts_.seed},
                                    {"world_size", 1},
                                    {"expert_parallel", 1},
                                    {"tokenizer", tok_name},
                                    {"config", rc_.resolved}};
    last_ckpt_ = save_checkpoint(CheckpointSaveOptions{
        .root = rc_.checkpoint.dir,
        .step = at_step,
        .files = {{shard_file_name(0, 1), [&](const std::string& p) { write_state_shard(*optim_, p, 0, 1, /*with_buffers=*/true); }},
                  {tok_name, [&](const std::string& p) { copy_tokenizer_into(rc_.tokenizer.path, p); }}},
        .state = state,
        .keep_last = static_cast<int>(rc_.checkpoint.keep_last),
        .keep_every = rc_.checkpoint.keep_every});
    metrics_->message(fmt::format("checkpoint: {}", last_ckpt_));
  }

  void run_eval(int64_t at_step) {
    if (!val_) return;
    const EvalResult r = evaluate(*model_, *val_, rc_.eval.batches);
    val_loss_ = r.loss;
    metrics_->log(at_step, "val", {{"val_loss", r.loss}, {"val_ppl", r.perplexity}, {"val_tokens", static_cast<double>(r.tokens)}});
  }

  // Forward and backward over grad_accum micro-batches, then the update. Returns false when the step
  // was not applied (a non-finite loss or gradient norm).
  bool step(double* loss_out, double* aux_out, double* gnorm_out) {
    model_->zero_grads({});
    model_->zero_expert_counts({});
    double loss = 0, aux = 0;
    for (int64_t micro = 0; micro < ts_.grad_accum; ++micro) {
      tb_->next(*loader_, *be_);  // the training loader never ends (it runs across epochs)
      model_->forward({}, tb_->inputs(), tb_->targets());
      model_->backward({}, 1.0 / static_cast<double>(ts_.grad_accum));
      const LossValues l = model_->losses();
      loss += l.lm_loss / static_cast<double>(ts_.grad_accum);
      aux += l.aux_loss / static_cast<double>(ts_.grad_accum);
    }
    optim_->compute_grad_sq({});
    const double gnorm = optim_->grad_norm();
    *loss_out = loss;
    *aux_out = aux;
    *gnorm_out = gnorm;
    // A non-finite loss or gradient is never applied: parameters, optimizer state and every
    // checkpoint stay as they were. train.max_bad_steps consecutive ones stop the run.
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      ++bad_steps_;
      const std::string what = fmt::format("step {}: non-finite {} ({})", step_ + 1, std::isfinite(loss) ? "gradient norm" : "loss",
                                           std::isfinite(loss) ? gnorm : loss);
      DIFFMOE_CHECK(bad_steps_ < ts_.max_bad_steps,
                    "{}; stopping without applying it ({} consecutive non-finite step(s), train.max_bad_steps = {}). "
                    "Last good checkpoint: {}",
                    what, bad_steps_, ts_.max_bad_steps, last_ckpt_.empty() ? "none written yet" : last_ckpt_);
      metrics_->message(fmt::format("warning: {}; update skipped ({} of train.max_bad_steps = {})", what, bad_steps_, ts_.max_bad_steps));
      return false;
    }
    bad_steps_ = 0;
    lr_ = learning_rate(step_, rc_.optim.warmup_steps, ts_.max_steps, rc_.optim.lr, rc_.optim.min_lr);
    optim_->apply({}, lr_);
    return true;
  }

  void loop() {
    double window_loss = 0, window_aux = 0;
    int64_t window_steps = 0;
    auto window_t0 = std::chrono::steady_clock::now();
    while (step_ < ts_.max_steps) {
      const auto t0 = std::chrono::steady_clock::now();
      double loss = 0, aux = 0, gnorm = 0;
      if (!step(&loss, &aux, &gnorm)) continue;
      ++step_;
      tokens_seen_ += static_cast<uint64_t>(tokens_per_step_);
      last_loss_ = loss;
      window_loss += loss;
      window_aux += aux;
      ++window_steps;
      const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      metrics_->progress(step_, loss, static_cast<double>(tokens_per_step_) / step_s);

      if (step_ % ts_.log_every == 0 || step_ == ts_.max_steps) {
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_t0).count();
        const double tps = static_cast<double>(window_steps * tokens_per_step_) / dt;
        std::map<std::string, double> v = {{"loss", window_loss / static_cast<double>(window_steps)},
                                           {"aux_loss", window_aux / static_cast<double>(window_steps)},
                                           {"lr", lr_},
                                           {"grad_norm", gnorm},
                                           {"tokens_per_s", tps},
                                           {"step_time_s", dt / static_cast<double>(window_steps)},
                                           {"mfu_pct", 100.0 * tps * flops_per_token_ / (ts_.peak_tflops * 1e12)},
                                           {"tokens_seen", static_cast<double>(tokens_seen_)}};
        routing_stats(*model_, v);
        metrics_->log(step_, "train", v);
        window_loss = window_aux = 0;
        window_steps = 0;
        window_t0 = std::chrono::steady_clock::now();
      }
      const bool eval_now = (rc_.eval.every > 0 && step_ % rc_.eval.every == 0) || step_ == ts_.max_steps;
      if (eval_now) run_eval(step_);
      if ((rc_.checkpoint.every > 0 && step_ % rc_.checkpoint.every == 0) || step_ == ts_.max_steps) save(step_);
      metrics_->flush();
      if (ts_.stop_after > 0 && step_ - first_step_ >= ts_.stop_after && step_ < ts_.max_steps) {
        // As if interrupted here: no extra checkpoint, nothing else written (train.stop_after).
        metrics_->message(fmt::format("stopping after {} steps of this run (train.stop_after) at step {} of {}", ts_.stop_after,
                                      step_, ts_.max_steps));
        break;
      }
    }
  }

  const RunConfig& rc_;
  const TrainSettings& ts_;
  const TrainOptions& opt_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<data::Tokenizer> tokenizer_;
  std::string shards_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<AdamW> optim_;
  std::unique_ptr<data::TokenLoader> loader_, val_;
  std::unique_ptr<TokenBuffers> tb_;
  std::unique_ptr<MetricsLogger> metrics_;
  double flops_per_token_ = 0;
  int64_t tokens_per_step_ = 0;
  int64_t step_ = 0, first_step_ = 0, bad_steps_ = 0;
  uint64_t tokens_seen_ = 0;
  double lr_ = 0, last_loss_ = 0, val_loss_ = std::nan("");
  std::string last_ckpt_;
};

}  // namespace

TrainResult train(const RunConfig& rc, const TrainOptions& opt) { return TrainRun(rc, opt).run(); }

}  // namespace diffmoe
