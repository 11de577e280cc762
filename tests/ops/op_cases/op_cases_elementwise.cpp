// Op cases: SwiGLU, RoPE, cross-entropy and the embedding (forward and backward), the memory-bound ops
// of cuda/swiglu_ops.cu, rope_ops.cu, loss_ops.cu and basic_ops.cu. Method and modes: op_case.h.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "op_case.h"

namespace diffmoe::opcases {
namespace {

// Element-wise ops computed in double and rounded once to f32 on both sides: the same f32 value,
// up to one last-bit difference where the GPU fuses a multiply-add in double.
constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};

// ---------------------------------------------------------------- SwiGLU

// a ~ N(0, 4²) with the extremes every 7th element: e^−a beyond the f32 range (a < −88.7), the zero
// of silu'(a) near −1.27846 (cancellation in 1 + a(1 − σ)), and a large positive a (σ = 1).
Init swiglu_a(int64_t n) {
  return computed([n](uint64_t seed) {
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = 4.0 * normal_at(seed, 0x7e57, static_cast<uint64_t>(i));
    const double special[] = {-85.0, -100.0, -1.27846, -1.2785, -1.275, 120.0, -88.9};
    for (size_t i = 0; i < std::size(special) && static_cast<int64_t>(i * 7) < n; ++i) v[i * 7] = special[i];
    return v;
  });
}

struct SwigluShape {
  int64_t rows, cols;
  int64_t offset;  // 1: unaligned views, the scalar path
  bool bf16_out;   // h, da, db rounded once to bf16 (the expert GEMMs' inputs in the bf16 mode)
  const char* branch;
  bool bench_only = false;
};

OpCase swiglu_case(const SwigluShape& s, uint64_t seed) {
  const Shape shape{s.rows, s.cols};
  const DType out = s.bf16_out ? DType::kBF16 : DType::kF32;
  const auto init = [&](Init i) { return s.bench_only ? tiled(i) : i; };
  OpCase c{.op = "swiglu", .branch = s.branch, .shape = fmt::format("{}x{}", s.rows, s.cols)};
  c.seed = seed;
  c.bench_only = s.bench_only;
  c.tensors = {
      {.name = "a",
       .shape = shape,
       .init = s.bench_only ? tiled(normal(4.0)) : swiglu_a(shape.numel()),
       .offset = s.offset},
      {.name = "b", .shape = shape, .init = init(normal()), .offset = s.offset},
      {.name = "h", .shape = shape, .dtype = out, .role = Role::kOutput, .offset = s.offset},
      {.name = "dh", .shape = shape, .init = init(normal()), .offset = s.offset, .bwd_only = true},
      {.name = "da", .shape = shape, .dtype = out, .role = Role::kOutput, .step = Step::kBwd, .offset = s.offset},
      {.name = "db", .shape = shape, .dtype = out, .role = Role::kOutput, .step = Step::kBwd, .offset = s.offset},
  };
  c.fwd = [](Backend& be, const Tensors& t) { be.swiglu_fwd({}, {.h = t("h"), .a = t("a"), .b = t("b")}); };
  c.bwd = [](Backend& be, const Tensors& t) {
    be.swiglu_bwd({}, {.da = t("da"), .db = t("db"), .dh = t("dh"), .a = t("a"), .b = t("b")});
  };
  c.tol = kRoundOnce;
  c.grads = {{"a", "da"}, {"b", "db"}};
  c.upstream = {{"h", "dh"}};
  if (s.bf16_out) c.no_fd = "bf16 outputs: the f32 cases check the formula, these the rounding";
  return c;
}

// ---------------------------------------------------------------- RoPE

// f32 rotations with the same formula; the GPU may fuse x0·c − x1·s into one FMA (one rounding
// fewer): a last-bit difference relative to |x0·c| + |x1·s| ≈ 1.
constexpr Tol kRopeTol{1e-6, 1e-6, "same f32 formula, FMA contraction"};

struct RopeShape {
  int64_t rows, width, heads, head_stride, col_offset, rope_dim, seq_len, pos_offset;
  const char* branch;
  bool bench_only = false;
};

// cos and sin tables of random angles θ ~ N(0, 2²) (op_args.h RopeArgs: YaRN folded in, any angles).
// Unit-circle values keep repeated calls (the benchmark) bounded: no overflow, no subnormals.
Init rope_table(int64_t n, uint64_t angle_seed, bool sine) {
  return computed([=](uint64_t) {
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const double theta = 2.0 * normal_at(angle_seed, 0xa9, static_cast<uint64_t>(i));
      v[static_cast<size_t>(i)] = sine ? std::sin(theta) : std::cos(theta);
    }
    return v;
  });
}

