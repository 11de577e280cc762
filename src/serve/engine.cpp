// The engine's memory plan, the host side of a step (limits, cache blocks, the index buffer), the head and the
// FP8-aware linear. The layers are model/decode_layers.h's; the engine's cache and attention steps for them are in
// engine_layers.cpp.
#include "serve/engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <unordered_set>

#include "model/rope_upload.h"
#include "serve/engine_plan.h"

namespace diffmoe::serve {

namespace {

EngineOptions resolve(EngineOptions o, const ModelConfig& c) {
  if (o.max_context == 0) o.max_context = c.max_seq_len;
  if (o.max_step_tokens == 0) o.max_step_tokens = o.max_batch + 256;
  if (o.max_logit_rows == 0) o.max_logit_rows = o.max_step_tokens;
  DIFFMOE_CHECK(
      o.max_batch >= 1 && o.max_step_tokens >= o.max_batch,
      "[engine] max_batch {} must be >= 1 and max_step_tokens {} >= max_batch (one row per decoding sequence)",
      o.max_batch, o.max_step_tokens);
  DIFFMOE_CHECK(o.max_context >= 1 && o.max_context <= c.max_seq_len,
                "[engine] max_context {} must be in [1, max_seq_len = {}] (the RoPE table's end)", o.max_context,
                c.max_seq_len);
  DIFFMOE_CHECK(o.block_size >= 1, "[engine] block_size {} must be >= 1", o.block_size);
  DIFFMOE_CHECK(o.max_logit_rows >= 1 && o.max_logit_rows <= o.max_step_tokens,
                "[engine] max_logit_rows {} must be in [1, max_step_tokens = {}]", o.max_logit_rows, o.max_step_tokens);
  if (o.n_blocks == 0) o.n_blocks = o.max_batch * ((o.max_context + o.block_size - 1) / o.block_size);
  DIFFMOE_CHECK(o.max_graphs >= 0, "[engine] max_graphs {} must be >= 0", o.max_graphs);
  DIFFMOE_CHECK(o.graph_warmup_steps >= 1, "[engine] graph_warmup_steps {} must be >= 1 (a bucket runs eagerly first)",
                o.graph_warmup_steps);
  return o;
}

// Whether the backend records the engine's ops in the model's GEMM mode (the mode every step sets).
bool graphs_possible(const EngineOptions& o, Model& m) {
  if (!o.cuda_graphs) return false;
  Backend& be = m.backend();
  const GemmPrecision before = be.gemm_precision();
  m.use_gemm_precision();
  const bool yes = be.supports_graphs();
  be.set_gemm_precision(before);
  return yes;
}

// Index of a bucket (1, 2, 4, …, max_batch) among the graphs: ceil(log2(bucket)).
size_t bucket_index(int64_t bucket) { return static_cast<size_t>(std::bit_width(static_cast<uint64_t>(bucket - 1))); }

}  // namespace

Engine::Engine(Model& model, EngineOptions opt)
    : model_(model),
      cfg_(model.config()),
      be_(model.backend()),
      opt_(resolve(opt, model.config())),
      graphs_(graphs_possible(opt_, model)),
      cache_(model.config(), model.dtype(), opt_.block_size, opt_.n_blocks, model.backend().allocator(),
             /*reserved=*/graphs_ ? opt_.max_batch - 1 : 0),  // a block per padding row
      layers_(model, arena_, *this) {
  const ModelConfig& c = cfg_;
  const DType t = model.dtype();
  DIFFMOE_CHECK(t == DType::kF32 || t == DType::kF64, "[engine] unsupported float type {}", dtype_name(t));
  DIFFMOE_CHECK(!opt_.fp8_weights || t == DType::kF32, "[engine] FP8 weights need an f32 model, this one is {}",
                dtype_name(t));
  // cuBLASLt's FP8 GEMM takes M in multiples of 8: FP8 GEMMs on CUDA run on rows padded up to that
  // (their padding rows are scratch that nothing reads), so the scratch is planned for it.
  if (opt_.fp8_weights && be_.device() == Device::kCUDA) row_pad_ = 8;
  const int64_t R = (opt_.max_step_tokens + row_pad_ - 1) / row_pad_ * row_pad_, M = opt_.max_logit_rows,
                B = opt_.max_batch;
  const int64_t D = c.dim, H = c.n_heads, dqk = c.d_qk(), dv = c.v_head_dim;
  const int64_t rkv = c.kv_lora_rank, comps = c.differential ? 2 : 1, h_out = H / comps;
  const int64_t max_blocks = cache_.blocks_for(opt_.max_context);

  // Weights re-laid-out per head (engine_layers.cpp), in wkv_b's compute dtype.
  const DType wt = param("layers.0.attn.wkv_b.weight").dtype;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    arena_.add(fmt::format("w_uk.{}", l), Shape{H, dqk, rkv}, wt);             // [W^UK_j ; 0]
    arena_.add(fmt::format("w_uv.{}", l), Shape{h_out, comps * dv, rkv}, wt);  // [W^UV_2h ; W^UV_2h+1]
  }
  if (opt_.fp8_weights) {  // FP8 copies of the dense Linear weights, and their inputs' quantised rows
    int64_t k_max = 0;
    for (const std::string& name : fp8_weight_names(c)) {
      const Tensor w = param(name);
      arena_.add("fp8." + name + ".q", w.shape, DType::kF8E4M3);
      arena_.add("fp8." + name + ".s", Shape{fp8_tiles(w.dim(0)), fp8_block_scale_cols(w.dim(1))}, DType::kF32);
      k_max = std::max(k_max, w.dim(1));
    }
    arena_.add("fp8.xq", Shape{R * k_max}, DType::kF8E4M3);
    arena_.add("fp8.xs", Shape{fp8_tiles(k_max) * R}, DType::kF32);
  }
  arena_.add("index", Shape{index_capacity(R, B, max_blocks, H, h_out, M)}, DType::kI32);
  // Per-step scratch for R rows, shared by all layers (scratch() views the first elements), and the RoPE tables.
  plan_decode_scratch(arena_, c, R, opt_.max_context, t);
  arena_.add("q_hm", Shape{H * R * dqk}, t);   // [H, N, d_qk] head-major
  arena_.add("att_hm", Shape{R * H * dv}, t);  // [H_out, N, comps·d_v]
  for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l)
    arena_.add(fmt::format("router.counts.{}", l), Shape{c.n_routed_experts}, DType::kI32);
  if (opt_.expanded_prefill) plan_expanded_prefill(R);
  arena_.add("final.h", Shape{M * D}, t);
  arena_.add("final.x_norm", Shape{M * D}, t);
  arena_.add("final.rstd", Shape{M}, t);
  arena_.add("logits", Shape{M * c.vocab_size}, t);
  arena_.allocate(be_.allocator());

  upload_rope_tables(be_, c, opt_.max_context, arena_.get("rope.cos"), arena_.get("rope.sin"));
  refresh_weights();
  if (opt_.expanded_prefill) check_expanded_prefill();
  if (graphs_) {
    graphs_by_bucket_.resize(bucket_index(opt_.max_batch) + 1);
    bucket_eager_steps_.assign(graphs_by_bucket_.size(), 0);
    graph_epoch_ = be_.graph_epoch();
  }
}

