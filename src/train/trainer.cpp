#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "backend/backend_registry.h"
#include "core/error.h"
#include "data/loader.h"
#include "data/token_shard.h"
#include "dist/device_world.h"
#include "dist/process_grid.h"
#include "io/checkpoint.h"
#include "io/config_file.h"
#include "io/file_util.h"
#include "model/model_file.h"
#include "model/parameters.h"
#include "train/data_parallel.h"
#include "train/evaluator.h"
#include "train/expert_exchange_comm.h"
#include "train/finite_check.h"
#include "train/lr_schedule.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/run_dir.h"
#include "train/run_setup.h"
#include "train/sharded_state.h"
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
    const double imbalance =
        sum > 0 ? mx / (sum / static_cast<double>(counts.size())) : 0.0;  // max / mean (docs/model.md §5)
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
  // Only the regular file that was loaded (a bounded read), never whatever the path names now.
  const std::string text = io::read_small_file(src, io::kMaxTokenizerBytes, "tokenizer file");
  if (const io::Failure failed =
          io::write_file_synced(dst_dir_file, [&](int fd) { return io::write_all(fd, text.data(), text.size()); }))
    DIFFMOE_FAIL("{}: {} failed ({})", dst_dir_file, failed.step, std::strerror(failed.err));
  return dst_dir_file;
}

// One training run (train() below) on one rank of `world` (docs/parallelism.md): setup() builds
// everything a step needs, start() initialises or resumes the state, step() runs one optimizer step
// over the rank's micro-batches of the global batch, save() writes this rank's part of a checkpoint
// (rank 0 commits it), loop() runs to the end. Rank 0 alone prints, logs and writes run files.
class TrainRun {
 public:
  TrainRun(const RunConfig& rc, const TrainOptions& opt) : rc_(rc), ts_(rc.train), opt_(opt) {}

  TrainResult run() {
    // From here on a first SIGINT/SIGTERM/SIGUSR1 only sets the stop flag: one during set-up (the
    // tokenizer and shards being made, the model built or resumed) stops the run before its first
    // step, as one during training stops it after the step (loop()).
    const StopSignalHandlers stop_handlers;
    setup();
    start();
    loop();
    if (metrics_) metrics_->close();  // flush errors surface here, as errors, not in a destructor
    return TrainResult{.steps = step_,
                       .last_loss = last_loss_,
                       .val_loss = val_loss_,
                       .last_checkpoint = last_ckpt_,
                       .stop_signal = stopped_by_};
  }

 private:
  bool lead() const { return rank_ == 0; }
  void say(const std::string& s) const {
    if (!lead()) return;
    fmt::print("{}\n", s);
    std::fflush(stdout);
  }
  void message(const std::string& s) const {
    if (metrics_) metrics_->message(s);
  }

