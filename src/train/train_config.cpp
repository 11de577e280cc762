#include "train/train_config.h"

#include <cmath>
#include <limits>
#include <set>

#include "core/error.h"
#include "data/bpe_trainer.h"
#include "data/tokenizer.h"
#include "io/config_file.h"

namespace diffmoe {

namespace {

using Json = nlohmann::ordered_json;

// Reads the keys of one section, remembering which it used, so that finish() can reject the
// rest by name. Each get() also writes the value it settled on into `resolved`.
class SectionReader {
 public:
  SectionReader(const Json& doc, std::string section, std::string source)
      : section_(std::move(section)), source_(std::move(source)) {
    if (doc.contains(section_)) {
      node_ = doc[section_];
      DIFFMOE_CHECK(node_.is_object() || node_.is_null(), "{}: {}: expected a mapping, got {}", source_, section_,
                    node_.dump());
      if (node_.is_null()) node_ = Json::object();
    } else {
      node_ = Json::object();
    }
  }

  template <class T>
  T get(const char* key, T fallback) {
    used_.insert(key);
    T value = fallback;
    // An empty value ("lr:" in a file, --set optim.lr=) is a mistake, not a request for the default.
    DIFFMOE_CHECK(!node_.contains(key) || !node_[key].is_null(),
                  "{}: has no value (leave the key out to use the default, {})", where(key), Json(fallback).dump());
    if (node_.contains(key)) value = convert<T>(node_[key], key);
    resolved_[key] = value;
    return value;
  }

  Json finish() {
    for (const auto& [key, v] : node_.items())
      DIFFMOE_CHECK(used_.contains(key), "{}: {}.{}: unknown key (known: {})", source_, section_, key, known());
    return resolved_;
  }

 private:
  std::string where(const char* key) const { return fmt::format("{}: {}.{}", source_, section_, key); }
  std::string known() const {
    std::string s;
    for (const auto& k : used_) s += (s.empty() ? "" : ", ") + k;
    return s;
  }
  template <class T>
  T convert(const Json& v, const char* key) const {
    if constexpr (std::is_same_v<T, bool>) {
      DIFFMOE_CHECK(v.is_boolean(), "{}: expected true or false, got {}", where(key), v.dump());
      return v.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      // An integral double outside int64 (1e30, .inf) cannot be cast: that is undefined behaviour.
      // 2^63 is exact as a double, so [-2^63, 2^63) is exactly the range that converts.
      constexpr double kTwo63 = 9223372036854775808.0;
      const bool integral_float = v.is_number_float() && v.get<double>() == std::floor(v.get<double>()) &&
                                  v.get<double>() >= -kTwo63 && v.get<double>() < kTwo63;
      DIFFMOE_CHECK(v.is_number_integer() || integral_float, "{}: expected an integer, got {}", where(key), v.dump());
      if constexpr (std::is_unsigned_v<T>)
        DIFFMOE_CHECK(v.get<double>() >= 0, "{}: must be >= 0, got {}", where(key), v.dump());
      return static_cast<T>(v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(v.get<double>()));
    } else if constexpr (std::is_floating_point_v<T>) {
      DIFFMOE_CHECK(v.is_number(), "{}: expected a number, got {}", where(key), v.dump());
      // NaN and ±inf pass every "x <= 0" check below and then poison the run: no key takes them.
      // Nor a magnitude past f32's largest (optim.lr = 1e39): the devices compute in f32, where it is inf.
      const double x = v.get<double>();
      DIFFMOE_CHECK(std::isfinite(x) && std::fabs(x) <= std::numeric_limits<float>::max(),
                    "{}: must be a finite number of f32 range (|x| <= {}), got {}", where(key),
                    std::numeric_limits<float>::max(), x);
      return static_cast<T>(x);
    } else {
      DIFFMOE_CHECK(v.is_string(), "{}: expected a string, got {}", where(key), v.dump());
      return v.get<std::string>();
    }
  }

