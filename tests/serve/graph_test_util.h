// The graph engine's test scenario (docs/serving.md "CUDA graphs"), shared by the CPU tests (on a recording backend)
// and the CUDA tests: three engines on one model — graphs on (g), graphs on but none recorded (e: the same padded
// decode steps run eagerly, max_graphs = 0) and graphs off (o) — fed the same batches: sequences joining with prompts
// of different lengths (one prefill step each), decoding one token a step and leaving after different numbers of
// tokens, so that pure decode steps of every batch size 1 … max_batch occur and sequences cross block boundaries.
// Tokens are teacher-forced from e's greedy choice, so all three see the same inputs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "serve/engine.h"

namespace diffmoe::serve::test {

struct GraphScenario {
  int64_t steps = 0, pure_steps = 0;
  std::set<int64_t> buckets;                // of the pure decode steps
  std::map<int64_t, int64_t> bucket_steps;  // pure decode steps per bucket
  int64_t rows = 0;                         // logit rows compared
  int64_t mismatched_rows = 0;              // rows where g's logits differ from e's in any bit
  std::string first_mismatch;               // "step s row r" of the first
  double worst_vs_unpadded = 0.0;           // g against o: the worst norm-wise relative error of a row
  int64_t max_batch_seen = 0;
};

// The logits of a step on the host, as f64.
inline std::vector<double> host_logits(Backend& be, const Tensor& logits) {
  std::vector<double> out(static_cast<size_t>(logits.numel()));
  if (logits.dtype == DType::kF64) {
    be.download(out.data(), logits);
  } else {
    std::vector<float> f(out.size());
    be.download(f.data(), logits);
    std::copy(f.begin(), f.end(), out.begin());
  }
  return out;
}

// Runs the scenario; on_step(s) runs before step s (a test's hook, e.g. moving the backend's workspaces).
inline GraphScenario run_graph_scenario(Engine& g, Engine& e, Engine& o,
                                        const std::function<void(int64_t)>& on_step = {}) {
  const int64_t V = g.config().vocab_size, max_batch = g.options().max_batch;
  Backend& be = g.backend();
  struct Seq {
    int64_t join = 0, prompt = 0, gen = 0;  // joins at step >= join with a slot free; prompt tokens; tokens to decode
    std::vector<int32_t> tokens;            // prompt, then the fed tokens
    int64_t ids[3] = {-1, -1, -1};
    int64_t decoded = 0;
    bool prefilled = false, done = false;
  };
  std::vector<Seq> seqs(14);
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = seqs[i];
    s.join = static_cast<int64_t>(i) * 2;
    s.prompt = 1 + static_cast<int64_t>(i * 5 % 9);
    s.gen = 5 + static_cast<int64_t>(i * 7 % 13);
    for (int64_t t = 0; t < s.prompt; ++t)
      s.tokens.push_back(static_cast<int32_t>((static_cast<int64_t>(i) * 31 + t * 17 + 3) % V));
  }
  Engine* engines[3] = {&g, &e, &o};
  GraphScenario r;
  for (int64_t step = 0;; ++step) {
    if (on_step) on_step(step);
    // The batch: every running sequence (decoding, or its prompt in one step), then joiners while a slot is free.
    std::vector<size_t> members;
    for (size_t i = 0; i < seqs.size(); ++i)
      if (seqs[i].ids[0] >= 0 && !seqs[i].done) members.push_back(i);
    for (size_t i = 0; i < seqs.size() && static_cast<int64_t>(members.size()) < max_batch; ++i) {
      Seq& s = seqs[i];
      if (s.ids[0] >= 0 || s.done || s.join > step) continue;
      for (int k = 0; k < 3; ++k) s.ids[k] = engines[k]->add_sequence();
      members.push_back(i);
    }
    if (members.empty()) {
      if (std::all_of(seqs.begin(), seqs.end(), [](const Seq& s) { return s.done; })) break;
      continue;
    }
    bool pure = true;
    std::vector<double> logits[3];
    std::vector<StepSequence> batch[3];
    for (int k = 0; k < 3; ++k) {
      for (const size_t i : members) {
        const Seq& s = seqs[i];
        if (!s.prefilled)
          batch[k].push_back(
              {.seq = s.ids[k], .tokens = std::span<const int32_t>(s.tokens), .logits = LogitRows::kLast});
        else batch[k].push_back({.seq = s.ids[k], .tokens = std::span<const int32_t>(&s.tokens.back(), 1)});
        pure = pure && batch[k].back().tokens.size() == 1;  // a one-token prompt is a decode step to the engine
      }
      logits[k] = host_logits(be, engines[k]->step({}, batch[k]).logits);
    }
    ++r.steps;
    r.max_batch_seen = std::max(r.max_batch_seen, static_cast<int64_t>(members.size()));
    if (pure) {
      ++r.pure_steps;
      int64_t bucket = 1;
      while (bucket < static_cast<int64_t>(members.size())) bucket *= 2;
      r.buckets.insert(std::min(bucket, max_batch));
      ++r.bucket_steps[std::min(bucket, max_batch)];
    }
    // One logit row per member, in order.
    for (size_t m = 0; m < members.size(); ++m) {
      const auto row = [&](int k) { return logits[k].begin() + static_cast<int64_t>(m) * V; };
      ++r.rows;
      if (!std::equal(row(0), row(0) + V, row(1))) {
        if (r.mismatched_rows++ == 0) r.first_mismatch = "step " + std::to_string(step) + " row " + std::to_string(m);
      }
      double num = 0.0, den = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        num += (row(0)[v] - row(2)[v]) * (row(0)[v] - row(2)[v]);
        den += row(2)[v] * row(2)[v];
      }
      r.worst_vs_unpadded = std::max(r.worst_vs_unpadded, std::sqrt(num / std::max(den, 1e-300)));
      Seq& s = seqs[members[m]];
      const auto best = std::max_element(row(1), row(1) + V) - row(1);  // e's greedy token, fed to all three
      s.tokens.push_back(static_cast<int32_t>(best));
      if (s.prefilled) ++s.decoded;
      s.prefilled = true;
      if (s.decoded >= s.gen) {
        s.done = true;
        for (int k = 0; k < 3; ++k) engines[k]->release(s.ids[k]);
      }
    }
  }
  return r;
}

}  // namespace diffmoe::serve::test