  // The process grid, the backend, the tokenizer and shards (made by rank 0 when missing), the
  // model, the optimizer, data parallelism and the loaders.
  void setup() {
    if (opt_.dist == nullptr) {
      own_dist_ = dist::DistContext::init(dist::Launch{});
      dist_ = own_dist_.get();
    } else {
      dist_ = opt_.dist;
    }
    rank_ = dist_->rank();
    world_ = dist_->world_size();
    const int64_t ep = rc_.parallel.expert;
    DIFFMOE_CHECK(world_ % ep == 0, "parallel.expert: {} expert-parallel ranks do not divide the {} ranks of this run",
                  ep, world_);

    if (lead()) {
      // First: one trainer per directory, and a fresh run never silently replaces an earlier one.
      run_dirs_ = std::make_unique<RunDirectories>(rc_, !opt_.resume.empty(), opt_.overwrite,
                                                   [this](const std::string& s) { say(s); });
      fs::create_directories(ts_.out_dir);
      const std::string config_yaml = to_yaml(rc_.resolved);
      say(fmt::format("diffmoe train: config {} (resolved, with defaults):\n{}", opt_.config_path, config_yaml));
      atomic_write_text(ts_.out_dir + "/config.yaml", config_yaml);
    }
    // One process per GPU: rank r on the node uses device LOCAL_RANK.
    const std::string device = ts_.device == "cuda" && dist_->launch().local_world > 1
                                   ? fmt::format("cuda:{}", dist_->launch().local_rank)
                                   : ts_.device;
    be_ = make_backend(device);  // first: a missing backend fails before any data work
    world_comm_ = std::make_unique<dist::DeviceWorld>(*dist_, *be_, dist_->launch().local_rank);
    grid_ = std::make_unique<dist::ProcessGrid>(world_comm_->comm(), static_cast<int>(ep));
    say(fmt::format("backend: {}; {} rank(s) ({}), data parallel {} x expert parallel {}", be_->name(), world_,
                    dist_->launch().describe(), grid_->dp_size(), grid_->ep_size()));
    // Rank 0 makes the tokenizer and the shards when missing; the others wait, then read them.
    if (lead()) {
      tokenizer_ = ensure_tokenizer(rc_, [this](const std::string& s) { say(s); });
      shards_ = ensure_shards(rc_, *tokenizer_, [this](const std::string& s) { say(s); });
    }
    dist_->cpu_world().barrier({})->wait({});
    if (!lead()) {
      tokenizer_ = ensure_tokenizer(rc_, [](const std::string&) {});
      shards_ = ensure_shards(rc_, *tokenizer_, [](const std::string&) {});
    }

    const int64_t B = ts_.micro_batch, T = ts_.seq_len;
    const ParallelLayoutOptions layout{.ep_size = ep,
                                       .ep_rank = grid_->ep_rank(),
                                       .dense_dp = world_,
                                       .expert_dp = grid_->dp_size(),
                                       .bucket_elems = rc_.parallel.bucket_size,
                                       .zero_stage = static_cast<int>(rc_.parallel.zero_stage),
                                       .grad_slots = rc_.parallel.grad_slots};
    exchange_ = std::make_unique<CommExpertExchange>(grid_->ep());
    model_ = std::make_unique<Model>(rc_.model, *be_, DType::kF32,
                                     ModelOptions{.precision = parse_precision(ts_.precision, "train.precision"),
                                                  .parallel = layout,
                                                  .expert_exchange = exchange_.get(),
                                                  .recompute = parse_recompute(ts_.recompute, "train.recompute")});
    model_->set_batch_shape(B, T);
    say(fmt::format("activation arena: {:.1f} MiB (train.recompute: {}, micro-batch {} x {})",
                    static_cast<double>(model_->acts().bytes()) / (1024.0 * 1024.0), ts_.recompute, B, T));
    if (rc_.parallel.zero_stage == 2) {
      const GradBuffer::Footprint f = GradBuffer::plan(model_->layout(), model_->plan().master_dtype());
      say(fmt::format("gradients: ZeRO-2, {} bucket slot(s) of the data-parallel groups, {:.1f} MiB in all (full "
                      "buffers would take {:.1f} MiB)",
                      f.n_slots, static_cast<double>(model_->grads().bytes()) / (1024.0 * 1024.0),
                      static_cast<double>(f.unsharded) / (1024.0 * 1024.0)));
    }
    optim_ =
        std::make_unique<AdamW>(*model_, rc_.optim, OptimShard{.dense_rank = rank_, .expert_rank = grid_->dp_rank()});
    dp_ = std::make_unique<DataParallel>(*model_, *optim_, grid_->world(), grid_->dp());
    loader_ = std::make_unique<data::TokenLoader>(
        data::find_shards(shards_, "train"),
        data::TokenLoaderOptions{.batch = B, .seq = T, .seed = ts_.seed, .shuffle = true});
    DIFFMOE_CHECK(loader_->vocab_size() <= static_cast<uint32_t>(rc_.model.vocab_size),
                  "{}: shards were made with a {}-token vocabulary but model.vocab_size is {}", shards_,
                  loader_->vocab_size(), rc_.model.vocab_size);
    // No validation split (prepared with val_fraction 0), or one too short for a batch, means a run
    // without validation; val shards that exist but cannot be read (a FIFO, a bad header, a wrong
    // checksum) are an error like any other input, never a silent "validation: none".
    std::vector<std::filesystem::path> val_shards;
    try {
      val_shards = data::find_shards(shards_, "val");
    } catch (const Error& e) {
      say(fmt::format("validation: none ({})", e.what()));
    }
    uint64_t val_tokens = 0;
    for (const auto& p : val_shards) val_tokens += data::Shard(p, {.verify_checksum = false}).header().n_tokens;
    const uint64_t val_windows = val_tokens > 0 ? (val_tokens - 1) / static_cast<uint64_t>(T) : 0;
    if (!val_shards.empty() && val_windows < static_cast<uint64_t>(B)) {
      say(fmt::format("validation: none ({}: {} val tokens, fewer than one batch of {} windows of seq + 1 = {} tokens)",
                      shards_, val_tokens, B, T + 1));
    } else if (!val_shards.empty()) {
      val_ = std::make_unique<data::TokenLoader>(
          val_shards, data::TokenLoaderOptions{
                          .batch = B, .seq = T, .seed = ts_.seed, .shuffle = false, .max_batches = rc_.eval.batches});
    }
    tb_ = std::make_unique<TokenBuffers>(*be_, B, T);
    flops_per_token_ = count_parameters(rc_.model, T).flops_per_token;
    tokens_per_step_ = B * T * ts_.grad_accum * world_;
  }