void Engine::linear(Context ctx, const Tensor& y, const Tensor& x, const Tensor& w, double beta) const {
  const auto it = fp8_.find(w.data);
  if (it == fp8_.end()) {
    be_.gemm(ctx, {.c = y, .a = x, .b = w, .trans_a = false, .trans_b = true, .alpha = 1.0, .beta = beta});
    return;
  }
  // FP8 (docs/derivations.md §6.1 Fprop): Y = X Wᵀ with X in 1×128 tiles, W in 128×128 blocks.
  const int64_t rows = (x.dim(0) + row_pad_ - 1) / row_pad_ * row_pad_, K = x.dim(1);
  const Tensor xp{.data = x.data, .dtype = x.dtype, .device = x.device, .shape = Shape{rows, K}};
  const Tensor yp{.data = y.data, .dtype = y.dtype, .device = y.device, .shape = Shape{rows, y.dim(1)}};
  const Tensor xq = scratch("fp8.xq", Shape{rows, K}), xs = scratch("fp8.xs", Shape{fp8_tiles(K), rows});
  be_.act_quant(ctx, {.q = xq, .scale = xs, .x = xp});
  be_.fp8_gemm(ctx, {.c = yp,
                     .a = xq,
                     .a_scale = xs,
                     .b = it->second.q,
                     .b_scale = it->second.scale,
                     .b_scaling = Fp8Scaling::kBlock128x128,
                     .beta = beta});
}