// In place on x. The backward is the inverse rotation of the upstream gradient (op_args.h RopeArgs):
// dx = copy of dy, rotated by −angle (a rotation's transpose).
OpCase rope_case(const RopeShape& r, uint64_t seed) {
  const auto init = [&](Init i) { return r.bench_only ? tiled(i) : i; };
  const int64_t max_pos = std::max<int64_t>(40, r.pos_offset + r.seq_len);
  OpCase c{.op = "rope",
           .branch = r.branch,
           .shape = fmt::format("{}x{} heads {}/{} cols {}+{}", r.rows, r.width, r.heads, r.head_stride, r.col_offset,
                                r.rope_dim)};
  c.seed = seed;
  c.bench_only = r.bench_only;
  c.tensors = {
      {.name = "x", .shape = Shape{r.rows, r.width}, .role = Role::kUpdate, .init = init(normal())},
      {.name = "cos",
       .shape = Shape{max_pos, r.rope_dim / 2},
       .init = rope_table(max_pos * r.rope_dim / 2, seed, false)},
      {.name = "sin",
       .shape = Shape{max_pos, r.rope_dim / 2},
       .init = rope_table(max_pos * r.rope_dim / 2, seed, true)},
      {.name = "dy", .shape = Shape{r.rows, r.width}, .init = init(normal()), .bwd_only = true},
      {.name = "dx", .shape = Shape{r.rows, r.width}, .role = Role::kOutput, .step = Step::kBwd},
  };
  const auto args = [r](const Tensors& t, const Tensor& x, bool inverse) {
    return RopeArgs{.x = x,
                    .cos = t("cos"),
                    .sin = t("sin"),
                    .n_heads = r.heads,
                    .head_stride = r.head_stride,
                    .col_offset = r.col_offset,
                    .rope_dim = r.rope_dim,
                    .seq_len = r.seq_len,
                    .pos_offset = r.pos_offset,
                    .inverse = inverse};
  };
  c.fwd = [args](Backend& be, const Tensors& t) { be.rope({}, args(t, t("x"), false)); };
  c.bwd = [args](Backend& be, const Tensors& t) {
    be.copy({}, {.dst = t("dx"), .src = t("dy")});
    be.rope({}, args(t, t("dx"), true));
  };
  c.tol = kRopeTol;
  c.grads = {{"x", "dx"}};
  c.upstream = {{"x", "dy"}};
  c.fwd_flops = 0.0;
  return c;
}

// ---------------------------------------------------------------- cross-entropy

// The GPU takes exp in f32 (the CPU in f64) and sums groups of four f32 terms in f32, the groups in
// f64 (≤ 3·2^-24 relative): per-row lse and each probability differ by ~1e-6 relative (f32 rounding
// of z − lse, |z − lse| ≲ 20; the output's f32 products add ~1e-7); the absolute floor 1e-8 is 1e-6
// of grad_scale/valid, for p − 1 near 0.
constexpr Tol kCeTol{1e-5, 1e-8, "f32 exp vs f64 exp, f64 sums"};

struct CeShape {
  int64_t rows, vocab;
  DType valid_type;
  bool bf16_dlogits;
  const char* branch;
  bool bench_only = false;
  bool none_valid = false;  // every target ignored and valid 0: the gradient is 0 (never a division by 0)
};

OpCase cross_entropy_case(const CeShape& s, uint64_t seed) {
  const int64_t N = s.rows, V = s.vocab;
  OpCase c{.op = "cross_entropy",
           .branch = s.branch,
           .shape = fmt::format("{}x{} valid {}", N, V, dtype_name(s.valid_type))};
  c.seed = seed;
  c.bench_only = s.bench_only;
  std::vector<double> targets(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n)  // some ignored (-1)
    targets[static_cast<size_t>(n)] = s.none_valid || n % 5 == 3 || n == 1 ? -1 : static_cast<double>((n * 389) % V);
  c.tensors = {
      {.name = "logits", .shape = Shape{N, V}, .init = s.bench_only ? tiled(normal(3.0)) : normal(3.0)},
      {.name = "targets", .shape = Shape{N}, .dtype = DType::kI32, .init = values(targets)},
      // Both accumulate: the sum of the losses and the count of valid targets over micro-batches.
      {.name = "loss_sum", .shape = Shape{1}, .role = Role::kUpdate, .init = values({1.5})},
      {.name = "valid",
       .shape = Shape{1},
       .dtype = s.valid_type,
       .role = Role::kUpdate,
       .init = values({s.none_valid ? 0.0 : 3.0})},
      {.name = "dlogits",
       .shape = Shape{N, V},
       .dtype = s.bf16_dlogits ? DType::kBF16 : DType::kF32,
       .role = Role::kOutput,
       .step = Step::kBwd},
  };
  constexpr double kGradScale = 0.7;
  c.fwd = [](Backend& be, const Tensors& t) {
    be.cross_entropy_fwd(
        {}, {.loss_sum = t("loss_sum"), .valid = t("valid"), .logits = t("logits"), .targets = t("targets")});
  };
  c.bwd = [](Backend& be, const Tensors& t) {
    be.cross_entropy_bwd({}, {.dlogits = t("dlogits"),
                              .logits = t("logits"),
                              .targets = t("targets"),
                              .valid = t("valid"),
                              .grad_scale = kGradScale});
  };
  c.tol = kCeTol;
  c.tol_of = {{"valid", kExact}};
  // dlogits = grad_scale·∂(loss_sum)/∂logits / valid: the gradient of grad_scale·loss_sum/valid, with
  // valid the count after the forward (an integer, not differentiated).
  c.grads = {{"logits", "dlogits"}};
  c.loss = [](const OpInstance& inst) { return kGradScale * inst.values("loss_sum")[0] / inst.values("valid")[0]; };
  if (s.bf16_dlogits) c.no_fd = "bf16 dlogits: the f32 cases check the formula, this the rounding";
  if (s.none_valid) c.no_fd = "no valid target: the loss is 0/0";
  return c;
}

