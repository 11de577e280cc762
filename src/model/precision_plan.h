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
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/arena.h"
#include "model/parameters.h"

namespace diffmoe {

enum class Precision : uint8_t { kF32, kBF16 };

// "f32" | "bf16" | "bf16_gemm" (the same mode). Anything else throws naming `key`.
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
};

// How a tensor is stored. Plain: one value per element in its dtype.
enum class Storage : uint8_t { kPlain };

class PrecisionPlan {
 public:
  struct Entry {
    std::string name;
    Shape shape;
    DType dtype;
    ActRole role;
    Storage storage;
  };

  PrecisionPlan() = default;
  // float_type: f32, or f64 for gradient checks (f64 allows only Precision::kF32).
  PrecisionPlan(Precision mode, DType float_type);

  Precision mode() const { return mode_; }
  DType float_type() const { return float_; }
  // GEMMs read bf16 operands (and weight copies): the backend's GemmPrecision::kBF16.
  bool bf16_gemm() const { return mode_ == Precision::kBF16; }

  DType dtype(ActRole role) const;
  // The dtype the forward and backward read a parameter in: bf16 for the weights that only GEMMs
  // read as their B operand in the bf16 mode (ParamSpec::gemm_weight), else the float type.
  DType compute_dtype(const ParamSpec& p) const;
  // Masters, gradients and optimizer moments: the float type in every mode.
  DType master_dtype() const { return float_; }

  // Plans `name` in `arena` with the dtype of `role` and records it in the table.
  void add(Arena& arena, const std::string& name, const Shape& shape, ActRole role);
  // The same, unless the arena already has the view (backward scratch shared by all layers of a kind).
  void add_once(Arena& arena, const std::string& name, const Shape& shape, ActRole role);
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

}  // namespace diffmoe