// The weights fp8_weights quantises: every dense Linear of the attention and the FFN (docs/model.md §7).
std::vector<std::string> fp8_weight_names(const ModelConfig& c) {
  std::vector<std::string> names;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::vector<std::string> attn = c.q_lora_rank > 0 ? std::vector<std::string>{"wq_a", "wq_b", "wkv_a", "wo"}
                                                            : std::vector<std::string>{"wq", "wkv_a", "wo"};
    for (const std::string& w : attn) names.push_back(fmt::format("layers.{}.attn.{}.weight", l, w));
    const std::string ffn = !c.is_moe_layer(l)       ? fmt::format("layers.{}.ffn.", l)
                            : c.n_shared_experts > 0 ? fmt::format("layers.{}.ffn.shared.", l)
                                                     : std::string();
    if (!ffn.empty())
      for (const char* w : {"w1", "w2", "w3"}) names.push_back(ffn + w + ".weight");
  }
  return names;
}

void Engine::quantize_weights() {
  fp8_.clear();
  if (!opt_.fp8_weights) return;
  for (const std::string& name : fp8_weight_names(cfg_)) {
    const Tensor w = param(name);
    const Fp8Weight f{.q = arena_.get("fp8." + name + ".q"), .scale = arena_.get("fp8." + name + ".s")};
    be_.weight_quant({}, {.q = f.q, .scale = f.scale, .w = w});
    fp8_.emplace(w.data, f);
  }
}

Tensor Engine::expert_counts(int64_t layer) const {
  DIFFMOE_CHECK(cfg_.is_moe_layer(layer) && layer < cfg_.n_layers, "[engine] layer {} is not a MoE layer", layer);
  return arena_.get(fmt::format("router.counts.{}", layer));
}

StepOutput Engine::step(Context ctx, std::span<const StepSequence> batch) {
  const ModelConfig& c = cfg_;
  const int64_t B = static_cast<int64_t>(batch.size());
  DIFFMOE_CHECK(B >= 1 && B <= opt_.max_batch, "[engine] a step takes 1 to max_batch = {} sequences, got {}",
                opt_.max_batch, B);
  // Limits first, so that a refused step changes nothing.
  int64_t N = 0, M = 0, blocks = 0;
  std::unordered_set<int64_t> seen;
  for (const StepSequence& s : batch) {
    DIFFMOE_CHECK(seen.insert(s.seq).second, "[engine] sequence {} appears twice in one step", s.seq);
    DIFFMOE_CHECK(!s.tokens.empty(), "[engine] sequence {}: a step appends at least one token", s.seq);
    const int64_t n = static_cast<int64_t>(s.tokens.size()), len = cache_.length(s.seq);
    DIFFMOE_CHECK(len + n <= opt_.max_context,
                  "[engine] sequence {}: {} cached + {} new positions exceed max_context = {}", s.seq, len, n,
                  opt_.max_context);
    for (const int32_t id : s.tokens)
      DIFFMOE_CHECK(id >= 0 && id < c.vocab_size, "[engine] sequence {}: token id {} is outside the vocabulary [0, {})",
                    s.seq, id, c.vocab_size);
    N += n;
    M += s.logits == LogitRows::kAll ? n : s.logits == LogitRows::kLast ? 1 : 0;
    blocks += cache_.blocks_needed(s.seq, len + n);
  }
  DIFFMOE_CHECK(N <= opt_.max_step_tokens, "[engine] {} new positions exceed max_step_tokens = {}", N,
                opt_.max_step_tokens);
  DIFFMOE_CHECK(M <= opt_.max_logit_rows, "[engine] {} logit rows exceed max_logit_rows = {}", M, opt_.max_logit_rows);
  DIFFMOE_CHECK(blocks <= cache_.free_blocks(), "[engine] the step needs {} cache blocks, {} are free", blocks,
                cache_.free_blocks());

  // The index buffer (engine_plan.h), built on the host and uploaded once. A pure decode step on a graph engine runs
  // on its bucket's rows: sequences B … bucket − 1 are padding (below). Otherwise the latent path's sequences take
  // rows 0 … L − 1 in batch order and the expanded prefill's the rest (layout_rows); logit rows stay in batch order.
  const int64_t H = c.n_heads, h_out = c.differential ? H / 2 : H;
  const int64_t bucket = decode_bucket(batch);
  const int64_t L = layout_rows(batch);
  const int64_t b_latent = B - static_cast<int64_t>(expanded_order_.size());
  expanded_rows_ += N - L;
  DIFFMOE_CHECK(bucket == 0 || L == N, "[engine] a padded decode step has {} expanded rows", N - L);
  plan_ =
      make_plan(arena_.get("index"), bucket > 0 ? bucket : N, bucket > 0 ? bucket : L, bucket > 0 ? bucket : b_latent,
                cache_.blocks_for(opt_.max_context), H, h_out, bucket > 0 ? bucket : M);
  const StepPlan& p = plan_;
  host_index_.assign(static_cast<size_t>(p.used), 0);
  IndexWriter w(host_index_, p);
  StepOutput out;
  int64_t logit_row = 0, latent_seq = 0;
  for (int64_t b = 0; b < B; ++b) {
    const StepSequence& s = batch[static_cast<size_t>(b)];
    const int64_t n = static_cast<int64_t>(s.tokens.size()), len = cache_.length(s.seq);
    const int64_t row = seq_row_[static_cast<size_t>(b)];
    cache_.extend(s.seq, len + n);
    for (int64_t t = 0; t < n; ++t) {
      w.set(p.tokens, row + t, s.tokens[static_cast<size_t>(t)]);
      w.set(p.positions, row + t, len + t);
      w.set(p.slots, row + t, cache_.slot(s.seq, len + t));
    }
    if (row < L) {  // the paged latent attention's indices
      w.set(p.q_offsets, latent_seq, row);
      w.set(p.kv_lens, latent_seq, len + n);
      const std::span<const int32_t> blk = cache_.blocks(s.seq);
      for (size_t i = 0; i < blk.size(); ++i)
        w.set(p.block_table, latent_seq * p.max_blocks + static_cast<int64_t>(i), blk[i]);
      ++latent_seq;
    }
    out.first_row.push_back(s.logits == LogitRows::kNone ? -1 : logit_row);
    if (s.logits == LogitRows::kAll) {
      for (int64_t t = 0; t < n; ++t) w.set(p.logit_rows, logit_row++, row + t);
    } else if (s.logits == LogitRows::kLast) {
      w.set(p.logit_rows, logit_row++, row + n - 1);
    }
  }
  // Padding (docs/serving.md "CUDA graphs"): padding row j is a sequence of one position, token 0 at position 0, in
  // reserved block n_blocks + j (no sequence holds those), so its cache write and attention touch no real sequence's
  // rows and no other padding row's slot; its logit row is computed and dropped. Rows stay independent, so the real
  // rows' values do not depend on the padding.
  for (int64_t b = B; b < p.B; ++b) {  // a pure decode step: row b is sequence b's, logit row b too
    const int64_t pad_block = opt_.n_blocks + (b - B);
    w.set(p.tokens, b, 0);
    w.set(p.positions, b, 0);
    w.set(p.slots, b, pad_block * opt_.block_size);
    w.set(p.q_offsets, b, b);
    w.set(p.kv_lens, b, 1);
    w.set(p.block_table, b * p.max_blocks, pad_block);
    w.set(p.logit_rows, b, b);
  }
  w.set(p.q_offsets, p.B, p.L);
  w.fill_permutations();
  be_.upload(arena_.get("index").rows(0, p.used), host_index_.data());

  model_.use_gemm_precision();
  if (bucket > 0) decode_graph_step(ctx, p, bucket);
  else forward(ctx, p);
  out.logits = scratch("logits", Shape{M, c.vocab_size});  // the real rows (padding rows come after them)
  return out;
}