  // A fresh start from the seed, or an exact resume (docs/formats.md §4.6: model, optimizer, trainer and
  // loader state).
  void start() {
    if (!opt_.resume.empty()) {
      resume();
    } else {
      model_->init_weights(ts_.seed);
      optim_->init_masters(ts_.seed);
    }
    first_step_ = step_;
    if (lead()) metrics_ = std::make_unique<MetricsLogger>(rc_, step_, ts_.max_steps, /*resumed=*/!opt_.resume.empty());
    say(fmt::format(
        "training: {} steps of {} tokens ({}x{} x {} micro-batches x {} ranks), {:.2f} MFLOP/token, {} train tokens",
        ts_.max_steps, tokens_per_step_, ts_.micro_batch, ts_.seq_len, ts_.grad_accum, world_, flops_per_token_ / 1e6,
        loader_->n_tokens()));
  }

  // Every rank reads the checkpoint's state shards (whatever layout wrote them) for its own pieces;
  // the all-gather then completes every rank's compute weights.
  void resume() {
    std::vector<std::string> warnings;
    const auto info = resolve_resume(opt_.resume, rc_.checkpoint.dir, &warnings);
    for (const auto& w : warnings) say("resume: warning: " + w);
    // Every rank's error says why each checkpoint was skipped (rank 0 alone prints the warnings).
    std::string why;
    for (const auto& w : warnings) why += "; " + w;
    DIFFMOE_CHECK(info.has_value(), "{}: no valid checkpoint to resume from{}", rc_.checkpoint.dir, why);
    const StateReader reader(info->dir);
    DIFFMOE_CHECK(reader.has_moments(),
                  "{}: holds model weights but no optimizer state: cannot resume training from it", info->dir);
    if (const auto change = moment_dtype_change(*optim_, reader)) say("resume: " + *change);
    load_state(*optim_, reader, {});
    dp_->gather_weights({});
    try {
      step_ = info->state.at("step").get<int64_t>();
      tokens_seen_ = info->state.at("tokens_seen").get<uint64_t>();
      loader_->restore(data::LoaderState::from_json(info->state.at("loader").get<std::string>()));
    } catch (const std::exception& e) {
      DIFFMOE_FAIL("{}/trainer_state.json: {}", info->dir, e.what());
    }
    optim_->set_steps_taken(step_);
    const auto bad = FiniteCheck(*model_, *optim_).find({});
    DIFFMOE_CHECK(all_ok(!bad.has_value()),
                  "{}: holds non-finite values: {}; resume from an earlier checkpoint (--resume <dir>)", info->dir,
                  bad ? bad->describe() : "on another rank (its error says where)");
    last_ckpt_ = info->dir;
    saved_step_ = step_;
    say(fmt::format("resumed from {} at step {} ({} tokens seen)", info->dir, step_, tokens_seen_));
  }

  // Whether every rank passes ok (a collective: every rank must call it at the same point).
  bool all_ok(bool ok) { return dp_->sum({}, {ok ? 1.0 : 0.0})[0] == static_cast<double>(world_); }

