// The one place that decides, for a precision mode, the dtype and storage of every parameter copy,
// gradient and activation of the model (docs/model.md §7). Layers never ask a backend which dtype to use:
// they plan each activation through the plan with the ROLE the tensor plays (who writes it, who
// reads it), and the plan's table maps role -> dtype for the mode. The table of every planned
// activation (name, shape, dtype, role, storage) is kept, so tools can print it and tests can
// check that a mode plans what docs/model.md §7 says.
//
// Modes (train.precision):
//   f32   every tensor in the float type (f32; f64 for the CPU gradient checks): the reference.
//   bf16  (alias bf16_gemm) GEMMs on bf16 operands with f32 accumulation; bf16 weight copies of the
//         f32 masters; bf16 activations where only GEMMs read them or a GEMM writes them for
//         element-wise ops; f32 masters, gradients, moments, residual stream, norm statistics,
//         softmax, router, λ and loss.
//   fp8   the bf16 column plus the DeepSeek-V3 FP8 recipe (docs/model.md §7, docs/derivations.md §6): the
//         Linears whose weight is fp8_weight() run Fprop, Dgrad and Wgrad as fp8_gemm on e4m3
//         operands (1×128 activation tiles, 128×128 weight blocks, 128×1 Wgrad tiles); every other
//         tensor and GEMM is planned exactly as in bf16, but for the compute weights of those
//         Linears on one data-parallel rank: f32, their own masters (compute_dtype).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/arena.h"
#include "model/parameters.h"

namespace diffmoe {

enum class Precision : uint8_t { kF32, kBF16, kFP8 };

// "f32" | "bf16" | "bf16_gemm" (the same mode) | "fp8". Anything else throws naming `key`.
Precision parse_precision(std::string_view s, std::string_view key);
std::string_view precision_name(Precision p);

// What role an activation plays decides its dtype (docs/model.md §7).
enum class ActRole : uint8_t {
  kFloat,        // full precision: residual stream, norm statistics, router, softmax, λ, losses
  kGemmOperand,  // written once, read only by GEMMs (norm outputs for projections, SwiGLU h, gathered
                 // expert rows, gradients that only feed backward GEMMs): rounded once by its writer
  kGemmOutput,   // written by a GEMM's epilogue and read only by element-wise ops (SwiGLU a, b, dh,
                 // the experts' y and dx rows, the logits): rounded once by the GEMM, as autocast does
  kAttention,    // q, k, v, dq, dk, dv: read or written only by the attention core, RoPE and the MLA split
  kIndex,        // i32 indices and counts (routing plans); the same in every mode
  kFp8Data,      // e4m3 codes of an FP8 operand (the fp8 mode's quantised activations and weight blocks)
  kFp8Scale,     // their f32 tile scales (op_args.h's FP8 layouts)
};

// How a tensor is stored. Plain: one value per element in its dtype, in bytes of its own. Alias: the
// same, over bytes of another planned view (Arena::alias) that is never live at the same time; it
// adds no bytes to the plan.
enum class Storage : uint8_t { kPlain, kAlias };

class PrecisionPlan {
 public:
  struct Entry {
    std::string name;
    Shape shape;
    DType dtype;
    ActRole role;
    Storage storage;
    std::string alias_of = {};  // kAlias: the view whose bytes it uses
  };

  PrecisionPlan() = default;
  // float_type: f32, or f64 for gradient checks (f64 allows only Precision::kF32).
  PrecisionPlan(Precision mode, DType float_type);

  Precision mode() const { return mode_; }
  DType float_type() const { return float_; }
  // GEMMs read bf16 operands (and weight copies): the backend's GemmPrecision::kBF16. True in the
  // fp8 mode too: it is the bf16 mode wherever a GEMM does not run in FP8.
  bool bf16_gemm() const { return mode_ != Precision::kF32; }
  // The fp8 mode: the Linears of fp8_weight() run their three GEMMs as fp8_gemm.
  bool fp8() const { return mode_ == Precision::kFP8; }
  // Whether the fp8 mode runs the GEMMs of parameter p in FP8 (docs/model.md §7): p is an attention
  // projection, a dense or shared FFN matrix or a routed-expert stack (is_fp8_gemm_weight) and
  // both of its matrix dimensions are multiples of 128 (whole 128×128 weight blocks); other shapes
  // keep the bf16 GEMMs. False outside the fp8 mode.
  bool fp8_weight(const ParamSpec& p) const;

  DType dtype(ActRole role) const;
  // The dtype of a parameter's compute weight, the copy the forward and backward read, where `dp`
  // ranks share (and shard the optimizer state of) the parameter: bf16 for the weights that only
  // GEMMs read as their B operand in the bf16 mode (is_gemm_weight), else the float type. In the fp8
  // mode a weight whose GEMMs all run in FP8 (fp8_weight) keeps the float type where dp = 1: its GEMMs
  // quantise the bf16 rounding of that weight (docs/model.md §7), the same bits as from a bf16 copy,
  // and an f32 compute weight is its own master (no separate one), 4 bytes per element instead of
  // 2 + 4. With dp > 1 the bf16 copy and a 1/dp share of the master take 2 + 4/dp bytes, no more.
  DType compute_dtype(const ParamSpec& p, int64_t dp) const;
  // Masters, gradients and optimizer moments: the float type in every mode.
  DType master_dtype() const { return float_; }

  // Plans `name` in `arena` with the dtype of `role` and records it in the table.
  void add(Arena& arena, const std::string& name, const Shape& shape, ActRole role);
  // The same, unless the arena already has the view (backward scratch shared by all layers of a kind).
  void add_once(Arena& arena, const std::string& name, const Shape& shape, ActRole role);
  // Plans `name` over the bytes of the planned view `of` from byte `offset` on (Arena::alias).
  void alias(Arena& arena, const std::string& name, const Shape& shape, ActRole role, const std::string& of,
             size_t offset);
  const std::vector<Entry>& entries() const { return entries_; }
  void clear_entries() { entries_.clear(); }

 private:
  Precision mode_ = Precision::kF32;
  DType float_ = DType::kF32;
  std::vector<Entry> entries_;
};

// Whether the forward reads parameter p only as the B operand of GEMMs (the weights with a bf16
// compute copy in the bf16 mode): every matrix and expert stack and the head. Not the router gate
// (z = u Eᵀ stays f32, docs/model.md §5) and not the embedding table, which the embedding lookup reads too
// (tied to the head, its GEMM rounds the f32 table as an operand).
bool is_gemm_weight(const ParamSpec& p);

// The GEMM weights the FP8 recipe covers (docs/derivations.md §6.2): attention projections, dense and
// shared FFN matrices, routed-expert stacks. Not the head, the router gate or the embedding.
bool is_fp8_gemm_weight(const ParamSpec& p);

}  // namespace diffmoe
