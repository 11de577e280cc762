#include "model/precision_plan.h"

#include "core/error.h"

namespace diffmoe {

Precision parse_precision(std::string_view s, std::string_view key) {
  if (s == "f32") return Precision::kF32;
  if (s == "bf16" || s == "bf16_gemm") return Precision::kBF16;
  DIFFMOE_FAIL("{}: expected f32 or bf16 (bf16_gemm), got '{}'", key, s);
}

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::kF32:
      return "f32";
    case Precision::kBF16:
      return "bf16";
  }
  return "?";
}

PrecisionPlan::PrecisionPlan(Precision mode, DType float_type) : mode_(mode), float_(float_type) {
  DIFFMOE_CHECK(float_type == DType::kF32 || float_type == DType::kF64, "[precision] float type must be f32 or f64, got {}",
                dtype_name(float_type));
  DIFFMOE_CHECK(mode == Precision::kF32 || float_type == DType::kF32,
                "[precision] the {} mode needs f32 parameters (f64 is for gradient checks in the f32 mode)", precision_name(mode));
}

DType PrecisionPlan::dtype(ActRole role) const {
  switch (role) {
    case ActRole::kFloat:
      return float_;
    case ActRole::kGemmOperand:
    case ActRole::kGemmOutput:
    case ActRole::kAttention:
      return mode_ == Precision::kBF16 ? DType::kBF16 : float_;
    case ActRole::kIndex:
      return DType::kI32;
  }
  return float_;
}

bool is_gemm_weight(const ParamSpec& p) {
  return p.kind == ParamKind::kMatrix || p.kind == ParamKind::kExpert || p.kind == ParamKind::kHead;
}

DType PrecisionPlan::compute_dtype(const ParamSpec& p) const {
  return mode_ == Precision::kBF16 && is_gemm_weight(p) ? DType::kBF16 : float_;
}

void PrecisionPlan::add(Arena& arena, const std::string& name, const Shape& shape, ActRole role) {
  const DType t = dtype(role);
  arena.add(name, shape, t);
  entries_.push_back(Entry{.name = name, .shape = shape, .dtype = t, .role = role, .storage = Storage::kPlain});
}

void PrecisionPlan::add_once(Arena& arena, const std::string& name, const Shape& shape, ActRole role) {
  if (!arena.has(name)) add(arena, name, shape, role);
}

}  // namespace diffmoe
