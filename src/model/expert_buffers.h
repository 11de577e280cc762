// The buffers of expert-parallel MoE layers whose sizes depend on the routing (docs/model.md §12,
// docs/parallelism.md): the (token, rank) pairs this rank receives and the expert rows they expand
// to. Dropless routing bounds them only by EP·N·K, so instead of planning for the worst case they
// are sized to what the run has needed so far and grown when a micro-batch needs more — before the
// layer writes anything into them, so nothing saved is lost (a CUDA allocation then waits for the
// device once). Each MoE layer keeps its own saved buffers (the backward reads them); the backward
// scratch is shared by all layers, and so are the buffers the recompute mode (model/recompute.h)
// has the backward recompute: `moe` shares a, b, h (recomputed from the kept x_perm), `full` also
// x_perm and y_perm (recomputed from the block's input through the recorded dispatch), so a layer
// keeps only its routing plan ([pairs, K] and [rows] indices and weights, no D- or I-wide rows).
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/expert_exchange.h"
#include "model/precision_plan.h"
#include "model/recompute.h"

namespace diffmoe {

// One MoE layer's last forward: the pairs sent to and received from each peer, and the expert rows
// they expanded to here (host values: the backward runs the same exchanges in reverse).
struct EpTraffic {
  RowBlocks send, recv;
  int64_t rows = 0;
};

class ExpertBuffers {
 public:
  // tokens: N of a micro-batch on this rank; ep_size: ranks of the EP group; recompute: the model's
  // mode (which buffers are per layer and which shared).
  ExpertBuffers(const ModelConfig& cfg, const PrecisionPlan& plan, Recompute recompute, int64_t ep_size, int64_t tokens,
                Backend& be);

  // Bytes the buffers take for `pairs` received pairs and `rows` expert rows per layer (every MoE
  // layer's saved buffers and the shared ones), without allocating: `diffmoe plan`. The
  // constructor starts at the balanced routing's sizes, initial_pairs() and initial_rows().
  static size_t bytes_for(const ModelConfig& cfg, const PrecisionPlan& plan, Recompute recompute, int64_t pairs,
                          int64_t rows);
  // Whether the mode has the backward recompute the buffer `name` into the shared set.
  static bool recomputed(Recompute recompute, std::string_view name);
  static int64_t initial_pairs(const ModelConfig& cfg, int64_t ep_size, int64_t tokens);
  static int64_t initial_rows(const ModelConfig& cfg, int64_t tokens);

  EpTraffic& traffic(int64_t layer) { return layers_[index(layer)].traffic; }
  // Room for `pairs` received pairs and `rows` expert rows in the layer's buffers and the shared
  // ones. The shared set grows to the largest layer's need, so a layer's backward (which runs after
  // every layer's forward) always finds room for what it recomputes.
  // ctx: the stream the model runs on (it drains before old buffers are freed).
  void ensure(Context ctx, int64_t layer, int64_t pairs, int64_t rows);
  // The layer's buffers ("recv_idx", "recv_w", "slot_pos" [pairs, K]; "offsets" [E_l + 1];
  // "src_row" [rows]; "x_perm", "y_perm" [rows, D]; "a", "b", "h" [rows, I]): its own where the mode
  // keeps them, else the shared one every layer recomputes into; and the shared scratch ("x_recv",
  // "dy_recv", "y_recv", "dx_recv" [pairs, D]; "dtw" [pairs, K]; "dy_perm", "dx_perm" [rows, D];
  // "dh", "da", "db" [rows, I]), as full-capacity views: take .rows(0, n) of them.
  Tensor saved(int64_t layer, const std::string& name) const;
  Tensor scratch(const std::string& name) const;
  size_t bytes() const;  // all of it, now

 private:
  struct Layer {
    EpTraffic traffic;
    Arena saved;
    int64_t cap_pairs = 0, cap_rows = 0;
  };
  size_t index(int64_t layer) const;
  // The buffers of one layer that the mode keeps (per layer), or those it recomputes (shared = true).
  static Arena plan_saved(const ModelConfig& c, const PrecisionPlan& plan, Recompute recompute, bool shared,
                          int64_t pairs, int64_t rows);
  // The shared set: the backward scratch and the recomputed buffers.
  static Arena plan_scratch(const ModelConfig& c, const PrecisionPlan& plan, Recompute recompute, int64_t pairs,
                            int64_t rows);

  const ModelConfig* cfg_;
  const PrecisionPlan* plan_;
  Recompute recompute_;
  Backend* be_;
  std::vector<Layer> layers_;
  Arena scratch_;
  int64_t scratch_pairs_ = 0, scratch_rows_ = 0;
};

}  // namespace diffmoe