  // A checkpoint of every rank's state shard (docs/formats.md §4.2, §4.6). Rank 0 runs the atomic save
  // (temporary directory, manifest last, rename, `latest`); the others write their shard into its
  // temporary directory between two agreements, so a failure anywhere leaves no checkpoint and is
  // reported on every rank:
  //   A: rank 0's temporary directory exists;  B: every shard is written;  C: rank 0 committed.
  void save(int64_t at_step) {
    // Never a checkpoint of non-finite state: `latest` stays on the last good one (every rank checks
    // its own part; all must pass).
    const auto bad = finite_->find({});
    DIFFMOE_CHECK(all_ok(!bad.has_value()),
                  "step {}: {}; no checkpoint written, '{}/latest' not moved. Last good checkpoint: {}", at_step,
                  bad ? bad->describe() : "non-finite state on another rank (its error says where)", rc_.checkpoint.dir,
                  last_ckpt_.empty() ? "none written yet" : last_ckpt_);
    const std::string tok_name = "tokenizer" + fs::path(rc_.tokenizer.path).extension().string();
    const std::string my_shard = shard_file_name(rank_, world_);
    const std::string tmp_dir = fmt::format("{}/step_{:09d}.tmp", rc_.checkpoint.dir, at_step);
    if (!lead()) {
      DIFFMOE_CHECK(all_ok(true), "[checkpoint] step {} not saved: rank 0 could not start it (its error says why)",
                    at_step);
      bool ok = true;
      std::string err;
      try {
        write_state_shard(*optim_, tmp_dir + "/" + my_shard, rank_, world_, /*with_buffers=*/false);
        fsync_path(tmp_dir + "/" + my_shard);
      } catch (const std::exception& e) {
        ok = false;
        err = e.what();
      }
      DIFFMOE_CHECK(all_ok(ok), "[checkpoint] step {} not saved: {}", at_step,
                    ok ? "another rank's shard failed" : err);
      DIFFMOE_CHECK(all_ok(true), "[checkpoint] step {} not saved: rank 0 could not commit it (its error says why)",
                    at_step);
      last_ckpt_ = fmt::format("{}/step_{:09d}", rc_.checkpoint.dir, at_step);
      saved_step_ = at_step;
      return;
    }
    nlohmann::ordered_json state = {
        {"step", at_step},       {"tokens_seen", tokens_seen_}, {"loader", loader_->state().to_json()},
        {"seed", ts_.seed},      {"world_size", world_},        {"expert_parallel", rc_.parallel.expert},
        {"tokenizer", tok_name}, {"config", rc_.resolved}};
    int agreed = 0;  // agreements A, B this rank has taken part in
    std::vector<CheckpointFile> files;
    files.push_back({my_shard, [&](const std::string& p) {
                       agreed = 1;
                       DIFFMOE_CHECK(all_ok(true), "[checkpoint] rank 0 could not start the checkpoint");
                       bool ok = true;
                       std::string err;
                       try {
                         write_state_shard(*optim_, p, rank_, world_, /*with_buffers=*/true);
                       } catch (const std::exception& e) {
                         ok = false;
                         err = e.what();
                       }
                       agreed = 2;
                       DIFFMOE_CHECK(all_ok(ok), "{}", ok ? "another rank's shard failed (its error says why)" : err);
                     }});
    for (int r = 1; r < world_; ++r) files.push_back({shard_file_name(r, world_), nullptr});  // written by rank r
    files.push_back({tok_name, [&](const std::string& p) { copy_tokenizer_into(rc_.tokenizer.path, p); }});
    try {
      last_ckpt_ = save_checkpoint(CheckpointSaveOptions{.root = rc_.checkpoint.dir,
                                                         .step = at_step,
                                                         .files = std::move(files),
                                                         .state = state,
                                                         .keep_last = static_cast<int>(rc_.checkpoint.keep_last),
                                                         .keep_every = rc_.checkpoint.keep_every});
    } catch (...) {
      // Take the agreements not yet taken as failed, so that the other ranks stop too.
      for (int k = agreed; k < 3; ++k) all_ok(false);
      throw;
    }
    all_ok(true);  // C
    saved_step_ = at_step;
    message(fmt::format("checkpoint: {}", last_ckpt_));
  }

  // False: the validation loss is not finite.
  bool run_eval(int64_t at_step) {
    if (!val_) return true;
    const EvalResult r = evaluate(*model_, *val_, rc_.eval.batches, rank_, world_);
    const std::vector<double> sums = dp_->sum({}, {r.loss_sum, static_cast<double>(r.tokens)});
    const double loss = sums[1] > 0 ? sums[0] / sums[1] : std::nan("");
    val_loss_ = loss;
    if (metrics_)
      metrics_->log(at_step, "val", {{"val_loss", loss}, {"val_ppl", std::exp(loss)}, {"val_tokens", sums[1]}});
    return std::isfinite(loss);
  }

