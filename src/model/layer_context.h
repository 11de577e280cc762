// What every layer's forward/backward needs: the backend, the stream, the batch shape, the
// parameter/gradient/activation arenas, and the three linear-layer GEMMs (y = x Wᵀ and its two
// backward products) that every layer uses.
#pragma once
#include <string>

#include "backend/backend.h"
#include "model/config.h"
#include "model/expert_buffers.h"
#include "model/expert_exchange.h"
#include "model/fp8_weights.h"
#include "model/grad_buffer.h"
#include "model/layout_buffers.h"
#include "model/precision_plan.h"

namespace diffmoe {

struct LayerContext {
  Backend* be = nullptr;
  Context ctx;
  const ModelConfig* cfg = nullptr;
  DType dtype = DType::kF32;  // the float type: masters, gradients, full-precision activations
  int64_t batch = 0, seq = 0;
  const LayoutBuffers* params = nullptr;  // compute weights by docs/model.md §8 name (+ the balancing biases)
  const GradBuffer* grads = nullptr;      // same names, trainable parameters only
  Arena* acts = nullptr;                  // activations saved for the backward, and backward scratch
  const PrecisionPlan* plan = nullptr;    // every tensor's dtype (docs/model.md §7)
  // The plan's bf16 mode: GEMMs read bf16 operands (plan->bf16_gemm(); also in the fp8 mode).
  bool bf16_operands = false;
  // The fp8 mode: the FP8 copies of the weights whose GEMMs run in FP8 (docs/model.md §7), quantised
  // for the current weights; null in the other modes. linear(), linear_dx(), linear_dw(),
  // linear_backward(), grouped_gemm() and grouped_gemm_wgrad() take the FP8 path for these weights.
  const Fp8WeightTable* fp8 = nullptr;
  // beta of the GEMMs that write weight gradients: 1 (accumulate, docs/style.md habit 2), or 0 in the
  // first backward after GradBuffer::zero, where the gradients read as zero and += is =: the GEMM
  // then does not read them, and zero does not fill them either. So each GEMM weight must get
  // exactly one GEMM gradient per backward, before anything else adds to it. With ZeRO-2 slots
  // (GradBuffer) every backward writes a slotted gradient anew: the GEMMs take dw_beta_for(dw), the
  // beta of that one gradient.
  double dw_beta = 1.0;
  // Expert parallelism (docs/model.md §12): the EP group's exchange and the routing-sized buffers; null when
  // the experts are not split (one rank holds them all).
  ExpertExchange* ep = nullptr;
  ExpertBuffers* ep_buffers = nullptr;
  // [1]: the expert stacks' weight-gradient GEMMs add the Σg² of what they store here
  // (GroupedGemmWgradArgs::sum_sq; Model::grad_sq_parts). Undefined: not wanted.
  Tensor expert_grad_sq = {};

  int64_t tokens() const { return batch * seq; }
  Tensor param(const std::string& name) const { return params->get(name); }
  Tensor grad(const std::string& name) const { return grads->get(name); }
  double dw_beta_for(const Tensor& dw) const { return grads != nullptr && grads->gemm_beta(dw) == 0.0 ? 0.0 : dw_beta; }
  Tensor act(const std::string& name) const { return acts->get(name); }
  // A weight as a GEMM operand: its compute copy (bf16 for GEMM weights in the bf16 mode, docs/model.md §7).
  Tensor weight(const std::string& name) const { return params->get(name); }

  // The FP8 copies of w when its GEMMs run in FP8, else null.
  const Fp8Weight* fp8_weight(const Tensor& w) const {
    if (fp8 == nullptr) return nullptr;
    const auto it = fp8->find(w.data);
    return it == fp8->end() ? nullptr : &it->second;
  }

