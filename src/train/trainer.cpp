#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "backend/backend.h"
#include "core/error.h"
#include "data/loader.h"
#include "io/checkpoint.h"
#include "io/config_file.h"
#include "io/file_util.h"
#include "model/model_file.h"
#include "model/parameters.h"
#include "train/evaluator.h"
#include "train/finite_check.h"
#include "train/lr_schedule.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/run_dir.h"
#include "train/run_setup.h"
#include "train/stop_signal.h"
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
    const Tensor bias = const_cast<Model&>(m).params().get(fmt::format("layers.{}.ffn.gate.bias", l));
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
  // Only the regular file that was loaded (a bounded read), never whatever the path names now.
  const std::string text = io::read_small_file(src, io::kMaxTokenizerBytes, "tokenizer file");
  if (const io::Failure failed = io::write_file_synced(dst_dir_file, [&](int fd) { return io::write_all(fd, text.data(), text.size()); }))
    DIFFMOE_FAIL("{}: {} failed ({})", dst_dir_file, failed.step, std::strerror(failed.err));
  return dst_dir_file;
}

}  // namespace

TrainResult train(const RunConfig& rc, const TrainOptions& opt) {
  const TrainSettings& ts = rc.train;
  auto say = [](const std::string& s) { fmt::print("{}\n", s); std::fflush(stdout); };
  // First: one trainer per directory, and a fresh run never silently replaces an earlier one.
  const RunDirectories run_dirs(rc, !opt.resume.empty(), opt.overwrite, say);
  fs::create_directories(ts.out_dir);
  const std::string config_yaml = to_yaml(rc.resolved);
  say(fmt::format("diffmoe train: config {} (resolved, with defaults):\n{}", opt.config_path, config_yaml));
  atomic_write_text(ts.out_dir + "/config.yaml", config_yaml);

  auto be = make_backend(ts.device);  // first: a missing backend fails before any data work
  be->set_gemm_precision(ts.precision == "bf16_gemm" ? GemmPrecision::kBF16 : GemmPrecision::kF32);
  say(fmt::format("backend: {}", be->name()));
  auto tokenizer = ensure_tokenizer(rc, say);
  const std::string shards = ensure_shards(rc, *tokenizer, say);

  Model model(rc.model, *be, DType::kF32);
  const int64_t B = ts.micro_batch, T = ts.seq_len;
  model.set_batch_shape(B, T);
  AdamW optim(model, rc.optim);
  data::TokenLoader loader(data::find_shards(shards, "train"),
                           data::TokenLoaderOptions{.batch = B, .seq = T, .seed = ts.seed, .shuffle = true});
  DIFFMOE_CHECK(loader.vocab_size() <= static_cast<uint32_t>(rc.model.vocab_size),
                "{}: shards were made with a {}-token vocabulary but model.vocab_size is {}", shards, loader.vocab_size(),
                rc.model.vocab_size);
  std::unique_ptr<data::TokenLoader> val;
  try {
    val = std::make_unique<data::TokenLoader>(data::find_shards(shards, "val"),
                                              data::TokenLoaderOptions{.batch = B, .seq = T, .seed = ts.seed, .shuffle = false,
                                                                       .max_batches = rc.eval.batches});
  } catch (const Error& e) {
    say(fmt::format("validation: none ({})", e.what()));
  }

  // Fresh start or exact resume (formats.md §4.6: model, optimizer, trainer and loader state).
  int64_t step = 0;
  uint64_t tokens_seen = 0;
  std::string last_ckpt;
  if (!opt.resume.empty()) {
    std::vector<std::string> warnings;
    const auto info = resolve_resume(opt.resume, rc.checkpoint.dir, &warnings);
    for (const auto& w : warnings) say("resume: warning: " + w);
    DIFFMOE_CHECK(info.has_value(), "{}: no valid checkpoint to resume from", rc.checkpoint.dir);
    load_weights(model, info->path_of("model.safetensors"));  // only files the manifest lists and verified
    optim.load(info->path_of("optimizer.safetensors"));
    try {
      step = info->state.at("step").get<int64_t>();
      tokens_seen = info->state.at("tokens_seen").get<uint64_t>();
      loader.restore(data::LoaderState::from_json(info->state.at("loader").get<std::string>()));
      const int64_t world = info->state.at("world_size").get<int64_t>();
      DIFFMOE_CHECK(world == 1, "world_size: checkpoint was written by {} ranks, this run has 1", world);
    } catch (const std::exception& e) {
      DIFFMOE_FAIL("{}/trainer_state.json: {}", info->dir, e.what());
    }
    DIFFMOE_CHECK(optim.steps_taken() == step, "{}: optimizer.safetensors is at step {} but trainer_state.json at step {}", info->dir,
                  optim.steps_taken(), step);
    if (const auto bad = FiniteCheck(model, optim).find({}))
      DIFFMOE_FAIL("{}: holds non-finite values: {}; resume from an earlier checkpoint (--resume <dir>)", info->dir, bad->describe());
    last_ckpt = info->dir;
    say(fmt::format("resumed from {} at step {} ({} tokens seen)", info->dir, step, tokens_seen));
  } else {
    model.init_weights(ts.seed);
  }

  const int64_t first_step = step;  // train.stop_after counts the steps of this invocation
  MetricsLogger metrics(rc, step, ts.max_steps, /*resumed=*/!opt.resume.empty());
  TokenBuffers tb(*be, B, T);
  const double flops_per_token = count_parameters(rc.model, T).flops_per_token;
  const int64_t tokens_per_step = B * T * ts.grad_accum;
  say(fmt::format("training: {} steps of {} tokens ({}x{} x {} micro-batches), {:.2f} MFLOP/token, {} train tokens", ts.max_steps,
                  tokens_per_step, B, T, ts.grad_accum, flops_per_token / 1e6, loader.n_tokens()));

  FiniteCheck finite(model, optim);
  int64_t saved_step = last_ckpt.empty() ? -1 : step;  // the step of the newest checkpoint of this run's state
  auto save = [&](int64_t at_step) {
    // Never a checkpoint of non-finite state: `latest` stays on the last good one.
    if (const auto bad = finite.find({}))
      DIFFMOE_FAIL("step {}: {}; no checkpoint written, '{}/latest' not moved. Last good checkpoint: {}", at_step, bad->describe(),
                   rc.checkpoint.dir, last_ckpt.empty() ? "none written yet" : last_ckpt);
    const std::string tok_name = "tokenizer" + fs::path(rc.tokenizer.path).extension().string();
    nlohmann::ordered_json state = {{"step", at_step},
                                    {"tokens_seen", tokens_seen},
                                    {"loader", loader.state().to_json()},
                                    {"seed", ts.seed},
                                    {"world_size", 1},
                                    {"tokenizer", tok_name},
                                    {"config", rc.resolved}};
    last_ckpt = save_checkpoint(CheckpointSaveOptions{
        .root = rc.checkpoint.dir,
        .step = at_step,
        .files = {{"model.safetensors", [&](const std::string& p) { save_model(model, p, {{"step", std::to_string(at_step)}}); }},
                  {"optimizer.safetensors", [&](const std::string& p) { optim.save(p); }},
                  {tok_name, [&](const std::string& p) { copy_tokenizer_into(rc.tokenizer.path, p); }}},
        .state = state,
        .keep_last = static_cast<int>(rc.checkpoint.keep_last),
        .keep_every = rc.checkpoint.keep_every});
    saved_step = at_step;
    metrics.message(fmt::format("checkpoint: {}", last_ckpt));
  };
  double val_loss = std::nan("");
  auto run_eval = [&](int64_t at_step) {  // false: the validation loss is not finite
    if (!val) return true;
    const EvalResult r = evaluate(model, *val, rc.eval.batches);
    val_loss = r.loss;
    metrics.log(at_step, "val", {{"val_loss", r.loss}, {"val_ppl", r.perplexity}, {"val_tokens", static_cast<double>(r.tokens)}});
    return std::isfinite(r.loss);
  };

  double window_loss = 0, window_aux = 0, last_loss = 0;
  int64_t bad_steps = 0;  // consecutive non-finite steps
  int64_t window_steps = 0;
  auto window_t0 = std::chrono::steady_clock::now();
  const StopSignalHandlers stop_handlers;  // from here on a signal stops the run with a checkpoint
  int stopped_by = 0;
  while (step < ts.max_steps) {
    if (stop_requested()) {  // between steps: the last one is complete
      stopped_by = stop_signal();
      if (saved_step != step && step > 0 && bad_steps == 0) save(step);  // after a bad step: the last good checkpoint stays
      metrics.message(fmt::format("stopped by {} at step {} of {}; checkpoint: {}; continue with --resume (exit code {})",
                                  stop_signal_name(stopped_by), step, ts.max_steps, last_ckpt.empty() ? "none" : last_ckpt,
                                  kExitStopped));
      break;
    }
    const auto t0 = std::chrono::steady_clock::now();
    model.zero_grads({});
    model.zero_expert_counts({});
    double loss = 0, aux = 0;
    for (int64_t micro = 0; micro < ts.grad_accum; ++micro) {
      tb.next(loader, *be);  // the training loader never ends (it runs across epochs)
      model.forward({}, tb.inputs(), tb.targets());
      model.backward({}, 1.0 / static_cast<double>(ts.grad_accum));
      const LossValues l = model.losses();
      loss += l.lm_loss / static_cast<double>(ts.grad_accum);
      aux += l.aux_loss / static_cast<double>(ts.grad_accum);
    }
    optim.compute_grad_sq({});
    const double gnorm = optim.grad_norm();
    // A non-finite loss or gradient stops the run before the update: parameters, optimizer state
    // and every checkpoint stay as they were.
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      // A non-finite loss or gradient is never applied: parameters, optimizer state and every
      // checkpoint stay as they were. train.max_bad_steps consecutive ones stop the run.
      ++bad_steps;
      const std::string what = fmt::format("step {}: non-finite {} ({})", step + 1, std::isfinite(loss) ? "gradient norm" : "loss",
                                           std::isfinite(loss) ? gnorm : loss);
      DIFFMOE_CHECK(bad_steps < ts.max_bad_steps, "{}; stopping without applying it ({} consecutive non-finite step(s), train.max_bad_steps = {}). "
                    "Last good checkpoint: {}", what, bad_steps, ts.max_bad_steps, last_ckpt.empty() ? "none written yet" : last_ckpt);
      metrics.message(fmt::format("warning: {}; update skipped ({} of train.max_bad_steps = {})", what, bad_steps, ts.max_bad_steps));
      continue;
    }
    bad_steps = 0;
    const double lr = learning_rate(step, rc.optim.warmup_steps, ts.max_steps, rc.optim.lr, rc.optim.min_lr);
    optim.apply({}, lr);
    ++step;
    tokens_seen += static_cast<uint64_t>(tokens_per_step);
    last_loss = loss;
    window_loss += loss;
    window_aux += aux;
    ++window_steps;
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    metrics.progress(step, loss, static_cast<double>(tokens_per_step) / step_s);

    if (step % ts.log_every == 0 || step == ts.max_steps) {
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_t0).count();
      const double tps = static_cast<double>(window_steps * tokens_per_step) / dt;
      std::map<std::string, double> v = {{"loss", window_loss / static_cast<double>(window_steps)},
                                         {"aux_loss", window_aux / static_cast<double>(window_steps)},
                                         {"lr", lr},
                                         {"grad_norm", gnorm},
                                         {"tokens_per_s", tps},
                                         {"step_time_s", dt / static_cast<double>(window_steps)},
                                         {"mfu_pct", 100.0 * tps * flops_per_token / (ts.peak_tflops * 1e12)},
                                         {"tokens_seen", static_cast<double>(tokens_seen)}};
      routing_stats(model, v);
      metrics.log(step, "train", v);
      window_loss = window_aux = 0;
      window_steps = 0;
      window_t0 = std::chrono::steady_clock::now();
    }
    const bool eval_now = (rc.eval.every > 0 && step % rc.eval.every == 0) || step == ts.max_steps;
    if (eval_now && !run_eval(step)) {
      // A non-finite validation loss is a bad step too: these weights are not checkpointed, and the
      // last step of the run cannot end on them.
      ++bad_steps;
      const std::string what = fmt::format("step {}: non-finite validation loss ({})", step, val_loss);
      DIFFMOE_CHECK(bad_steps < ts.max_bad_steps && step < ts.max_steps,
                    "{}; stopping ({} consecutive bad step(s), train.max_bad_steps = {}). Last good checkpoint: {}", what, bad_steps,
                    ts.max_bad_steps, last_ckpt.empty() ? "none written yet" : last_ckpt);
      metrics.message(fmt::format("warning: {}; no checkpoint of this step ({} of train.max_bad_steps = {})", what, bad_steps,
                                  ts.max_bad_steps));
      metrics.flush();
      continue;
    }
    if ((rc.checkpoint.every > 0 && step % rc.checkpoint.every == 0) || step == ts.max_steps) save(step);
    metrics.flush();
    if (ts.stop_after > 0 && step - first_step >= ts.stop_after && step < ts.max_steps) {
      // As if interrupted here: no extra checkpoint, nothing else written (train.stop_after).
      metrics.message(fmt::format("stopping after {} steps of this run (train.stop_after) at step {} of {}", ts.stop_after, step,
                                  ts.max_steps));
      break;
    }
  }
  metrics.close();  // flush errors surface here, as errors, not in a destructor
  return TrainResult{.steps = step, .last_loss = last_loss, .val_loss = val_loss, .last_checkpoint = last_ckpt,
                     .stop_signal = stopped_by};
}

}  // namespace diffmoe