  // Whether a stop signal reached any rank: every rank stops after the same step.
  bool stop_agreed() {
    const bool mine = stop_requested();
    if (world_ == 1) return mine;
    return dp_->sum({}, {mine ? 1.0 : 0.0})[0] > 0;
  }

  // Forward and backward over this rank's grad_accum micro-batches of the global batch (micro-batch
  // a·world + rank of the loader's stream, so the global batch is the same for any world size), the
  // gradient reduction, then the update. Returns false when the step was not applied (a non-finite
  // loss or gradient norm).
  bool step(double* loss_out, double* aux_out, double* gnorm_out) {
    model_->zero_grads({});
    model_->zero_expert_counts({});
    const double scale = 1.0 / static_cast<double>(ts_.grad_accum * world_);
    double loss = 0, aux = 0;
    for (int64_t micro = 0; micro < ts_.grad_accum; ++micro) {
      for (int r = 0; r < world_; ++r) {  // the training loader never ends (it runs across epochs)
        if (r == rank_) tb_->next(*loader_, *be_);
        else tb_->skip(*loader_);
      }
      model_->forward({}, tb_->inputs(), tb_->targets());
      dp_->set_last_micro_batch(micro + 1 == ts_.grad_accum);
      model_->backward({}, scale);
      const LossValues l = model_->losses();
      loss += l.lm_loss * scale;
      aux += l.aux_loss * scale;
    }
    dp_->finish_gradients({});
    dp_->global_grad_sq({});
    const double gnorm = optim_->grad_norm();
    const std::vector<double> global = dp_->sum({}, {loss, aux});
    loss = global[0];
    aux = global[1];
    *loss_out = loss;
    *aux_out = aux;
    *gnorm_out = gnorm;
    // A non-finite loss or gradient is never applied: parameters, optimizer state and every
    // checkpoint stay as they were. train.max_bad_steps consecutive ones stop the run. Every rank
    // sees the same global values, so every rank decides the same.
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      ++bad_steps_;
      const std::string what =
          fmt::format("step {}: non-finite {} ({})", step_ + 1, std::isfinite(loss) ? "gradient norm" : "loss",
                      std::isfinite(loss) ? gnorm : loss);
      DIFFMOE_CHECK(bad_steps_ < ts_.max_bad_steps,
                    "{}; stopping without applying it ({} consecutive non-finite step(s), train.max_bad_steps = {}). "
                    "Last good checkpoint: {}",
                    what, bad_steps_, ts_.max_bad_steps, last_ckpt_.empty() ? "none written yet" : last_ckpt_);
      message(fmt::format("warning: {}; update skipped ({} of train.max_bad_steps = {})", what, bad_steps_,
                          ts_.max_bad_steps));
      return false;
    }
    bad_steps_ = 0;
    lr_ = learning_rate(step_, rc_.optim.warmup_steps, ts_.max_steps, rc_.optim.lr, rc_.optim.min_lr);
    dp_->reduce_expert_counts({});
    optim_->apply({}, lr_);
    dp_->gather_weights({});
    return true;
  }

  void loop() {
    double window_loss = 0, window_aux = 0;
    int64_t window_steps = 0;
    auto window_t0 = std::chrono::steady_clock::now();
    finite_ = std::make_unique<FiniteCheck>(*model_, *optim_);
    while (step_ < ts_.max_steps) {
      if (stop_agreed()) {                                           // between steps: the last one is complete
        stopped_by_ = stop_signal() != 0 ? stop_signal() : SIGTERM;  // a rank without the signal stops with the others
        if (saved_step_ != step_ && step_ > 0 && bad_steps_ == 0)
          save(step_);  // after a bad step: the last good checkpoint stays
        message(fmt::format("stopped by {} at step {} of {}; checkpoint: {}; continue with --resume (exit code {})",
                            stop_signal_name(stopped_by_), step_, ts_.max_steps,
                            last_ckpt_.empty() ? "none" : last_ckpt_, kExitStopped));
        break;
      }
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
      if (metrics_) metrics_->progress(step_, loss, static_cast<double>(tokens_per_step_) / step_s);

      if (step_ % ts_.log_every == 0 || step_ == ts_.max_steps) {
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_t0).count();
        const double tps = static_cast<double>(window_steps * tokens_per_step_) / dt;
        std::map<std::string, double> v = {
            {"loss", window_loss / static_cast<double>(window_steps)},
            {"aux_loss", window_aux / static_cast<double>(window_steps)},
            {"lr", lr_},
            {"grad_norm", gnorm},
            {"tokens_per_s", tps},
            {"step_time_s", dt / static_cast<double>(window_steps)},
            // per GPU: tokens/s of the world over world GPUs' peak
            {"mfu_pct", 100.0 * tps * flops_per_token_ / (ts_.peak_tflops * 1e12 * world_)},
            {"tokens_seen", static_cast<double>(tokens_seen_)}};
        if (lead()) {
          routing_stats(*model_, v);
          metrics_->log(step_, "train", v);
        }
        window_loss = window_aux = 0;
        window_steps = 0;
        window_t0 = std::chrono::steady_clock::now();
      }
      const bool eval_now = (rc_.eval.every > 0 && step_ % rc_.eval.every == 0) || step_ == ts_.max_steps;
      if (eval_now && !run_eval(step_)) {
        // A non-finite validation loss is a bad step too: these weights are not checkpointed, and the
        // last step of the run cannot end on them. Every rank has the same (global) loss.
        ++bad_steps_;
        const std::string what = fmt::format("step {}: non-finite validation loss ({})", step_, val_loss_);
        DIFFMOE_CHECK(bad_steps_ < ts_.max_bad_steps && step_ < ts_.max_steps,
                      "{}; stopping ({} consecutive bad step(s), train.max_bad_steps = {}). Last good checkpoint: {}",
                      what, bad_steps_, ts_.max_bad_steps, last_ckpt_.empty() ? "none written yet" : last_ckpt_);
        message(fmt::format("warning: {}; no checkpoint of this step ({} of train.max_bad_steps = {})", what,
                            bad_steps_, ts_.max_bad_steps));
        if (metrics_) metrics_->flush();
        continue;
      }
      if ((rc_.checkpoint.every > 0 && step_ % rc_.checkpoint.every == 0) || step_ == ts_.max_steps) save(step_);
      if (metrics_) metrics_->flush();
      if (ts_.stop_after > 0 && step_ - first_step_ >= ts_.stop_after && step_ < ts_.max_steps) {
        // As if interrupted here: no extra checkpoint, nothing else written (train.stop_after).
        message(fmt::format("stopping after {} steps of this run (train.stop_after) at step {} of {}", ts_.stop_after,
                            step_, ts_.max_steps));
        break;
      }
    }
  }

  const RunConfig& rc_;
  const TrainSettings& ts_;
  const TrainOptions& opt_;
  std::unique_ptr<dist::DistContext> own_dist_;
  dist::DistContext* dist_ = nullptr;
  int rank_ = 0, world_ = 1;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<dist::DeviceWorld> world_comm_;
  std::unique_ptr<dist::ProcessGrid> grid_;
  std::unique_ptr<CommExpertExchange> exchange_;
  std::unique_ptr<data::Tokenizer> tokenizer_;
  std::string shards_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<AdamW> optim_;
  std::unique_ptr<DataParallel> dp_;
  std::unique_ptr<data::TokenLoader> loader_, val_;
  std::unique_ptr<TokenBuffers> tb_;
  std::unique_ptr<MetricsLogger> metrics_;
  double flops_per_token_ = 0;
  int64_t tokens_per_step_ = 0;
  int64_t step_ = 0, first_step_ = 0, bad_steps_ = 0;
  uint64_t tokens_seen_ = 0;
  double lr_ = 0, last_loss_ = 0, val_loss_ = std::nan("");
  std::string last_ckpt_;
  int64_t saved_step_ = -1;  // the step of the newest checkpoint of this run's state
  int stopped_by_ = 0;       // the signal that stopped the run, 0 when none did
  std::unique_ptr<RunDirectories> run_dirs_;
  std::unique_ptr<FiniteCheck> finite_;
};

}  // namespace

TrainResult train(const RunConfig& rc, const TrainOptions& opt) { return TrainRun(rc, opt).run(); }

}  // namespace diffmoe