  // y = x Wᵀ (+ beta·y)          x [N,in], W [out,in], y [N,out]
  // With an addend r [N,out]: y = x Wᵀ + beta·r, r only read (a residual added by the GEMM itself,
  // GemmArgs::addend, instead of a copy of r into y first). FP8 weights: Fprop (fp8_linear.cpp).
  void linear(const Tensor& y, const Tensor& x, const Tensor& w, double beta = 0.0, const Tensor& addend = {}) const;
  // dx = dy W (+ beta·dx)        dy [N,out], W [out,in], dx [N,in]. FP8 weights: Dgrad.
  void linear_dx(const Tensor& dx, const Tensor& dy, const Tensor& w, double beta = 0.0) const;
  // dW += dyᵀ x                  weight gradients accumulate (docs/style.md habit 2; dw_beta above).
  // w: the weight (its FP8 copies decide the path: Wgrad on 128×1 tiles of dy and x).
  void linear_dw(const Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w) const;
  // Both backward products of y = x Wᵀ: dW += dyᵀ x, dx = dy W (+ beta_dx·dx). In the bf16 GEMM
  // mode an f32 dy is rounded to bf16 once for the two GEMMs (each GEMM would round it again); for
  // an FP8 weight dy is quantised once into both of its FP8 copies.
  void linear_backward(const Tensor& dw, const Tensor& dx, const Tensor& dy, const Tensor& x, const Tensor& w,
                       double beta_dx = 0.0) const;
  // Two Linears of one input (W1 and W3 of a SwiGLU FFN): y1 = x W1ᵀ, y2 = x W2ᵀ. For FP8 weights x
  // is quantised once for both (else as two linear() calls).
  void linear_pair(const Tensor& y1, const Tensor& w1, const Tensor& y2, const Tensor& w2, const Tensor& x) const;
  // The backward of linear_pair: dW1 += dy1ᵀ x, dW2 += dy2ᵀ x, dx = dy1 W1 + dy2 W2 (+ beta_dx·dx), the
  // two products into dx in that order. For FP8 weights x's transposed copy is quantised once, and each
  // dy once into both of its copies (else as linear_dw, linear_dw, linear_dx, linear_dx).
  void linear_backward_pair(const Tensor& dw1, const Tensor& dy1, const Tensor& w1, const Tensor& dw2,
                            const Tensor& dy2, const Tensor& w2, const Tensor& dx, const Tensor& x,
                            double beta_dx = 0.0) const;
  // The experts' grouped GEMMs (GroupedGemmArgs, GroupedGemmWgradArgs): an FP8 stack b (wgrad: the
  // stack w whose gradient is a.c) takes the grouped FP8 ops (fp8_grouped_gemm, fp8_grouped_gemm_wgrad),
  // else the backend's grouped op.
  void grouped_gemm(const GroupedGemmArgs& a) const;
  void grouped_gemm_wgrad(const GroupedGemmWgradArgs& a, const Tensor& w) const;
  // Two grouped Fprops of one A (the experts' W1 and W3 stacks; a1, a2 alike but for c and b): for FP8
  // stacks A is quantised once (else as two grouped_gemm() calls).
  void grouped_gemm_pair(const GroupedGemmArgs& a1, const GroupedGemmArgs& a2) const;
  // The experts' backward through one stack w (W2): the weight gradient wg (wg.a = dy) and the Dgrad dg of
  // the same dy (dg.a = wg.a, one term). For an FP8 stack one act_quant pass writes both of dy's copies
  // (else as grouped_gemm_wgrad(wg, w), grouped_gemm(dg)).
  void grouped_backward(const GroupedGemmWgradArgs& wg, const Tensor& w, const GroupedGemmArgs& dg) const;
  // Through two stacks of one input (W1, W3): the weight gradients wg1, wg2 (sharing B = x) and the two-term
  // Dgrad dg (dg.a = wg1.a, dg.a2 = wg2.a). For FP8 stacks x's grouped transposed copy is quantised once, and
  // each dy in one pass into both of its copies (else as grouped_gemm_wgrad(wg1, w1), grouped_gemm_wgrad(wg2,
  // w2), grouped_gemm(dg)).
  void grouped_backward_pair(const GroupedGemmWgradArgs& wg1, const Tensor& w1, const GroupedGemmWgradArgs& wg2,
                             const Tensor& w2, const GroupedGemmArgs& dg) const;
  // t as a GEMM operand read more than once: in the bf16 GEMM mode an f32 t rounded to bf16 into
  // the shared scratch "scratch.gemm_operand" (valid until the next call), else t itself.
  Tensor gemm_operand(const Tensor& t) const {
    if (!bf16_operands || t.dtype != DType::kF32) return t;
    const Tensor op = operand_scratch(t.shape);
    be->copy(ctx, {.dst = op, .src = t});
    return op;
  }
  // The shared bf16 scratch "scratch.gemm_operand" viewed as `shape` (bf16 GEMM mode only): for an
  // op that writes a GEMM operand's bf16 copy itself (e.g. RmsNormBwdArgs::dx16). Valid until the
  // next gemm_operand or operand_scratch call.
  Tensor operand_scratch(const Shape& shape) const { return scratch("scratch.gemm_operand", shape); }
  // The flat scratch view `name` viewed as `shape` (its first shape.numel() elements).
  Tensor scratch(const std::string& name, const Shape& shape) const {
    Tensor op = acts->get(name);
    DIFFMOE_CHECK(shape.numel() <= op.numel(), "[model] a view of {} values exceeds {} ({})", shape.numel(), name,
                  op.numel());
    op.shape = shape;
    return op;
  }
};

}  // namespace diffmoe