int64_t Engine::layout_rows(std::span<const StepSequence> batch) {
  const size_t B = batch.size();
  const auto len = [&](size_t b) { return static_cast<int64_t>(batch[b].tokens.size()); };
  seq_row_.assign(B, 0);
  expanded_order_.clear();
  prefill_runs_.clear();
  int64_t row = 0;
  for (size_t b = 0; b < B; ++b) {
    // A chunk of one position gains nothing from expansion (one query, one key); so every pure decode step keeps
    // the latent path (and its graphs) whatever was cached before.
    if (expanded_ && len(b) >= 2 && cache_.length(batch[b].seq) == 0) {
      expanded_order_.push_back(b);
    } else {
      seq_row_[b] = row;
      row += len(b);
    }
  }
  const int64_t L = row;
  std::stable_sort(expanded_order_.begin(), expanded_order_.end(), [&](size_t x, size_t y) { return len(x) < len(y); });
  for (const size_t b : expanded_order_) {
    seq_row_[b] = row;
    if (!prefill_runs_.empty() && prefill_runs_.back().len == len(b)) ++prefill_runs_.back().count;
    else prefill_runs_.push_back({.row = row, .len = len(b), .count = 1});
    row += len(b);
  }
  return L;
}

int64_t Engine::decode_bucket(std::span<const StepSequence> batch) const {
  if (!graphs_ || !graph_error_.empty()) return 0;
  for (const StepSequence& s : batch)
    if (s.tokens.size() != 1 || s.logits == LogitRows::kNone) return 0;
  int64_t bucket = 1;
  while (bucket < static_cast<int64_t>(batch.size())) bucket *= 2;
  bucket = std::min(bucket, opt_.max_batch);  // >= B: step() checked B <= max_batch
  return bucket <= opt_.max_logit_rows ? bucket : 0;
}

