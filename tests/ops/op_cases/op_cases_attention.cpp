// Op cases: causal attention, differential and plain, forward and backward (docs/derivations.md §1.3,
// §1.4), at shapes that pick every CUDA kernel family: the flash kernels (flash_attention_ops.cu) at the
// presets' head sizes with T not a multiple of their 64-row tiles, and the simple kernels, the fallback
// for head sizes flash does not cover. Method and modes: op_case.h.
#include <fmt/core.h>

#include "op_case.h"

namespace diffmoe::opcases {
namespace {

// f32 dot products, exp and P·V sums in another order: score errors of a few ulps of |z| are
// amplified by exp, and the differential output cancels (A0V − λA1V), hence rtol 1e-4 with an
// absolute floor of 1e-5 for outputs near zero (values are O(1)).
constexpr Tol kAttnTol{1e-4, 1e-5, "f32 softmax and sums in another order"};
// dλ = −Σ⟨dO, O2⟩: the same f64 reduction of the same inputs on both sides, other order.
constexpr Tol kDlambdaTol{1e-6, 1e-7, "f64 sum of the same products"};

struct AttnShape {
  int64_t B, T, H, dqk, dv;
  bool differential;
  const char* branch;
  bool flash = true;  // the flash kernels cover (d_qk, d_v) (flash_attention.h); else the simple ones
  bool bench_only = false;
};

OpCase attention_case(const AttnShape& a, uint64_t seed) {
  const int64_t B = a.B, T = a.T, H = a.H;
  const Shape qk{B, T, H, a.dqk}, v{B, T, H, a.dv};
  const Shape out_shape = a.differential ? Shape{B, T, H / 2, 2 * a.dv} : Shape{B, T, H, a.dv};
  const auto init = [&](Init i) { return a.bench_only ? tiled(i) : i; };
  OpCase c{.op = a.differential ? "attention_diff" : "attention_plain", .branch = a.branch,
           .shape = fmt::format("B{} T{} H{} d{}/{}", B, T, H, a.dqk, a.dv)};
  c.seed = seed;
  c.bench_only = a.bench_only;
  c.tensors = {
      {.name = "q", .shape = qk, .init = init(normal())},
      {.name = "k", .shape = qk, .init = init(normal())},
      {.name = "v", .shape = v, .init = init(normal())},
      {.name = "out", .shape = out_shape, .role = Role::kOutput},
      {.name = "lse", .shape = Shape{B, H, T}, .role = Role::kOutput},
      {.name = "dout", .shape = out_shape, .init = init(normal()), .bwd_only = true},
      {.name = "dq", .shape = qk, .role = Role::kOutput, .step = Step::kBwd},
      {.name = "dk", .shape = qk, .role = Role::kOutput, .step = Step::kBwd},
      {.name = "dv", .shape = v, .role = Role::kOutput, .step = Step::kBwd},
  };
  if (a.differential) {
    c.tensors.push_back({.name = "lambda", .shape = Shape{1}, .init = values({0.35})});
    c.tensors.push_back({.name = "o2", .shape = out_shape, .role = Role::kOutput});
    c.tensors.push_back({.name = "dlambda", .shape = Shape{1}, .role = Role::kOutput, .step = Step::kBwd});
  }
  constexpr double kScale = 0.4;
  const bool diff = a.differential;
  const auto opt = [diff](const Tensors& t, const char* name) { return diff ? t(name) : Tensor{}; };
  c.fwd = [diff, opt](Backend& be, const Tensors& t) {
    be.attention_fwd({}, {.out = t("out"), .o2 = opt(t, "o2"), .lse = t("lse"), .q = t("q"), .k = t("k"), .v = t("v"),
                          .lambda = opt(t, "lambda"), .scale = kScale, .differential = diff});
  };
  c.bwd = [diff, opt](Backend& be, const Tensors& t) {
    be.attention_bwd({}, {.dq = t("dq"), .dk = t("dk"), .dv = t("dv"), .dlambda = opt(t, "dlambda"), .dout = t("dout"),
                          .q = t("q"), .k = t("k"), .v = t("v"), .out = t("out"), .o2 = opt(t, "o2"), .lse = t("lse"),
                          .lambda = opt(t, "lambda"), .scale = kScale, .differential = diff});
  };
  c.tol = kAttnTol;
  c.tol_of = {{"dlambda", kDlambdaTol}};
  c.grads = {{"q", "dq"}, {"k", "dk"}, {"v", "dv"}};
  if (diff) c.grads.push_back({"lambda", "dlambda"});
  c.upstream = {{"out", "dout"}};
  if (!a.flash)
    c.cuda_nondeterministic = "the simple kernels sum dk and dv with f32 atomics over query rows (cuda_backend.h)";
  // Causal: about half of the T² score and P·V products; the backward does about twice the forward's.
  const double per_pair = static_cast<double>(B * H) * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0;
  c.fwd_flops = 2.0 * per_pair * static_cast<double>(a.dqk + a.dv);
  c.bwd_flops = 2.0 * c.fwd_flops;
  return c;
}

}  // namespace

std::vector<OpCase> attention_cases() {
  std::vector<OpCase> out;
  uint64_t seed = 500;
  const AttnShape shapes[] = {
      {2, 37, 4, 7, 5, true, "simple kernels (head sizes flash does not cover)", false},
      {2, 37, 3, 7, 5, false, "simple kernels (head sizes flash does not cover)", false},
      {1, 19, 2, 96, 64, true, "flash: T shorter than a tile"},
      // The flash kernels at every covered head size of the presets (d_qk 32, 48, 96, 128; d_v 32, 64),
      // with T not a multiple of the 64-row tiles, shorter than one tile and exactly two tiles; B > 1.
      {2, 150, 4, 32, 32, true, "flash: T not a tile multiple"},
      {2, 150, 2, 32, 32, false, "flash: T not a tile multiple"},
      {1, 77, 2, 48, 32, true, "flash: T not a tile multiple"},
      {2, 65, 3, 48, 64, false, "flash: one row past a tile"},
      {2, 130, 4, 96, 64, true, "flash: T not a tile multiple"},
      {1, 128, 2, 96, 64, false, "flash: exactly two tiles"},
      {1, 100, 2, 128, 64, true, "flash: T not a tile multiple"},
      {2, 33, 2, 128, 32, false, "flash: T shorter than a tile"},
      {3, 1, 2, 96, 64, true, "flash: one position"},
      {1, 64, 2, 32, 64, false, "flash: exactly one tile"},
      {2, 99, 4, 48, 32, true, "flash: T not a tile multiple"},
      {1, 301, 2, 96, 64, true, "flash: five tiles, partial"},
      {8, 2048, 16, 96, 64, true, "flash (bench preset)", true, true},
  };
  for (const AttnShape& a : shapes) out.push_back(attention_case(a, seed++));
  return out;
}

}  // namespace diffmoe::opcases