// ---------------------------------------------------------------- embedding (docs/model.md §1)

// out = scale·table[tokens]; backward dtable += scale·dout (a weight gradient: accumulates). N ≫ V:
// every token id repeats, so the backward adds several rows into each.
OpCase embedding_case(int64_t V, int64_t N, int64_t D, uint64_t seed) {
  OpCase c{.op = "embedding", .branch = "repeated ids", .shape = fmt::format("V{} N{} D{}", V, N, D)};
  c.seed = seed;
  c.tensors = {
      {.name = "table", .shape = Shape{V, D}, .init = normal()},
      {.name = "tokens", .shape = Shape{N}, .dtype = DType::kI32, .init = ints(0, static_cast<int32_t>(V))},
      {.name = "out", .shape = Shape{N, D}, .role = Role::kOutput},
      {.name = "dout", .shape = Shape{N, D}, .init = normal(), .bwd_only = true},
      {.name = "dtable", .shape = Shape{V, D}, .role = Role::kUpdate, .step = Step::kBwd, .init = normal()},
  };
  c.fwd = [](Backend& be, const Tensors& t) {
    be.embedding_fwd({}, {.out = t("out"), .tokens = t("tokens"), .table = t("table"), .scale = 1.7});
  };
  c.bwd = [](Backend& be, const Tensors& t) {
    be.embedding_bwd({}, {.dtable = t("dtable"), .tokens = t("tokens"), .dout = t("dout"), .scale = 1.7});
  };
  // The GPU adds each row's tokens in the CPU's order with the CPU's f64-then-round step.
  c.tol = kRoundOnce;
  c.grads = {{"table", "dtable"}};
  c.upstream = {{"out", "dout"}};
  return c;
}

}  // namespace

std::vector<OpCase> elementwise_cases() {
  std::vector<OpCase> out;
  uint64_t seed = 300;
  // 57·37 = 2109 elements: float4 pieces and a scalar tail.
  for (const SwigluShape& s :
       {SwigluShape{57, 37, 0, false, "vector body, scalar tail"},
        SwigluShape{57, 37, 1, false, "unaligned views: scalar path"}, SwigluShape{57, 37, 0, true, "bf16 out"},
        SwigluShape{65536, 512, 0, false, "vector body (bench preset experts)", true},
        SwigluShape{65536, 512, 0, true, "bf16 out (bench preset experts)", true}})
    out.push_back(swiglu_case(s, seed++));
  // The first two: one pair per thread (column offset 2, width 14); the last two: two pairs per
  // thread (float4 of x; several heads, and one head with an odd head_stride, unused there).
  for (const RopeShape& r : {RopeShape{45, 40, 3, 12, 2, 8, 7, 3, "one pair per thread, 3 heads, positions wrap"},
                             RopeShape{31, 14, 1, 14, 10, 4, 31, 0, "one pair per thread, column offset 10"},
                             RopeShape{45, 48, 3, 16, 4, 8, 7, 3, "two pairs per thread (float4), 3 heads"},
                             RopeShape{31, 36, 1, 3, 32, 4, 31, 0, "two pairs per thread, one head, odd stride"},
                             RopeShape{16384, 1536, 16, 96, 64, 32, 2048, 0, "q, 16 heads (bench preset)", true}})
    out.push_back(rope_case(r, seed++));
  // Every path: the row cached in shared memory (N = 57 rows; V = 1001: element-wise copies and
  // stores, V = 1000: float4 pieces) and streamed from global memory (V = 60000 and 60001 need
  // 240 KB, over the 227 KB of shared memory per block of an H100 or H200; N = 3 rows).
  for (const CeShape& s : {CeShape{57, 1001, DType::kF32, false, "row in shared memory, scalar"},
                           CeShape{57, 1000, DType::kI32, false, "row in shared memory, float4"},
                           CeShape{3, 60000, DType::kF32, false, "row streamed from global memory"},
                           CeShape{3, 60001, DType::kI32, false, "row streamed, scalar tail"},
                           CeShape{57, 1000, DType::kF32, true, "bf16 dlogits"},
                           CeShape{4, 33, DType::kF32, false, "no valid target", false, true},
                           CeShape{4096, 32768, DType::kF32, true, "bf16 dlogits (bench preset head)", true}})
    out.push_back(cross_entropy_case(s, seed++));
  out.push_back(embedding_case(23, 301, 37, seed++));
  return out;
}

}  // namespace diffmoe::opcases