void Engine::forward(Context ctx, const StepPlan& p) {
  const ModelConfig& c = cfg_;
  if (c.n_layers > c.n_dense_layers)
    for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l) be_.fill(ctx, {.out = expert_counts(l), .value = 0.0});
  be_.embedding_fwd(ctx, {.out = scratch("h", Shape{p.N, c.dim}),
                          .tokens = p.tokens,
                          .table = param("embed.weight"),
                          .scale = c.embed_scale});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    layers_.attention(ctx, l, {.n = p.N, .positions = p.positions});
    layers_.ffn(ctx, l, p.N, c.is_moe_layer(l) ? expert_counts(l) : Tensor{});
  }
  head(ctx, p);
}

// A graph keeps every op's arguments as recorded: for one bucket they are the same at every step — the rows, the
// index views (make_plan lays them out from the bucket alone), the weights, scratch and cache pools (fixed arenas) —
// except the backend's own workspaces, which may move when a larger step grows them (graph_epoch: then every graph
// is dropped and recorded again, the workspaces now being large enough). What changes per step is memory contents:
// the index buffer (uploaded before the replay, blocking) and the cache.
void Engine::decode_graph_step(Context ctx, const StepPlan& p, int64_t bucket) {
  const size_t i = bucket_index(bucket);
  if (be_.graph_epoch() != graph_epoch_) {
    for (std::unique_ptr<CapturedOps>& g : graphs_by_bucket_)
      if (g != nullptr) {
        g.reset();
        --graphs_kept_;
        ++graph_stats_.dropped;
      }
    graph_epoch_ = be_.graph_epoch();
  }
  std::unique_ptr<CapturedOps>& graph = graphs_by_bucket_[i];
  const int64_t eager = bucket_eager_steps_[i];
  // Recorded after an eager step of the bucket (first calls may initialise with blocking calls, workspaces grow to the
  // bucket's size) and, while the backend still times GEMM algorithms, after graph_warmup_steps of them.
  if (graph == nullptr && graphs_kept_ < opt_.max_graphs && be_.supports_graphs() && eager >= 1 &&
      (eager >= opt_.graph_warmup_steps || !be_.tuning())) {
    Context rec{};
    try {
      rec = be_.begin_capture(ctx);
      forward(rec, p);
      std::unique_ptr<CapturedOps> made = be_.end_capture(rec);
      if (be_.graph_epoch() == graph_epoch_) {  // else a workspace moved while recording: recorded again next step
        graph = std::move(made);
        ++graphs_kept_;
        ++graph_stats_.captures;
      }
    } catch (const Error& e) {  // an op that cannot be recorded: this engine decodes eagerly from now on
      be_.abort_capture(rec);
      graph_error_ = e.what();
      std::fprintf(stderr, "[engine] recording the decode step of %lld rows as a graph failed, decoding eagerly: %s\n",
                   static_cast<long long>(bucket), e.what());
    } catch (...) {
      be_.abort_capture(rec);
      throw;
    }
  }
  if (graph != nullptr) {
    be_.replay(ctx, *graph);
    ++graph_stats_.replays;
    return;
  }
  forward(ctx, p);
  ++bucket_eager_steps_[i];
  ++graph_stats_.eager_padded;
}

void Engine::head(Context ctx, const StepPlan& p) {
  if (p.M == 0) return;
  const int64_t D = cfg_.dim;
  const Tensor sel = scratch("final.h", Shape{p.M, D}), xn = scratch("final.x_norm", Shape{p.M, D});
  be_.moe_gather(ctx,
                 {.x_perm = sel, .x = scratch("h", Shape{p.N, D}), .src_row = p.logit_rows});  // the rows asked for
  be_.rmsnorm_fwd(ctx, {.y = xn,
                        .rstd = scratch("final.rstd", Shape{p.M}),
                        .x = sel,
                        .w = param("norm.weight"),
                        .rows = p.M,
                        .width = D,
                        .eps = cfg_.norm_eps});
  linear(ctx, scratch("logits", Shape{p.M, cfg_.vocab_size}), xn,
         param(cfg_.tie_embeddings ? "embed.weight" : "head.weight"), 0.0);
}

}  // namespace diffmoe::serve
