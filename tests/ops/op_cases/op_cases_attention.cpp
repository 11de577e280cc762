// Op cases: the MLA key/value split and the differential λ (docs/derivations.md §1.2, §2.5) and causal
// attention, differential and plain, forward and backward (docs/derivations.md §1.3, §1.4), at shapes that pick every
// CUDA kernel family: the flash kernels (flash_attention_ops.cu) at the presets' head sizes with T not a multiple of
// their 64-row tiles, and the simple kernels, the fallback for head sizes flash does not cover. Method and modes:
// op_case.h.
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
  OpCase c{.op = a.differential ? "attention_diff" : "attention_plain",
           .branch = a.branch,
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
    be.attention_fwd({}, {.out = t("out"),
                          .o2 = opt(t, "o2"),
                          .lse = t("lse"),
                          .q = t("q"),
                          .k = t("k"),
                          .v = t("v"),
                          .lambda = opt(t, "lambda"),
                          .scale = kScale,
                          .differential = diff});
  };
  c.bwd = [diff, opt](Backend& be, const Tensors& t) {
    be.attention_bwd({}, {.dq = t("dq"),
                          .dk = t("dk"),
                          .dv = t("dv"),
                          .dlambda = opt(t, "dlambda"),
                          .dout = t("dout"),
                          .q = t("q"),
                          .k = t("k"),
                          .v = t("v"),
                          .out = t("out"),
                          .o2 = opt(t, "o2"),
                          .lse = t("lse"),
                          .lambda = opt(t, "lambda"),
                          .scale = kScale,
                          .differential = diff});
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

// Sizes not multiples of 4: the element-wise path; multiples of 4 (as the presets' 64/32/64 with kr in
// columns [256, 288) of 288): float4 pieces, more than one row per block.
struct KvSplitShape {
  int64_t N, H, dn, dr, dv, kr_stride, kr_offset;
  const char* branch;
  bool bench_only = false;
};

OpCase kv_split_case(const KvSplitShape& s, uint64_t seed) {
  const auto init = [&](Init i) { return s.bench_only ? tiled(i) : i; };
  OpCase c{.op = "mla_kv_split",
           .branch = s.branch,
           .shape = fmt::format("N{} H{} d{}+{}/{} kr {}@{}", s.N, s.H, s.dn, s.dr, s.dv, s.kr_offset, s.kr_stride)};
  c.seed = seed;
  c.bench_only = s.bench_only;
  const Shape kv{s.N, s.H * (s.dn + s.dv)}, kr{s.N, s.kr_stride}, k{s.N, s.H, s.dn + s.dr}, v{s.N, s.H, s.dv};
  c.tensors = {
      {.name = "kv", .shape = kv, .init = init(normal())},
      {.name = "kr", .shape = kr, .init = init(normal())},
      {.name = "k", .shape = k, .role = Role::kOutput},
      {.name = "v", .shape = v, .role = Role::kOutput},
      {.name = "dk", .shape = k, .init = init(normal()), .bwd_only = true},
      {.name = "dv", .shape = v, .init = init(normal()), .bwd_only = true},
      {.name = "dkv", .shape = kv, .role = Role::kOutput, .step = Step::kBwd},
      // Columns outside [kr_offset, kr_offset + d_rope) must stay.
      {.name = "dkr", .shape = kr, .role = Role::kUpdate, .step = Step::kBwd, .init = init(normal())},
  };
  c.fwd = [s](Backend& be, const Tensors& t) {
    be.mla_kv_split_fwd({}, {.k = t("k"),
                             .v = t("v"),
                             .kv = t("kv"),
                             .kr = t("kr"),
                             .n_heads = s.H,
                             .d_nope = s.dn,
                             .d_rope = s.dr,
                             .d_v = s.dv,
                             .kr_stride = s.kr_stride,
                             .kr_offset = s.kr_offset});
  };
  c.bwd = [s](Backend& be, const Tensors& t) {
    be.mla_kv_split_bwd({}, {.dkv = t("dkv"),
                             .dkr = t("dkr"),
                             .dk = t("dk"),
                             .dv = t("dv"),
                             .n_heads = s.H,
                             .d_nope = s.dn,
                             .d_rope = s.dr,
                             .d_v = s.dv,
                             .kr_stride = s.kr_stride,
                             .kr_offset = s.kr_offset});
  };
  c.tol = kExact;  // moves; dkr: an f32 sum over heads in order on both sides
  c.grads = {{"kv", "dkv"}, {"kr", "dkr"}};
  c.upstream = {{"k", "dk"}, {"v", "dv"}};
  return c;
}

// λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init (docs/derivations.md §1.2) and its backward into the four
// vectors (weight gradients: accumulate).
OpCase diff_lambda_case(int64_t d, uint64_t seed) {
  OpCase c{.op = "diff_lambda", .branch = "one block", .shape = fmt::format("d{}", d)};
  c.seed = seed;
  c.tensors = {
      {.name = "lq1", .shape = Shape{d}, .init = normal(0.3)},
      {.name = "lk1", .shape = Shape{d}, .init = normal(0.3)},
      {.name = "lq2", .shape = Shape{d}, .init = normal(0.3)},
      {.name = "lk2", .shape = Shape{d}, .init = normal(0.3)},
      {.name = "lambda", .shape = Shape{1}, .role = Role::kOutput},
      {.name = "dlambda", .shape = Shape{1}, .init = values({-1.3}), .bwd_only = true},
  };
  for (const char* g : {"dlq1", "dlk1", "dlq2", "dlk2"})
    c.tensors.push_back({.name = g, .shape = Shape{d}, .role = Role::kUpdate, .step = Step::kBwd, .init = normal()});
  c.fwd = [](Backend& be, const Tensors& t) {
    be.diff_lambda_fwd({}, {.lambda = t("lambda"),
                            .lq1 = t("lq1"),
                            .lk1 = t("lk1"),
                            .lq2 = t("lq2"),
                            .lk2 = t("lk2"),
                            .lambda_init = 0.2});
  };
  c.bwd = [](Backend& be, const Tensors& t) {
    be.diff_lambda_bwd({}, {.dlq1 = t("dlq1"),
                            .dlk1 = t("dlk1"),
                            .dlq2 = t("dlq2"),
                            .dlk2 = t("dlk2"),
                            .dlambda = t("dlambda"),
                            .lq1 = t("lq1"),
                            .lk1 = t("lk1"),
                            .lq2 = t("lq2"),
                            .lk2 = t("lk2")});
  };
  c.tol = Tol{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};
  c.grads = {{"lq1", "dlq1"}, {"lk1", "dlk1"}, {"lq2", "dlq2"}, {"lk2", "dlk2"}};
  c.upstream = {{"lambda", "dlambda"}};
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
  for (const KvSplitShape& k : {KvSplitShape{13, 3, 4, 2, 5, 9, 6, "element-wise (sizes not multiples of 4)"},
                                KvSplitShape{37, 3, 8, 4, 12, 20, 16, "float4 pieces"},
                                KvSplitShape{16384, 16, 64, 32, 64, 288, 256, "float4 pieces (bench preset)", true}})
    out.push_back(kv_split_case(k, seed++));
  out.push_back(diff_lambda_case(7, seed++));
  return out;
}

}  // namespace diffmoe::opcases
