// What every layer's forward/backward needs: the backend, the stream, the batch shape, the
// parameter/gradient/activation arenas, and the three linear-layer GEMMs (y = x Wᵀ and its two
// backward products) that every layer uses.
#pragma once
#include <string>

#include "backend/backend.h"
#include "model/config.h"
#include "model/expert_buffers.h"
#include "model/expert_exchange.h"
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
  // The plan's bf16 mode: GEMMs read bf16 operands (plan->bf16_gemm()).
  bool bf16_operands = false;
  // beta of the GEMMs that write weight gradients: 1 (accumulate, docs/style.md habit 2), or 0 in the
  // first backward after GradBuffer::zero, where the gradients read as zero and += is =: the GEMM
  // then does not read them, and zero does not fill them either. So each GEMM weight must get
  // exactly one GEMM gradient per backward, before anything else adds to it.
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
  Tensor act(const std::string& name) const { return acts->get(name); }
  // A weight as a GEMM operand: its compute copy (bf16 for GEMM weights in the bf16 mode, docs/model.md §7).
  Tensor weight(const std::string& name) const { return params->get(name); }

  // y = x Wᵀ (+ beta·y)          x [N,in], W [out,in], y [N,out]
  // With an addend r [N,out]: y = x Wᵀ + beta·r, r only read (a residual added by the GEMM itself,
  // GemmArgs::addend, instead of a copy of r into y first).
  void linear(const Tensor& y, const Tensor& x, const Tensor& w, double beta = 0.0, const Tensor& addend = {}) const {
    be->gemm(ctx, {.c = y, .a = x, .b = w, .trans_a = false, .trans_b = true, .alpha = 1.0, .beta = beta, .addend = addend});
  }
  // dx = dy W (+ beta·dx)        dy [N,out], W [out,in], dx [N,in]
  void linear_dx(const Tensor& dx, const Tensor& dy, const Tensor& w, double beta = 0.0) const {
    be->gemm(ctx, {.c = dx, .a = dy, .b = w, .trans_a = false, .trans_b = false, .alpha = 1.0, .beta = beta});
  }
  // dW += dyᵀ x                  weight gradients accumulate (docs/style.md habit 2; dw_beta above)
  void linear_dw(const Tensor& dw, const Tensor& dy, const Tensor& x) const {
    be->gemm(ctx, {.c = dw, .a = dy, .b = x, .trans_a = true, .trans_b = false, .alpha = 1.0, .beta = dw_beta});
  }
  // Both backward products of y = x Wᵀ: dW += dyᵀ x, dx = dy W (+ beta_dx·dx). In the bf16 GEMM
  // mode an f32 dy is rounded to bf16 once for the two GEMMs (each GEMM would round it again).
  void linear_backward(const Tensor& dw, const Tensor& dx, const Tensor& dy, const Tensor& x, const Tensor& w,
                       double beta_dx = 0.0) const {
    const Tensor op = gemm_operand(dy);
    linear_dw(dw, op, x);
    linear_dx(dx, op, w, beta_dx);
  }
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
  Tensor operand_scratch(const Shape& shape) const {
    Tensor op = acts->get("scratch.gemm_operand");
    DIFFMOE_CHECK(shape.numel() <= op.numel(), "[model] a GEMM operand of {} values exceeds scratch.gemm_operand ({})",
                  shape.numel(), op.numel());
    op.shape = shape;
    return op;
  }
};


}  // namespace diffmoe