  Json node_;
  Json resolved_ = Json::object();
  std::set<std::string> used_;
  std::string section_, source_;
};

void check(bool ok, const std::string& source, const char* key, const std::string& why) {
  DIFFMOE_CHECK(ok, "{}: {}: {}", source, key, why);
}

}  // namespace

RunConfig run_config_from_json(Json doc, const std::string& source) {
  DIFFMOE_CHECK(doc.is_object(), "{}: expected a mapping of sections (model:, train:, ...)", source);
  for (const auto& [key, value] : doc.items()) {
    bool known = false;
    for (const char* s : kConfigSections) known = known || key == s;
    DIFFMOE_CHECK(known, "{}: {}: unknown top-level section", source, key);
  }
  DIFFMOE_CHECK(doc.contains("model"), "{}: model: section is missing", source);
  RunConfig rc;
  rc.model = ModelConfig::from_json(doc["model"], source);
  rc.resolved["model"] = rc.model.to_json();

  SectionReader tok(doc, "tokenizer", source);
  rc.tokenizer.path = tok.get<std::string>("path", "");
  rc.tokenizer.train_inputs = tok.get<std::string>("train_inputs", "");
  rc.tokenizer.vocab_size = tok.get<int64_t>("vocab_size", rc.model.vocab_size);
  rc.resolved["tokenizer"] = tok.finish();

  SectionReader data(doc, "data", source);
  rc.data.inputs = data.get<std::string>("inputs", "");
  rc.data.text_field = data.get<std::string>("text_field", "text");
  rc.data.shards = data.get<std::string>("shards", "");
  rc.data.val_fraction = data.get<double>("val_fraction", 0.01);
  rc.data.doc_bytes = data.get<int64_t>("doc_bytes", rc.data.doc_bytes);
  rc.resolved["data"] = data.finish();

  SectionReader tr(doc, "train", source);
  TrainSettings& t = rc.train;
  t.out_dir = tr.get<std::string>("out_dir", t.out_dir);
  t.device = tr.get<std::string>("device", t.device);
  t.seed = tr.get<uint64_t>("seed", t.seed);
  t.micro_batch = tr.get<int64_t>("micro_batch", t.micro_batch);
  t.seq_len = tr.get<int64_t>("seq_len", rc.model.max_seq_len);
  t.grad_accum = tr.get<int64_t>("grad_accum", t.grad_accum);
  t.max_steps = tr.get<int64_t>("max_steps", t.max_steps);
  t.log_every = tr.get<int64_t>("log_every", t.log_every);
  t.peak_tflops = tr.get<double>("peak_tflops", t.peak_tflops);
  t.max_bad_steps = tr.get<int64_t>("max_bad_steps", t.max_bad_steps);
  t.stop_after = tr.get<int64_t>("stop_after", t.stop_after);
  t.precision = tr.get<std::string>("precision", t.precision);
  t.recompute = tr.get<std::string>("recompute", t.recompute);
  rc.resolved["train"] = tr.finish();

  SectionReader op(doc, "optim", source);
  OptimConfig& o = rc.optim;
  o.lr = op.get<double>("lr", o.lr);
  o.min_lr = op.get<double>("min_lr", o.lr * 0.1);
  o.warmup_steps = op.get<int64_t>("warmup_steps", o.warmup_steps);
  o.beta1 = op.get<double>("beta1", o.beta1);
  o.beta2 = op.get<double>("beta2", o.beta2);
  o.eps = op.get<double>("eps", o.eps);
  o.weight_decay = op.get<double>("weight_decay", o.weight_decay);
  o.grad_clip = op.get<double>("grad_clip", o.grad_clip);
  o.moment_dtype = op.get<std::string>("moment_dtype", o.moment_dtype);
  rc.resolved["optim"] = op.finish();

  SectionReader ev(doc, "eval", source);
  rc.eval.every = ev.get<int64_t>("every", rc.eval.every);
  rc.eval.batches = ev.get<int64_t>("batches", rc.eval.batches);
  rc.resolved["eval"] = ev.finish();

  SectionReader ck(doc, "checkpoint", source);
  rc.checkpoint.every = ck.get<int64_t>("every", rc.checkpoint.every);
  rc.checkpoint.keep_last = ck.get<int64_t>("keep_last", rc.checkpoint.keep_last);
  rc.checkpoint.keep_every = ck.get<int64_t>("keep_every", rc.checkpoint.keep_every);
  rc.checkpoint.dir = ck.get<std::string>("dir", t.out_dir + "/checkpoints");
  rc.resolved["checkpoint"] = ck.finish();

  SectionReader pa(doc, "parallel", source);
  rc.parallel.expert = pa.get<int64_t>("expert", rc.parallel.expert);
  rc.parallel.bucket_size = pa.get<int64_t>("bucket_size", rc.parallel.bucket_size);
  rc.parallel.zero_stage = pa.get<int64_t>("zero_stage", rc.parallel.zero_stage);
  rc.parallel.grad_slots = pa.get<int64_t>("grad_slots", rc.parallel.grad_slots);
  rc.resolved["parallel"] = pa.finish();

  SectionReader lg(doc, "log", source);
  rc.log.tensorboard = lg.get<bool>("tensorboard", rc.log.tensorboard);
  rc.log.jsonl = lg.get<bool>("jsonl", rc.log.jsonl);
  rc.log.progress = lg.get<std::string>("progress", rc.log.progress);
  rc.resolved["log"] = lg.finish();

  // Values that parse but make no sense, named by key.
  check(t.device == "cpu" || t.device == "cuda", source, "train.device",
        fmt::format("expected cpu or cuda, got '{}'", t.device));
  check(t.micro_batch > 0, source, "train.micro_batch", fmt::format("must be positive, got {}", t.micro_batch));
  check(t.seq_len > 0 && t.seq_len <= rc.model.max_seq_len, source, "train.seq_len",
        fmt::format("must be in [1, model.max_seq_len = {}], got {}", rc.model.max_seq_len, t.seq_len));
  check(t.grad_accum > 0, source, "train.grad_accum", fmt::format("must be positive, got {}", t.grad_accum));
  check(t.max_steps > 0, source, "train.max_steps", fmt::format("must be positive, got {}", t.max_steps));
  check(t.log_every > 0, source, "train.log_every", fmt::format("must be positive, got {}", t.log_every));
  check(t.max_bad_steps > 0, source, "train.max_bad_steps", "must be positive");
  check(t.peak_tflops > 0, source, "train.peak_tflops",
        fmt::format("must be positive (the MFU denominator), got {}", t.peak_tflops));
  check(t.stop_after >= 0, source, "train.stop_after",
        fmt::format("must be >= 0 (0 = run to max_steps), got {}", t.stop_after));
  check(t.precision == "f32" || t.precision == "bf16_gemm" || t.precision == "fp8", source, "train.precision",
        fmt::format("expected f32, bf16_gemm or fp8, got '{}'", t.precision));
  check(t.recompute == "none" || t.recompute == "attention" || t.recompute == "moe" || t.recompute == "full", source,
        "train.recompute", fmt::format("expected none, attention, moe or full, got '{}'", t.recompute));
  check(o.lr > 0, source, "optim.lr", fmt::format("must be positive, got {}", o.lr));
  check(o.lr > 0 && o.min_lr >= 0 && o.min_lr <= o.lr, source, "optim.min_lr",
        fmt::format("need 0 <= min_lr <= lr, got min_lr {} and lr {}", o.min_lr, o.lr));
  check(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0");
  check(o.beta1 >= 0 && o.beta1 < 1, source, "optim.beta1", "must be in [0, 1)");
  check(o.beta2 >= 0 && o.beta2 < 1, source, "optim.beta2", "must be in [0, 1)");
  check(o.eps > 0, source, "optim.eps", "must be positive");
  check(o.weight_decay >= 0, source, "optim.weight_decay", "must be >= 0");
  check(o.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 disables clipping)");
  check(o.moment_dtype == "f32" || o.moment_dtype == "bf16", source, "optim.moment_dtype",
        fmt::format("expected f32 or bf16, got '{}'", o.moment_dtype));
  if (!rc.tokenizer.train_inputs.empty()) {  // vocab_size is only used to train the tokenizer
    const int64_t min_vocab = 256 + static_cast<int64_t>(data::BpeTrainerOptions{}.special_tokens.size());
    check(rc.tokenizer.vocab_size >= min_vocab, source, "tokenizer.vocab_size",
          fmt::format("must be at least {} (256 byte tokens + <|endoftext|>), got {}", min_vocab,
                      rc.tokenizer.vocab_size));
    check(rc.tokenizer.vocab_size <= data::kMaxTokenizerVocab, source, "tokenizer.vocab_size",
          fmt::format("must be at most {}, got {}", data::kMaxTokenizerVocab, rc.tokenizer.vocab_size));
  }
  check(rc.data.val_fraction >= 0 && rc.data.val_fraction < 1, source, "data.val_fraction", "must be in [0, 1)");
  check(rc.data.doc_bytes >= 0, source, "data.doc_bytes", "must be >= 0 (0 = one document per file)");
  check(rc.eval.every >= 0 && rc.eval.batches > 0, source, "eval.batches", "must be positive (and eval.every >= 0)");
  check(rc.checkpoint.every >= 0 && rc.checkpoint.keep_last >= 0 && rc.checkpoint.keep_every >= 0, source, "checkpoint",
        "every, keep_last and keep_every must be >= 0");
  check(rc.checkpoint.keep_last <= std::numeric_limits<int32_t>::max(), source, "checkpoint.keep_last",
        fmt::format("must be at most {} (0 keeps all), got {}", std::numeric_limits<int32_t>::max(),
                    rc.checkpoint.keep_last));
  check(rc.parallel.expert >= 1, source, "parallel.expert", fmt::format("must be >= 1, got {}", rc.parallel.expert));
  check(rc.parallel.expert == 1 || rc.model.n_dense_layers == rc.model.n_layers ||
            rc.model.n_routed_experts % rc.parallel.expert == 0,
        source, "parallel.expert",
        fmt::format("{} expert-parallel ranks must divide model.n_routed_experts = {}", rc.parallel.expert,
                    rc.model.n_routed_experts));
  // The fp8 mode's routed experts run a per-expert loop the expert-parallel layer does not take
  // (docs/model.md §7).
  check(rc.parallel.expert == 1 || rc.train.precision != "fp8", source, "train.precision",
        fmt::format(
            "fp8 is not available with expert parallelism (parallel.expert = {}): use bf16_gemm or parallel.expert 1",
            rc.parallel.expert));
  check(rc.parallel.bucket_size > 0, source, "parallel.bucket_size",
        fmt::format("must be positive, got {}", rc.parallel.bucket_size));
  check(rc.parallel.zero_stage == 1 || rc.parallel.zero_stage == 2, source, "parallel.zero_stage",
        fmt::format("must be 1 (optimizer state sharded) or 2 (gradients too), got {}", rc.parallel.zero_stage));
  check(rc.parallel.grad_slots >= 0, source, "parallel.grad_slots",
        fmt::format("must be 0 (automatic) or more, got {}", rc.parallel.grad_slots));
  check(rc.log.progress == "auto" || rc.log.progress == "bar" || rc.log.progress == "lines", source, "log.progress",
        fmt::format("expected auto, bar or lines, got '{}'", rc.log.progress));
  return rc;
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  Json doc = load_yaml_file(path);
  for (const std::string& o : overrides) {
    try {
      apply_override(doc, o, /*allow_new=*/true);  // defaults are not in the file; unknown keys fail below
    } catch (const Error& e) {
      DIFFMOE_FAIL("{}: --set {}: {}", path, o, e.what());
    }
  }
  return run_config_from_json(std::move(doc), path);
}

}  // namespace diffmoe
