#include "model/precision_plan.h"

#include "backend/op_args.h"
#include "core/error.h"

namespace diffmoe {

Precision parse_precision(std::string_view s, std::string_view key) {
  if (s == "f32") return Precision::kF32;
  if (s == "bf16" || s == "bf16_gemm") return Precision::kBF16;
  if (s == "fp8") return Precision::kFP8;
  DIFFMOE_FAIL("{}: expected f32, bf16 (bf16_gemm) or fp8, got '{}'", key, s);
}

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::kF32: return "f32";
    case Precision::kBF16: return "bf16";
    case Precision::kFP8: return "fp8";
  }
  return "?";
}

PrecisionPlan::PrecisionPlan(Precision mode, DType float_type) : mode_(mode), float_(float_type) {
  DIFFMOE_CHECK(float_type == DType::kF32 || float_type == DType::kF64,
                "[precision] float type must be f32 or f64, got {}", dtype_name(float_type));
  DIFFMOE_CHECK(mode == Precision::kF32 || float_type == DType::kF32,
                "[precision] the {} mode needs f32 parameters (f64 is for gradient checks in the f32 mode)",
                precision_name(mode));
}

DType PrecisionPlan::dtype(ActRole role) const {
  switch (role) {
    case ActRole::kFloat: return float_;
    case ActRole::kGemmOperand:
    case ActRole::kGemmOutput:
    case ActRole::kAttention: return bf16_gemm() ? DType::kBF16 : float_;
    case ActRole::kIndex: return DType::kI32;
    case ActRole::kFp8Data: return DType::kF8E4M3;
    case ActRole::kFp8Scale: return DType::kF32;
  }
  return float_;
}

bool is_gemm_weight(const ParamSpec& p) {
  return p.kind == ParamKind::kMatrix || p.kind == ParamKind::kExpert || p.kind == ParamKind::kHead;
}

bool is_fp8_gemm_weight(const ParamSpec& p) { return p.kind == ParamKind::kMatrix || p.kind == ParamKind::kExpert; }

bool PrecisionPlan::fp8_weight(const ParamSpec& p) const {
  if (!fp8() || !is_fp8_gemm_weight(p) || p.shape.rank() < 2) return false;
  return p.shape[-1] % kFp8Tile == 0 && p.shape[-2] % kFp8Tile == 0;
}

DType PrecisionPlan::compute_dtype(const ParamSpec& p, int64_t dp) const {
  if (fp8_weight(p) && dp == 1) return float_;
  return bf16_gemm() && is_gemm_weight(p) ? DType::kBF16 : float_;
}

void PrecisionPlan::add(Arena& arena, const std::string& name, const Shape& shape, ActRole role) {
  const DType t = dtype(role);
  arena.add(name, shape, t);
  entries_.push_back(Entry{.name = name, .shape = shape, .dtype = t, .role = role, .storage = Storage::kPlain});
}

void PrecisionPlan::alias(Arena& arena, const std::string& name, const Shape& shape, ActRole role,
                          const std::string& of, size_t offset) {
  const DType t = dtype(role);
  arena.alias(name, shape, t, of, offset);
  entries_.push_back(
      Entry{.name = name, .shape = shape, .dtype = t, .role = role, .storage = Storage::kAlias, .alias_of = of});
}

void PrecisionPlan::add_once(Arena& arena, const std::string& name, const Shape& shape, ActRole role) {
  if (!arena.has(name)) add(arena, name, shape, role);
}

}  // namespace diffmoe
