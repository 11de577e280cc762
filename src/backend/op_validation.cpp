// Shared argument validation (op_validation.h). The checks and their messages are those the CPU
// reference backend always made; they live here so that the CUDA backend rejects exactly the same
// calls. Order matters only for which message a call with several faults gets: it follows the CPU
// ops' original order.
#include "backend/op_validation.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

namespace diffmoe {

namespace {

// ---------------------------------------------------------------- helpers shared by several ops

void expect_tensor(const Tensor& t, const Shape& shape, DType dtype, Device dev, std::string_view op,
                   std::string_view name) {
  check_device(t, dev, op, name);
  check_shape(t, shape, op, name);
  check_dtype(t, dtype, op, name);
}

void expect_rank2(const Tensor& t, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  DIFFMOE_CHECK(t.rank() == 2, "[{}] {} must be 2-D, got {}", op, name, t.describe());
}

// A strided row buffer must hold `rows` rows of `width` values `stride` apart.
void check_rows(const Tensor& t, DType dtype, int64_t rows, int64_t width, int64_t stride, Device dev,
                std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_dtype(t, dtype, op, name);
  DIFFMOE_CHECK(stride >= width, "[{}] {}: row stride {} is smaller than width {}", op, name, stride, width);
  const int64_t needed = rows == 0 ? 0 : (rows - 1) * stride + width;
  DIFFMOE_CHECK(t.numel() >= needed, "[{}] {}: {} rows of width {} at stride {} need {} elements, {} has {}", op, name,
                rows, width, stride, needed, t.describe(), t.numel());
}

void check_norm_sizes(int64_t rows, int64_t width, std::string_view op) {
  DIFFMOE_CHECK(rows >= 0 && width > 0, "[{}] rows = {}, width = {}: need rows >= 0 and width > 0", op, rows, width);
}

int64_t effective_stride(int64_t stride, int64_t width) { return stride == 0 ? width : stride; }

void check_matrix(const Tensor& t, DType dtype, int rank, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_dtype(t, dtype, op, name);
  DIFFMOE_CHECK(t.rank() == rank, "[{}] {} must have rank {}, got {}", op, name, rank, t.describe());
}

// The dtype tensor t must have where the op's floats are `in`: `in`, or also bf16 where `in` is f32
// (bf16_allowed) for the bf16 GEMM mode's tensors (docs/model.md §7): GEMM operands (weight copies,
// activations rounded once for several GEMMs), outputs that only GEMMs or one element-wise op read
// (the op rounds them once) and inputs written so (widened exactly by the op). Every backend reads
// and writes them (the CPU through f32 buffers, cpu/bf16_staging.h); f64 calls (finite-difference
// checks) take no bf16 tensors: bf16 stands in for f32 storage only.
bool bf16_allowed(DType in) { return in == DType::kF32; }
DType output_dtype(const Tensor& t, DType in) {
  return bf16_allowed(in) && t.dtype == DType::kBF16 ? DType::kBF16 : in;
}
// The op's float type read off an input that may be bf16: f32 for bf16.
DType float_type_of(const Tensor& t) { return t.dtype == DType::kBF16 ? DType::kF32 : t.dtype; }

// A GEMM operand: C's dtype, or bf16 where output_dtype allows it.
void check_gemm_operand(const Tensor& t, DType c_dtype, int rank, Device dev, std::string_view op,
                        std::string_view name) {
  check_matrix(t, output_dtype(t, c_dtype), rank, dev, op, name);
}

// Like check_like, for an output the bf16 GEMM mode may plan in bf16 (output_dtype).
void check_like_output(const Tensor& t, const Tensor& ref, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_shape(t, ref.shape, op, name);
  check_dtype(t, output_dtype(t, ref.dtype), op, name);
}

bool copy_convertible(DType d) {
  return d == DType::kF32 || d == DType::kF64 || d == DType::kBF16 || d == DType::kF8E4M3;
}

// ---------------------------------------------------------------- MLA split and λ

// The layout shared by forward and backward; names[] = the op's fields for k, v, kv, kr.
// bf16_out: which tensors may be bf16 where output_dtype allows it: kKV, the forward's k and v (both
// or neither: the attention's operands) and its input kv (W_kvb's output in the bf16 GEMM mode);
// kLatent, the backward's dkv (read only by W_kvb's backward GEMMs) and its inputs dk, dv (the
// attention's bf16 gradients). The op's float type is kr's (never bf16).
enum class KvSplitBf16 { kNone, kKV, kLatent };
KvSplitDims check_kv_split(std::string_view op, const Tensor& k, const Tensor& v, const Tensor& kv, const Tensor& kr,
                           int64_t n_heads, int64_t d_nope, int64_t d_rope, int64_t d_v, int64_t kr_stride,
                           int64_t kr_offset, const std::array<std::string_view, 4>& names, Device dev,
                           KvSplitBf16 bf16_out) {
  const std::array<Tensor, 4> tensors{k, v, kv, kr};
  for (size_t i = 0; i < 4; ++i) check_device(tensors[i], dev, op, names[i]);
  DIFFMOE_CHECK(n_heads > 0 && d_nope >= 0 && d_rope >= 0 && d_v > 0,
                "[{}] bad sizes: n_heads {}, d_nope {}, d_rope {}, d_v {}", op, n_heads, d_nope, d_rope, d_v);
  KvSplitDims d;
  d.d_qk = d_nope + d_rope;
  d.kr_stride = kr_stride == 0 ? d_rope : kr_stride;  // stride 0 = a dense [N, d_rope] buffer
  DIFFMOE_CHECK(kv.rank() == 2 && kv.dim(1) == n_heads * (d_nope + d_v),
                "[{}] {} must be [N, n_heads·(d_nope + d_v)] = [N, {}], got {}", op, names[2], n_heads * (d_nope + d_v),
                kv.describe());
  d.rows = kv.dim(0);
  DIFFMOE_CHECK(k.numel() == d.rows * n_heads * d.d_qk && k.rank() >= 1 && k.dim(-1) == d.d_qk,
                "[{}] {} must be [N, n_heads, d_qk] = [{}, {}, {}], got {}", op, names[0], d.rows, n_heads, d.d_qk,
                k.describe());
  DIFFMOE_CHECK(v.numel() == d.rows * n_heads * d_v && v.rank() >= 1 && v.dim(-1) == d_v,
                "[{}] {} must be [N, n_heads, d_v] = [{}, {}, {}], got {}", op, names[1], d.rows, n_heads, d_v,
                v.describe());
  DIFFMOE_CHECK(kr_offset >= 0 && kr_offset + d_rope <= d.kr_stride,
                "[{}] rope key columns [{}, {}) do not fit kr_stride {}", op, kr_offset, kr_offset + d_rope,
                d.kr_stride);
  DIFFMOE_CHECK(kr.numel() == d.rows * d.kr_stride, "[{}] {} must hold N·kr_stride = {}·{} values, got {}", op,
                names[3], d.rows, d.kr_stride, kr.describe());
  const DType ft = kr.dtype;
  DIFFMOE_CHECK(ft != DType::kBF16,
                "[{}] {} is bf16: the rope key columns (and their gradient) stay in the op's float "
                "type, f32 or f64",
                op, names[3]);
  for (size_t i = 0; i < 4; ++i) {
    const bool may_be_bf16 = (bf16_out == KvSplitBf16::kKV && i < 3) || (bf16_out == KvSplitBf16::kLatent && i < 3);
    check_dtype(tensors[i], may_be_bf16 ? output_dtype(tensors[i], ft) : ft, op, names[i]);
  }
  DIFFMOE_CHECK(k.dtype == v.dtype, "[{}] {} and {} must have one dtype, got {} and {}", op, names[0], names[1],
                dtype_name(k.dtype), dtype_name(v.dtype));
  return d;
}

void check_lambda_vectors(std::string_view op, const std::array<Tensor, 4>& vecs,
                          const std::array<std::string_view, 4>& names, Device dev) {
  for (size_t i = 0; i < 4; ++i) {
    check_device(vecs[i], dev, op, names[i]);
    DIFFMOE_CHECK(vecs[i].rank() == 1, "[{}] {} must be a vector [d_qk], got {}", op, names[i], vecs[i].describe());
    check_shape(vecs[i], vecs[0].shape, op, names[i]);
    check_dtype(vecs[i], vecs[0].dtype, op, names[i]);
  }
}

// ---------------------------------------------------------------- attention

// out-like tensors: [B,T,H,d_v] or [B,T,H/2,2·d_v] (the same bytes), checked by B, T and numel.
void check_out_like(const Tensor& t, const AttnDims& d, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  DIFFMOE_CHECK(
      t.rank() == 4 && t.dim(0) == d.batch && t.dim(1) == d.seq && t.numel() == d.batch * d.seq * d.heads * d.d_v,
      "[{}] {} must be [B, T, H, d_v] = [{}, {}, {}, {}] (or [B, T, H/2, 2·d_v]), got {}", op, name, d.batch, d.seq,
      d.heads, d.d_v, t.describe());
}

// q, k, v share one dtype: the op's float type ft (out's), or bf16 where ft is f32 (the bf16 GEMM
// mode's saved activations, AttentionFwdArgs).
void check_qkv_dtypes(std::string_view op, const Tensor& q, const Tensor& k, const Tensor& v, DType ft) {
  for (const auto& [t, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}})
    DIFFMOE_CHECK(t.dtype != DType::kBF16 || bf16_allowed(ft),
                  "[{}] {} is bf16: bf16 q, k, v go with f32 outputs (bf16 stands in for f32 storage), here {}", op,
                  name, dtype_name(ft));
  check_dtype(q, output_dtype(q, ft), op, "q");
  for (const auto& [t, name] : {std::pair{k, "k"}, {v, "v"}})
    DIFFMOE_CHECK(t.dtype == q.dtype, "[{}] {}: q, k, v must have one dtype, got q {} and {} {}", op, name,
                  dtype_name(q.dtype), name, dtype_name(t.dtype));
}

AttnDims check_attention(std::string_view op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& o2, const Tensor& lse, const Tensor& lambda, bool differential, Device dev) {
  check_device(q, dev, op, "q");
  DIFFMOE_CHECK(q.rank() == 4, "[{}] q must be [B, T, H, d_qk], got {}", op, q.describe());
  AttnDims d;
  d.batch = q.dim(0);
  d.seq = q.dim(1);
  d.heads = q.dim(2);
  d.d_qk = q.dim(3);
  DIFFMOE_CHECK(d.heads > 0 && d.d_qk > 0, "[{}] q has no heads or no head dim: {}", op, q.describe());
  DIFFMOE_CHECK(!differential || d.heads % 2 == 0,
                "[{}] differential attention pairs component heads 2g, 2g+1: n_heads must be even, got {}", op,
                d.heads);
  d.comps = differential ? 2 : 1;
  d.groups = d.heads / d.comps;
  check_device(k, dev, op, "k");
  check_shape(k, q.shape, op, "k");
  check_device(v, dev, op, "v");
  DIFFMOE_CHECK(v.rank() == 4 && v.dim(0) == d.batch && v.dim(1) == d.seq && v.dim(2) == d.heads && v.dim(3) > 0,
                "[{}] v must be [B, T, H, d_v] with B, T, H = {}, {}, {}, got {}", op, d.batch, d.seq, d.heads,
                v.describe());
  d.d_v = v.dim(3);
  check_out_like(out, d, dev, op, "out");
  check_device(lse, dev, op, "lse");
  check_shape(lse, Shape{d.batch, d.heads, d.seq}, op, "lse");
  const DType ft = out.dtype;  // the op's float type
  check_qkv_dtypes(op, q, k, v, ft);
  check_dtype(lse, ft, op, "lse");
  if (differential) {
    check_out_like(o2, d, dev, op, "o2");
    check_device(lambda, dev, op, "lambda");
    check_shape(lambda, Shape{1}, op, "lambda");
    check_dtype(o2, ft, op, "o2");
    check_dtype(lambda, ft, op, "lambda");
  }
  return d;
}

// ---------------------------------------------------------------- MoE

// The routing contract of docs/model.md §9: groups divide the experts, n_limited ≤ n_groups, top_k ≤ the
// experts in the kept groups; a top-2 group score needs two experts per group.
void check_router_options(const RouterOptions& o, int64_t n_experts, std::string_view op) {
  DIFFMOE_CHECK(n_experts >= 1, "[{}] needs at least one expert, got {}", op, n_experts);
  DIFFMOE_CHECK(o.n_groups >= 1 && n_experts % o.n_groups == 0,
                "[{}] {} experts cannot be split into n_groups = {} equal groups", op, n_experts, o.n_groups);
  DIFFMOE_CHECK(o.n_limited_groups >= 1 && o.n_limited_groups <= o.n_groups,
                "[{}] n_limited_groups = {} must be in [1, n_groups = {}]", op, o.n_limited_groups, o.n_groups);
  const int64_t kept_experts = o.n_limited_groups * (n_experts / o.n_groups);
  DIFFMOE_CHECK(o.top_k >= 1 && o.top_k <= kept_experts,
                "[{}] top_k = {} must be in [1, {}], the experts in the {} kept of {} groups", op, o.top_k,
                kept_experts, o.n_limited_groups, o.n_groups);
  DIFFMOE_CHECK(!(o.use_bias && o.n_groups > 1) || n_experts / o.n_groups >= 2,
                "[{}] the top-2 group score needs at least 2 experts per group, got {}", op, n_experts / o.n_groups);
}

void check_aux_args(const Tensor& scores, int64_t seq_len, int64_t top_k, Device dev, std::string_view op) {
  expect_rank2(scores, dev, op, "scores");
  const int64_t n_tokens = scores.dim(0), n_experts = scores.dim(1);
  DIFFMOE_CHECK(seq_len >= 1 && n_tokens % seq_len == 0, "[{}] {} tokens are not whole sequences of seq_len = {}", op,
                n_tokens, seq_len);
  DIFFMOE_CHECK(top_k >= 1 && top_k <= n_experts, "[{}] top_k = {} must be in [1, {} experts]", op, top_k, n_experts);
}

void check_plan(const Tensor& slot_pos, int64_t n_tokens, Device dev, std::string_view op) {
  check_device(slot_pos, dev, op, "slot_pos");
  check_dtype(slot_pos, DType::kI32, op, "slot_pos");
  DIFFMOE_CHECK(slot_pos.rank() == 2 && slot_pos.dim(0) == n_tokens, "[{}] slot_pos must be [{}, K], got {}", op,
                n_tokens, slot_pos.describe());
}

// ---------------------------------------------------------------- loss

CrossEntropyDims check_logits(const Tensor& logits, const Tensor& targets, Device dev, std::string_view op) {
  check_device(logits, dev, op, "logits");
  check_device(targets, dev, op, "targets");
  DIFFMOE_CHECK(logits.rank() == 2 && logits.dim(1) > 0, "[{}] logits must be [N, V] with V > 0, got {}", op,
                logits.describe());
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  check_shape(targets, Shape{rows}, op, "targets");
  check_dtype(targets, DType::kI32, op, "targets");
  return {rows, vocab};
}

void check_valid(const Tensor& valid, DType float_type, Device dev, std::string_view op) {
  check_device(valid, dev, op, "valid");
  check_shape(valid, Shape{1}, op, "valid");
  DIFFMOE_CHECK(valid.dtype == float_type || valid.dtype == DType::kI32, "[{}] valid: expected dtype {} or i32, got {}",
                op, dtype_name(float_type), dtype_name(valid.dtype));
}

}  // namespace

void check_device(const Tensor& t, Device dev, std::string_view op, std::string_view name) {
  DIFFMOE_CHECK(t.device == dev, "[{}] {} is on {}, the {} backend needs {} memory", op, name, device_name(t.device),
                device_name(dev), device_name(dev));
  DIFFMOE_CHECK(t.data != nullptr || t.numel() == 0, "[{}] {} is an empty view", op, name);
}

// ================================================================ basic ops

void validate_fill(const FillArgs& a, Device dev) {
  check_device(a.out, dev, "fill", "out");
  if (a.out.dtype == DType::kI32) {
    // Integer tensors (counters such as the router's counts) take integral values only.
    const bool in_range =
        a.value >= std::numeric_limits<int32_t>::min() && a.value <= std::numeric_limits<int32_t>::max();
    DIFFMOE_CHECK(in_range && static_cast<double>(static_cast<int32_t>(a.value)) == a.value,
                  "[fill] out is i32 but value {} is not an i32", a.value);
  }
}

void validate_copy(const CopyArgs& a, Device dev) {
  check_device(a.dst, dev, "copy", "dst");
  check_device(a.src, dev, "copy", "src");
  DIFFMOE_CHECK(a.dst.numel() == a.src.numel(), "[copy] dst {} and src {} differ in element count", a.dst.describe(),
                a.src.describe());
  if (a.dst.dtype == a.src.dtype) return;  // any type, i32 included: a byte copy
  DIFFMOE_CHECK(a.dst.data != a.src.data, "[copy] converting {} to {} in place is not supported", a.src.describe(),
                a.dst.describe());
  for (const auto& [d, field] : {std::pair{a.src.dtype, "src"}, std::pair{a.dst.dtype, "dst"}})
    DIFFMOE_CHECK(copy_convertible(d),
                  "[copy] {}: cannot convert dtype {} (f32, f64, bf16, f8e4m3 convert; "
                  "other types copy only to the same type)",
                  field, dtype_name(d));
}

void validate_axpy(const AxpyArgs& a, Device dev) {
  check_device(a.y, dev, "axpy", "y");
  check_device(a.x, dev, "axpy", "x");
  check_shape(a.x, a.y.shape, "axpy", "x");
  check_dtype(a.x, a.y.dtype, "axpy", "x");
}

void validate_scale(const ScaleArgs& a, Device dev) { check_device(a.y, dev, "scale", "y"); }

void validate_sum_squares(const SumSquaresArgs& a, Device dev) {
  check_device(a.out, dev, "sum_squares", "out");
  check_device(a.x, dev, "sum_squares", "x");
  check_shape(a.out, Shape{1}, "sum_squares", "out");
  check_dtype(a.x, a.out.dtype, "sum_squares", "x");
}

void validate_count_nonfinite(const CountNonfiniteArgs& a, Device dev) {
  check_device(a.count, dev, "count_nonfinite", "count");
  check_device(a.x, dev, "count_nonfinite", "x");
  check_shape(a.count, Shape{1}, "count_nonfinite", "count");
  check_dtype(a.count, DType::kI64, "count_nonfinite", "count");
  DIFFMOE_CHECK(dtype_is_float(a.x.dtype), "[count_nonfinite] x must be a float tensor, got {}", a.x.describe());
}

EmbeddingDims validate_embedding_fwd(const EmbeddingFwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "embedding_fwd";
  check_device(a.out, dev, kOp, "out");
  check_device(a.tokens, dev, kOp, "tokens");
  check_device(a.table, dev, kOp, "table");
  DIFFMOE_CHECK(a.table.rank() == 2, "[{}] table must be [V, D], got {}", kOp, a.table.describe());
  DIFFMOE_CHECK(a.tokens.rank() == 1, "[{}] tokens must be [N], got {}", kOp, a.tokens.describe());
  const EmbeddingDims d{.rows = a.tokens.dim(0), .vocab = a.table.dim(0), .dim = a.table.dim(1)};
  check_dtype(a.tokens, DType::kI32, kOp, "tokens");
  check_shape(a.out, Shape{d.rows, d.dim}, kOp, "out");
  check_dtype(a.out, a.table.dtype, kOp, "out");
  return d;
}

EmbeddingDims validate_embedding_bwd(const EmbeddingBwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "embedding_bwd";
  check_device(a.dtable, dev, kOp, "dtable");
  check_device(a.tokens, dev, kOp, "tokens");
  check_device(a.dout, dev, kOp, "dout");
  DIFFMOE_CHECK(a.dtable.rank() == 2, "[{}] dtable must be [V, D], got {}", kOp, a.dtable.describe());
  DIFFMOE_CHECK(a.tokens.rank() == 1, "[{}] tokens must be [N], got {}", kOp, a.tokens.describe());
  const EmbeddingDims d{.rows = a.tokens.dim(0), .vocab = a.dtable.dim(0), .dim = a.dtable.dim(1)};
  check_dtype(a.tokens, DType::kI32, kOp, "tokens");
  check_shape(a.dout, Shape{d.rows, d.dim}, kOp, "dout");
  check_dtype(a.dout, a.dtable.dtype, kOp, "dout");
  return d;
}

// ================================================================ RMSNorm

RmsNormDims validate_rmsnorm_fwd(const RmsNormFwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "rmsnorm_fwd";
  check_norm_sizes(a.rows, a.width, kOp);
  const RmsNormDims d{.x_stride = effective_stride(a.x_stride, a.width),
                      .y_stride = effective_stride(a.y_stride, a.width)};
  const DType dt = a.x.dtype;
  check_rows(a.x, dt, a.rows, a.width, d.x_stride, dev, kOp, "x");
  check_rows(a.y, output_dtype(a.y, dt), a.rows, a.width, d.y_stride, dev, kOp, "y");
  check_device(a.rstd, dev, kOp, "rstd");
  check_device(a.w, dev, kOp, "w");
  check_shape(a.rstd, Shape{a.rows}, kOp, "rstd");
  check_shape(a.w, Shape{a.width}, kOp, "w");
  check_dtype(a.rstd, dt, kOp, "rstd");
  check_dtype(a.w, dt, kOp, "w");
  if (a.y16.defined()) {  // the bf16 copy of an f32 y (the bf16 GEMM mode)
    DIFFMOE_CHECK(a.y.dtype == DType::kF32,
                  "[{}] y16 (a bf16 copy of y) needs an f32 y (a bf16 y is the rounded value itself), here y is {}",
                  kOp, dtype_name(a.y.dtype));
    check_rows(a.y16, DType::kBF16, a.rows, a.width, a.width, dev, kOp, "y16");
  }
  return d;
}

RmsNormDims validate_rmsnorm_bwd(const RmsNormBwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "rmsnorm_bwd";
  check_norm_sizes(a.rows, a.width, kOp);
  const RmsNormDims d{.x_stride = effective_stride(a.x_stride, a.width),
                      .y_stride = effective_stride(a.y_stride, a.width)};
  const DType dt = a.x.dtype;
  check_rows(a.x, dt, a.rows, a.width, d.x_stride, dev, kOp, "x");
  check_rows(a.dx, dt, a.rows, a.width, d.x_stride, dev, kOp, "dx");
  check_rows(a.dy, dt, a.rows, a.width, d.y_stride, dev, kOp, "dy");
  check_device(a.dw, dev, kOp, "dw");
  check_device(a.w, dev, kOp, "w");
  check_device(a.rstd, dev, kOp, "rstd");
  check_shape(a.dw, Shape{a.width}, kOp, "dw");
  check_shape(a.w, Shape{a.width}, kOp, "w");
  check_shape(a.rstd, Shape{a.rows}, kOp, "rstd");
  check_dtype(a.dw, dt, kOp, "dw");
  check_dtype(a.w, dt, kOp, "w");
  check_dtype(a.rstd, dt, kOp, "rstd");
  if (a.dx16.defined()) {  // the bf16 copy of an f32 dx (the bf16 GEMM mode)
    DIFFMOE_CHECK(bf16_allowed(dt),
                  "[{}] dx16 (a bf16 copy of dx) needs an f32 dx (bf16 stands in for f32 storage), "
                  "here dx is {}",
                  kOp, dtype_name(dt));
    check_rows(a.dx16, DType::kBF16, a.rows, a.width, a.width, dev, kOp, "dx16");
  }
  return d;
}

// ================================================================ GEMM

GemmDims validate_gemm(const GemmArgs& a, Device dev) {
  constexpr std::string_view kOp = "gemm";
  // The call's float type: C's, but a bf16 C is an f32 result rounded once (output_dtype), so its
  // operands follow the f32 rules.
  const bool c16 = a.c.dtype == DType::kBF16;
  const DType dt = c16 ? DType::kF32 : a.c.dtype;
  check_device(a.c, dev, kOp, "c");
  check_matrix(a.c, output_dtype(a.c, dt), 2, dev, kOp, "c");
  check_gemm_operand(a.a, dt, 2, dev, kOp, "a");
  check_gemm_operand(a.b, dt, 2, dev, kOp, "b");
  GemmDims d;
  d.m = a.trans_a ? a.a.dim(1) : a.a.dim(0);
  d.k = a.trans_a ? a.a.dim(0) : a.a.dim(1);
  const int64_t kb = a.trans_b ? a.b.dim(1) : a.b.dim(0);
  d.n = a.trans_b ? a.b.dim(0) : a.b.dim(1);
  DIFFMOE_CHECK(d.k == kb && a.c.dim(0) == d.m && a.c.dim(1) == d.n,
                "[gemm] shapes do not match: op(A) is [{}, {}] (A {}{}), op(B) is [{}, {}] (B {}{}), C is {}; "
                "need op(A) [m, k], op(B) [k, n], C [m, n]",
                d.m, d.k, a.a.shape.str(), a.trans_a ? " transposed" : "", kb, d.n, a.b.shape.str(),
                a.trans_b ? " transposed" : "", a.c.shape.str());
  // A bf16 C is written once and never read: no beta·C term (it would be read in bf16), no f32_exact.
  DIFFMOE_CHECK(!c16 || a.beta == 0.0,
                "[gemm] c is bf16: needs beta = 0, got beta = {} (a bf16 output is only written: a GEMM that adds to "
                "its output, or to an addend, writes f32)",
                a.beta);
  DIFFMOE_CHECK(!c16 || !a.f32_exact, "[gemm] c is bf16 but f32_exact asks for an f32 result: pass an f32 c");
  // The addend (optional): C's shape and dtype; C itself, or memory apart from C (read while C is written).
  if (a.addend.defined()) {
    check_device(a.addend, dev, kOp, "addend");
    check_shape(a.addend, a.c.shape, kOp, "addend");
    check_dtype(a.addend, a.c.dtype, kOp, "addend");
    const auto c0 = reinterpret_cast<uintptr_t>(a.c.data), r0 = reinterpret_cast<uintptr_t>(a.addend.data);
    const uintptr_t bytes = a.c.nbytes();
    DIFFMOE_CHECK(r0 == c0 || r0 + bytes <= c0 || c0 + bytes <= r0,
                  "[gemm] addend {} partly overlaps c {}: pass c itself or a separate tensor", a.addend.describe(),
                  a.c.describe());
  }
  return d;
}

GroupedGemmDims validate_grouped_gemm(const GroupedGemmArgs& a, Device dev) {
  constexpr std::string_view kOp = "grouped_gemm";
  // C: the op's float type, or bf16 with beta = 0 (the bf16 GEMM mode's expert activations that only
  // element-wise ops read, docs/model.md §7); the operands are then checked against f32.
  DIFFMOE_CHECK(a.c.dtype != DType::kBF16 || a.beta == 0.0,
                "[grouped_gemm] c is bf16 and beta = {}: a bf16 output takes beta = 0 (it is not accumulated into)",
                a.beta);
  const DType dt = float_type_of(a.c);
  check_matrix(a.c, output_dtype(a.c, dt), 2, dev, kOp, "c");
  check_gemm_operand(a.a, dt, 2, dev, kOp, "a");
  check_gemm_operand(a.b, dt, 3, dev, kOp, "b");
  GroupedGemmDims d{
      .rows = a.a.dim(0), .k = a.a.dim(1), .n = a.trans_b ? a.b.dim(1) : a.b.dim(2), .groups = a.b.dim(0)};
  const int64_t kb = a.trans_b ? a.b.dim(2) : a.b.dim(1);
  DIFFMOE_CHECK(kb == d.k && a.c.dim(0) == d.rows && a.c.dim(1) == d.n,
                "[grouped_gemm] shapes do not match: A {} is [R={}, k={}], B {} ({}) gives k={}, n={}, C is {} "
                "(need C [R, n])",
                a.a.shape.str(), d.rows, d.k, a.b.shape.str(), a.trans_b ? "[G, n, k]" : "[G, k, n]", kb, d.n,
                a.c.shape.str());
  check_device(a.offsets, dev, kOp, "offsets");
  check_shape(a.offsets, Shape{d.groups + 1}, kOp, "offsets");
  check_dtype(a.offsets, DType::kI32, kOp, "offsets");
  DIFFMOE_CHECK(a.max_group_rows >= 0, "[grouped_gemm] max_group_rows = {} (0: no bound)", a.max_group_rows);
  // The optional second term: A2 [R, k2], B2 [G, n, k2] (trans_b) or [G, k2, n], as A and B.
  d.two_terms = a.a2.defined() || a.b2.defined();
  if (!d.two_terms) return d;
  DIFFMOE_CHECK(a.a2.defined() && a.b2.defined(),
                "[grouped_gemm] the second term needs both a2 and b2: a2 is {}, b2 is {}",
                a.a2.defined() ? a.a2.describe() : "not given", a.b2.defined() ? a.b2.describe() : "not given");
  check_gemm_operand(a.a2, dt, 2, dev, kOp, "a2");
  check_gemm_operand(a.b2, dt, 3, dev, kOp, "b2");
  d.k2 = a.a2.dim(1);
  DIFFMOE_CHECK(a.a2.dim(0) == d.rows, "[grouped_gemm] shapes do not match: a2 {} must have A's R = {} rows",
                a.a2.shape.str(), d.rows);
  const Shape want_b2 = a.trans_b ? Shape{d.groups, d.n, d.k2} : Shape{d.groups, d.k2, d.n};
  DIFFMOE_CHECK(a.b2.shape == want_b2,
                "[grouped_gemm] shapes do not match: b2 {} must be {} = {} (G and n as B, k2 as a2 {})",
                a.b2.shape.str(), want_b2.str(), a.trans_b ? "[G, n, k2]" : "[G, k2, n]", a.a2.shape.str());
  return d;
}

GroupedGemmWgradDims validate_grouped_gemm_wgrad(const GroupedGemmWgradArgs& a, Device dev) {
  constexpr std::string_view kOp = "grouped_gemm_wgrad";
  DIFFMOE_CHECK(a.c.dtype != DType::kBF16,
                "[grouped_gemm_wgrad] c is bf16: weight gradients accumulate (beta·C) and stay in the op's float type");
  const DType dt = a.c.dtype;
  check_matrix(a.c, dt, 3, dev, kOp, "c");
  check_gemm_operand(a.a, dt, 2, dev, kOp, "a");
  check_gemm_operand(a.b, dt, 2, dev, kOp, "b");
  const GroupedGemmWgradDims d{.rows = a.a.dim(0), .m = a.a.dim(1), .n = a.b.dim(1), .groups = a.c.dim(0)};
  DIFFMOE_CHECK(a.b.dim(0) == d.rows && a.c.dim(1) == d.m && a.c.dim(2) == d.n,
                "[grouped_gemm_wgrad] shapes do not match: A {} is [R, m], B {} is [R, n], C is {} "
                "(need C [G, {}, {}] and equal R)",
                a.a.shape.str(), a.b.shape.str(), a.c.shape.str(), d.m, d.n);
  check_device(a.offsets, dev, kOp, "offsets");
  check_shape(a.offsets, Shape{d.groups + 1}, kOp, "offsets");
  check_dtype(a.offsets, DType::kI32, kOp, "offsets");
  if (a.sum_sq.defined()) {
    check_device(a.sum_sq, dev, kOp, "sum_sq");
    check_shape(a.sum_sq, Shape{1}, kOp, "sum_sq");
    check_dtype(a.sum_sq, dt, kOp, "sum_sq");
  }
  return d;
}

void check_gemm_bf16_mode(std::string_view op, bool bf16_mode, bool f32_exact,
                          std::initializer_list<std::pair<const Tensor*, std::string_view>> tensors) {
  for (const auto& [t, name] : tensors) {
    if (t->dtype != DType::kBF16) continue;
    DIFFMOE_CHECK(bf16_mode && !f32_exact,
                  "[{}] {} is bf16: bf16 GEMM operands and outputs need the bf16 GEMM mode (train.precision: "
                  "bf16_gemm){}",
                  op, name, f32_exact ? " and f32_exact = false" : "");
  }
}

std::vector<int64_t> check_group_offsets(const int32_t* o, int64_t groups, int64_t rows, std::string_view op,
                                         int64_t max_group_rows) {
  std::vector<int64_t> out(static_cast<size_t>(groups + 1));
  DIFFMOE_CHECK(o[0] == 0, "[{}] offsets[0] = {}, must be 0", op, o[0]);
  for (int64_t g = 0; g <= groups; ++g) {
    if (g > 0) {
      DIFFMOE_CHECK(o[g] >= o[g - 1], "[{}] offsets must be non-decreasing: offsets[{}] = {} < offsets[{}] = {}", op, g,
                    o[g], g - 1, o[g - 1]);
      DIFFMOE_CHECK(max_group_rows == 0 || o[g] - o[g - 1] <= max_group_rows,
                    "[{}] group {} has {} rows, above max_group_rows = {}", op, g - 1, o[g] - o[g - 1], max_group_rows);
    }
    out[static_cast<size_t>(g)] = o[g];
  }
  DIFFMOE_CHECK(out.back() <= rows, "[{}] offsets[{}] = {} exceeds the {} rows of A", op, groups, out.back(), rows);
  return out;
}

// ================================================================ RoPE

int64_t validate_rope(const RopeArgs& a, Device dev) {
  constexpr std::string_view kOp = "rope";
  check_device(a.x, dev, kOp, "x");
  check_device(a.cos, dev, kOp, "cos");
  check_device(a.sin, dev, kOp, "sin");
  DIFFMOE_CHECK(a.x.rank() == 2, "[rope] x must be [N, W], got {}", a.x.describe());
  DIFFMOE_CHECK(a.rope_dim > 0 && a.rope_dim % 2 == 0, "[rope] rope_dim must be positive and even, got {}", a.rope_dim);
  DIFFMOE_CHECK(a.n_heads >= 1, "[rope] n_heads must be >= 1, got {}", a.n_heads);
  DIFFMOE_CHECK(a.n_heads == 1 || a.head_stride >= a.rope_dim,
                "[rope] head_stride {} must be >= rope_dim {} when n_heads > 1 (heads would overlap)", a.head_stride,
                a.rope_dim);
  DIFFMOE_CHECK(a.col_offset >= 0 && a.head_stride >= 0, "[rope] col_offset {} and head_stride {} must be >= 0",
                a.col_offset, a.head_stride);
  const int64_t width = a.x.dim(1);
  const int64_t last_col = (a.n_heads - 1) * a.head_stride + a.col_offset + a.rope_dim;  // one past the end
  DIFFMOE_CHECK(last_col <= width, "[rope] heads reach column {} but x has only {} columns ({})", last_col, width,
                a.x.describe());
  DIFFMOE_CHECK(a.cos.rank() == 2 && a.cos.dim(1) == a.rope_dim / 2,
                "[rope] cos must be [max_pos, rope_dim/2 = {}], got {}", a.rope_dim / 2, a.cos.describe());
  check_shape(a.sin, a.cos.shape, kOp, "sin");
  // x may be bf16 (the bf16 GEMM mode's q, written in bf16 by its GEMM): f32 tables.
  check_dtype(a.cos, float_type_of(a.x), kOp, "cos");
  check_dtype(a.sin, float_type_of(a.x), kOp, "sin");
  if (a.positions.defined()) {  // per-row positions: their values are the backend's check
    check_device(a.positions, dev, kOp, "positions");
    check_shape(a.positions, Shape{a.x.dim(0)}, kOp, "positions");
    check_dtype(a.positions, DType::kI32, kOp, "positions");
    return width;
  }
  DIFFMOE_CHECK(a.seq_len > 0, "[rope] seq_len must be > 0, got {}", a.seq_len);
  DIFFMOE_CHECK(a.pos_offset >= 0, "[rope] pos_offset must be >= 0, got {}", a.pos_offset);
  // The largest position used is pos_offset + min(N, seq_len) − 1.
  const int64_t rows = a.x.dim(0);
  if (rows > 0) {
    const int64_t max_used = a.pos_offset + std::min(rows, a.seq_len) - 1;
    DIFFMOE_CHECK(max_used < a.cos.dim(0),
                  "[rope] position {} (pos_offset {} + seq_len {}) is beyond the table's max_pos {}", max_used,
                  a.pos_offset, a.seq_len, a.cos.dim(0));
  }
  return width;
}

// ================================================================ MLA split, λ, attention

KvSplitDims validate_mla_kv_split_fwd(const MlaKvSplitFwdArgs& a, Device dev) {
  return check_kv_split("mla_kv_split_fwd", a.k, a.v, a.kv, a.kr, a.n_heads, a.d_nope, a.d_rope, a.d_v, a.kr_stride,
                        a.kr_offset, {"k", "v", "kv", "kr"}, dev, KvSplitBf16::kKV);
}

KvSplitDims validate_mla_kv_split_bwd(const MlaKvSplitBwdArgs& a, Device dev) {
  return check_kv_split("mla_kv_split_bwd", a.dk, a.dv, a.dkv, a.dkr, a.n_heads, a.d_nope, a.d_rope, a.d_v, a.kr_stride,
                        a.kr_offset, {"dk", "dv", "dkv", "dkr"}, dev, KvSplitBf16::kLatent);
}

void validate_diff_lambda_fwd(const DiffLambdaFwdArgs& a, Device dev) {
  constexpr std::string_view op = "diff_lambda_fwd";
  check_lambda_vectors(op, {a.lq1, a.lk1, a.lq2, a.lk2}, {"lq1", "lk1", "lq2", "lk2"}, dev);
  check_device(a.lambda, dev, op, "lambda");
  check_shape(a.lambda, Shape{1}, op, "lambda");
  check_dtype(a.lambda, a.lq1.dtype, op, "lambda");
}

void validate_diff_lambda_bwd(const DiffLambdaBwdArgs& a, Device dev) {
  constexpr std::string_view op = "diff_lambda_bwd";
  check_lambda_vectors(op, {a.lq1, a.lk1, a.lq2, a.lk2}, {"lq1", "lk1", "lq2", "lk2"}, dev);
  check_lambda_vectors(op, {a.dlq1, a.dlk1, a.dlq2, a.dlk2}, {"dlq1", "dlk1", "dlq2", "dlk2"}, dev);
  check_shape(a.dlq1, a.lq1.shape, op, "dlq1");
  check_dtype(a.dlq1, a.lq1.dtype, op, "dlq1");
  check_device(a.dlambda, dev, op, "dlambda");
  check_shape(a.dlambda, Shape{1}, op, "dlambda");
  check_dtype(a.dlambda, a.lq1.dtype, op, "dlambda");
}

AttnDims validate_attention_fwd(const AttentionFwdArgs& a, Device dev) {
  return check_attention("attention_fwd", a.q, a.k, a.v, a.out, a.o2, a.lse, a.lambda, a.differential, dev);
}

AttnDims validate_attention_bwd(const AttentionBwdArgs& a, Device dev) {
  constexpr std::string_view op = "attention_bwd";
  const AttnDims d = check_attention(op, a.q, a.k, a.v, a.out, a.o2, a.lse, a.lambda, a.differential, dev);
  const DType ft = a.out.dtype;  // gradients have the op's float type, also for bf16 q, k, v
  for (const auto& [t, name] : {std::pair{a.dq, "dq"}, {a.dk, "dk"}}) {
    check_device(t, dev, op, name);
    check_shape(t, a.q.shape, op, name);
  }
  // dq, dk, dv may be bf16 where q, k, v are (the bf16 GEMM mode: dq only feeds W_q's backward GEMMs
  // after RoPE, dk and dv the MLA split's backward).
  const bool bf16_grads = a.q.dtype == DType::kBF16;
  check_dtype(a.dq, bf16_grads ? output_dtype(a.dq, ft) : ft, op, "dq");
  check_dtype(a.dk, bf16_grads ? output_dtype(a.dk, ft) : ft, op, "dk");
  check_device(a.dv, dev, op, "dv");
  check_shape(a.dv, a.v.shape, op, "dv");
  check_dtype(a.dv, bf16_grads ? output_dtype(a.dv, ft) : ft, op, "dv");
  check_out_like(a.dout, d, dev, op, "dout");
  check_dtype(a.dout, ft, op, "dout");
  if (a.differential) {
    check_device(a.dlambda, dev, op, "dlambda");
    check_shape(a.dlambda, Shape{1}, op, "dlambda");
    check_dtype(a.dlambda, ft, op, "dlambda");
  }
  return d;
}

LatentDims validate_latent_attention(const LatentAttentionArgs& a, Device dev) {
  constexpr std::string_view kOp = "latent_attention";
  const std::pair<const Tensor&, const char*> fields[] = {
      {a.out, "out"}, {a.q_lat, "q_lat"}, {a.q_rope, "q_rope"}, {a.cache, "cache"}};
  for (const auto& [t, name] : fields) check_device(t, dev, kOp, name);
  DIFFMOE_CHECK(a.q_lat.rank() == 4, "[{}] q_lat must be [B, Tq, H, r_kv], got {}", kOp, a.q_lat.describe());
  LatentDims d;
  d.batch = a.q_lat.dim(0);
  d.tq = a.q_lat.dim(1);
  d.heads = a.q_lat.dim(2);
  d.r_kv = a.q_lat.dim(3);
  DIFFMOE_CHECK(d.tq >= 1 && d.heads >= 1 && d.r_kv >= 1, "[{}] q_lat needs Tq, H, r_kv >= 1, got {}", kOp,
                a.q_lat.describe());
  DIFFMOE_CHECK(!a.differential || d.heads % 2 == 0,
                "[{}] differential attention pairs component heads 2h, 2h+1: H must be even, got {}", kOp, d.heads);
  d.comps = a.differential ? 2 : 1;
  d.groups = d.heads / d.comps;

  DIFFMOE_CHECK(a.cache.rank() == 3 && a.cache.dim(0) == d.batch && a.cache.dim(2) > d.r_kv,
                "[{}] cache must be [B = {}, S, r_kv + d_rope] with r_kv = {} and d_rope >= 1, got {}", kOp, d.batch,
                d.r_kv, a.cache.describe());
  d.capacity = a.cache.dim(1);
  d.d_rope = a.cache.dim(2) - d.r_kv;
  DIFFMOE_CHECK(a.kv_len >= d.tq && a.kv_len <= d.capacity,
                "[{}] kv_len = {} must cover the Tq = {} new positions and fit the cache capacity S = {}", kOp,
                a.kv_len, d.tq, d.capacity);

  DIFFMOE_CHECK(
      a.q_rope.rank() == 4 && a.q_rope.dim(0) == d.batch && a.q_rope.dim(1) == d.tq && a.q_rope.dim(2) == d.heads,
      "[{}] q_rope must be [B, Tq, H, W] = [{}, {}, {}, W], got {}", kOp, d.batch, d.tq, d.heads, a.q_rope.describe());
  d.q_rope_width = a.q_rope.dim(3);
  DIFFMOE_CHECK(a.q_rope_offset >= 0 && a.q_rope_offset + d.d_rope <= d.q_rope_width,
                "[{}] rope query columns [{}, {}) do not fit q_rope's {} values per head", kOp, a.q_rope_offset,
                a.q_rope_offset + d.d_rope, d.q_rope_width);

  check_shape(a.out, Shape{d.batch, d.tq, d.groups, d.r_kv}, kOp, "out");
  for (const auto& [t, name] : fields) check_dtype(t, a.q_lat.dtype, kOp, name);
  if (a.differential) {
    check_device(a.lambda, dev, kOp, "lambda");
    check_shape(a.lambda, Shape{1}, kOp, "lambda");
    check_dtype(a.lambda, a.q_lat.dtype, kOp, "lambda");
  }
  return d;
}

// ================================================================ SwiGLU

namespace {
// All SwiGLU tensors share a's shape and dtype.
void check_like(const Tensor& t, const Tensor& ref, Device dev, std::string_view op, std::string_view name) {
  check_device(t, dev, op, name);
  check_shape(t, ref.shape, op, name);
  check_dtype(t, ref.dtype, op, name);
}
}  // namespace

// a, b (and dh) share one dtype: the op's float type, or bf16 (the expert GEMMs' outputs in the bf16
// GEMM mode), which makes the outputs bf16 too; with f32 inputs the outputs may be bf16.
void validate_swiglu_fwd(const SwigluFwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "swiglu_fwd";
  check_device(a.a, dev, kOp, "a");
  check_like(a.b, a.a, dev, kOp, "b");
  check_like_output(a.h, a.a, dev, kOp, "h");
}

void validate_swiglu_bwd(const SwigluBwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "swiglu_bwd";
  check_device(a.a, dev, kOp, "a");
  check_like(a.b, a.a, dev, kOp, "b");
  check_like(a.dh, a.a, dev, kOp, "dh");
  check_like_output(a.da, a.a, dev, kOp, "da");
  check_like_output(a.db, a.a, dev, kOp, "db");
  DIFFMOE_CHECK(a.da.dtype == a.db.dtype, "[{}] da and db must have one dtype, got {} and {}", kOp,
                dtype_name(a.da.dtype), dtype_name(a.db.dtype));
}

// ================================================================ MoE

void validate_router_fwd(const RouterFwdArgs& a, Device dev) {
  constexpr std::string_view op = "router_fwd";
  expect_rank2(a.logits, dev, op, "logits");
  const int64_t n_tokens = a.logits.dim(0), n_experts = a.logits.dim(1);
  check_router_options(a.opt, n_experts, op);
  const DType ft = a.logits.dtype;
  expect_tensor(a.scores, {n_tokens, n_experts}, ft, dev, op, "scores");
  expect_tensor(a.topk_idx, {n_tokens, a.opt.top_k}, DType::kI32, dev, op, "topk_idx");
  expect_tensor(a.topk_w, {n_tokens, a.opt.top_k}, ft, dev, op, "topk_w");
  expect_tensor(a.counts, {n_experts}, DType::kI32, dev, op, "counts");
  if (a.opt.use_bias) expect_tensor(a.bias, {n_experts}, ft, dev, op, "bias");
}

void validate_router_bwd(const RouterBwdArgs& a, Device dev) {
  constexpr std::string_view op = "router_bwd";
  expect_rank2(a.scores, dev, op, "scores");
  const int64_t n_tokens = a.scores.dim(0), n_experts = a.scores.dim(1);
  check_router_options(a.opt, n_experts, op);
  const DType ft = a.scores.dtype;
  expect_tensor(a.dlogits, {n_tokens, n_experts}, ft, dev, op, "dlogits");
  expect_tensor(a.dtopk_w, {n_tokens, a.opt.top_k}, ft, dev, op, "dtopk_w");
  expect_tensor(a.topk_idx, {n_tokens, a.opt.top_k}, DType::kI32, dev, op, "topk_idx");
  // topk_w is not needed (ŵ is recomputed from the scores); checked only when passed.
  if (a.topk_w.data != nullptr) expect_tensor(a.topk_w, {n_tokens, a.opt.top_k}, ft, dev, op, "topk_w");
}

void validate_aux_loss_fwd(const AuxLossFwdArgs& a, Device dev) {
  constexpr std::string_view op = "aux_loss_fwd";
  check_aux_args(a.scores, a.seq_len, a.top_k, dev, op);
  expect_tensor(a.loss, {1}, a.scores.dtype, dev, op, "loss");
}

void validate_aux_loss_bwd(const AuxLossBwdArgs& a, Device dev) {
  constexpr std::string_view op = "aux_loss_bwd";
  check_aux_args(a.scores, a.seq_len, a.top_k, dev, op);
  expect_tensor(a.dlogits, a.scores.shape, a.scores.dtype, dev, op, "dlogits");
}

void validate_moe_permute(const MoePermuteArgs& a, Device dev) {
  constexpr std::string_view op = "moe_permute";
  expect_rank2(a.topk_idx, dev, op, "topk_idx");
  check_dtype(a.topk_idx, DType::kI32, op, "topk_idx");
  const int64_t n_tokens = a.topk_idx.dim(0), top_k = a.topk_idx.dim(1), n_rows = n_tokens * top_k;
  DIFFMOE_CHECK(a.n_experts >= 1, "[{}] n_experts = {} must be positive", op, a.n_experts);
  DIFFMOE_CHECK(n_rows <= INT32_MAX, "[{}] {} assignments overflow the i32 row index", op, n_rows);
  expect_tensor(a.offsets, {a.n_experts + 1}, DType::kI32, dev, op, "offsets");
  check_device(a.src_row, dev, op, "src_row");
  check_dtype(a.src_row, DType::kI32, op, "src_row");
  DIFFMOE_CHECK(a.src_row.rank() == 1 && a.src_row.numel() <= n_rows,
                "[{}] src_row must be 1-D with at most N·K = {} rows, got {}", op, n_rows, a.src_row.describe());
  expect_tensor(a.slot_pos, {n_tokens, top_k}, DType::kI32, dev, op, "slot_pos");
}

void validate_moe_gather(const MoeGatherArgs& a, Device dev) {
  constexpr std::string_view op = "moe_gather";
  expect_rank2(a.x, dev, op, "x");  // x may be bf16: the FFN's bf16 x_norm copy in the bf16 GEMM mode
  check_device(a.src_row, dev, op, "src_row");
  check_dtype(a.src_row, DType::kI32, op, "src_row");
  DIFFMOE_CHECK(a.src_row.rank() == 1, "[{}] src_row must be 1-D, got {}", op, a.src_row.describe());
  expect_tensor(a.x_perm, {a.src_row.numel(), a.x.dim(1)}, output_dtype(a.x_perm, float_type_of(a.x)), dev, op,
                "x_perm");
}

void validate_moe_gather_bwd(const MoeGatherBwdArgs& a, Device dev) {
  constexpr std::string_view op = "moe_gather_bwd";
  expect_rank2(a.dx, dev, op, "dx");
  expect_rank2(a.dx_perm, dev, op, "dx_perm");
  // dx_perm may be bf16: the expert dgrad GEMM's output in the bf16 GEMM mode.
  expect_tensor(a.dx_perm, {a.dx_perm.dim(0), a.dx.dim(1)}, output_dtype(a.dx_perm, a.dx.dtype), dev, op, "dx_perm");
  check_plan(a.slot_pos, a.dx.dim(0), dev, op);
}

void validate_moe_combine_fwd(const MoeCombineFwdArgs& a, Device dev) {
  constexpr std::string_view op = "moe_combine_fwd";
  expect_rank2(a.y, dev, op, "y");
  expect_rank2(a.y_perm, dev, op, "y_perm");
  const DType ft = a.y.dtype;
  // y_perm may be bf16: the expert GEMMs' output in the bf16 GEMM mode.
  expect_tensor(a.y_perm, {a.y_perm.dim(0), a.y.dim(1)}, output_dtype(a.y_perm, ft), dev, op, "y_perm");
  check_plan(a.slot_pos, a.y.dim(0), dev, op);
  expect_tensor(a.topk_w, a.slot_pos.shape, ft, dev, op, "topk_w");
}

void validate_moe_combine_bwd(const MoeCombineBwdArgs& a, Device dev) {
  constexpr std::string_view op = "moe_combine_bwd";
  expect_rank2(a.dy, dev, op, "dy");
  expect_rank2(a.y_perm, dev, op, "y_perm");
  const int64_t n_tokens = a.dy.dim(0), dim = a.dy.dim(1), n_rows = a.y_perm.dim(0);
  // dy may be bf16 (the bf16 GEMM mode's rounded copy of the residual gradient), y_perm too (the
  // expert GEMMs' output), and dy_perm (read only by the expert GEMMs).
  const DType ft = float_type_of(a.dy);
  expect_tensor(a.y_perm, {n_rows, dim}, output_dtype(a.y_perm, ft), dev, op, "y_perm");
  expect_tensor(a.dy_perm, {n_rows, dim}, output_dtype(a.dy_perm, ft), dev, op, "dy_perm");
  check_plan(a.slot_pos, n_tokens, dev, op);
  expect_tensor(a.topk_w, a.slot_pos.shape, ft, dev, op, "topk_w");
  expect_tensor(a.dtopk_w, a.slot_pos.shape, ft, dev, op, "dtopk_w");
}

EpPlanDims validate_ep_dispatch_plan(const EpDispatchPlanArgs& a, Device dev) {
  constexpr std::string_view op = "ep_dispatch_plan";
  expect_rank2(a.topk_idx, dev, op, "topk_idx");
  check_dtype(a.topk_idx, DType::kI32, op, "topk_idx");
  const int64_t N = a.topk_idx.dim(0), K = a.topk_idx.dim(1), P = a.ranks, El = a.local_experts;
  DIFFMOE_CHECK(P >= 1 && El >= 1, "[{}] ranks = {} and local_experts = {} must be positive", op, P, El);
  DIFFMOE_CHECK(a.topk_w.defined() && dtype_is_float(a.topk_w.dtype), "[{}] topk_w must be a float tensor, got {}", op,
                a.topk_w.describe());
  expect_tensor(a.topk_w, {N, K}, a.topk_w.dtype, dev, op, "topk_w");
  expect_tensor(a.counts, {P * (1 + El)}, DType::kI32, dev, op, "counts");
  expect_rank2(a.pair_idx, dev, op, "pair_idx");
  const int64_t M = a.pair_idx.dim(0);
  DIFFMOE_CHECK(M >= N * std::min(K, P), "[{}] pair_idx has {} rows; N·min(K, P) = {} pairs may be needed", op, M,
                N * std::min(K, P));
  DIFFMOE_CHECK(M <= INT32_MAX, "[{}] {} pairs overflow the i32 pair index", op, M);
  expect_tensor(a.pair_token, {M}, DType::kI32, dev, op, "pair_token");
  expect_tensor(a.pair_of, {N, P}, DType::kI32, dev, op, "pair_of");
  expect_tensor(a.pair_idx, {M, K}, DType::kI32, dev, op, "pair_idx");
  expect_tensor(a.pair_w, {M, K}, a.topk_w.dtype, dev, op, "pair_w");
  return EpPlanDims{.tokens = N, .top_k = K, .ranks = P, .local_experts = El, .max_pairs = M};
}

void validate_moe_bias_update(const MoeBiasUpdateArgs& a, Device dev) {
  constexpr std::string_view op = "moe_bias_update";
  check_device(a.bias, dev, op, "bias");
  DIFFMOE_CHECK(a.bias.rank() == 1, "[{}] bias must be 1-D [E], got {}", op, a.bias.describe());
  check_device(a.counts, dev, op, "counts");
  check_shape(a.counts, a.bias.shape, op, "counts");
  DIFFMOE_CHECK(a.counts.dtype == DType::kI32 || a.counts.dtype == a.bias.dtype,
                "[{}] counts must be i32 or the bias's {}, got {}", op, dtype_name(a.bias.dtype),
                dtype_name(a.counts.dtype));
}

// ================================================================ loss and optimizer

CrossEntropyDims validate_cross_entropy_fwd(const CrossEntropyFwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "cross_entropy_fwd";
  const CrossEntropyDims d = check_logits(a.logits, a.targets, dev, kOp);
  const DType ft = float_type_of(a.logits);  // logits may be bf16 (the head's output in the bf16 GEMM mode)
  check_device(a.loss_sum, dev, kOp, "loss_sum");
  check_shape(a.loss_sum, Shape{1}, kOp, "loss_sum");
  check_dtype(a.loss_sum, ft, kOp, "loss_sum");
  check_valid(a.valid, ft, dev, kOp);
  return d;
}

CrossEntropyDims validate_cross_entropy_bwd(const CrossEntropyBwdArgs& a, Device dev) {
  constexpr std::string_view kOp = "cross_entropy_bwd";
  const CrossEntropyDims d = check_logits(a.logits, a.targets, dev, kOp);
  const DType ft = float_type_of(a.logits);
  check_device(a.dlogits, dev, kOp, "dlogits");
  check_shape(a.dlogits, a.logits.shape, kOp, "dlogits");
  check_dtype(a.dlogits, output_dtype(a.dlogits, ft), kOp, "dlogits");
  check_valid(a.valid, ft, dev, kOp);
  return d;
}

namespace {

// The name of an AdamW tensor in messages: "m" (adamw) or "entries[3].m" (adamw_multi), formatted
// only when a check fails: adamw_multi validates every parameter of the model at every step.
struct AdamWName {
  int64_t entry = -1;  // −1: adamw
  std::string operator()(std::string_view field) const {
    return entry < 0 ? std::string(field) : fmt::format("entries[{}].{}", entry, field);
  }
};

// check_device, check_shape and check_dtype, each called (to throw its message) only where its
// condition fails.
void check_adamw_tensor(const Tensor& t, const Shape& shape, DType dt, Device dev, std::string_view op,
                        const AdamWName& name, std::string_view field) {
  if (t.device != dev || (t.data == nullptr && t.numel() != 0)) check_device(t, dev, op, name(field));
  if (!(t.shape == shape)) check_shape(t, shape, op, name(field));
  if (t.dtype != dt) check_dtype(t, dt, op, name(field));
}

// One update's tensors (AdamWArgs, AdamWEntry): grad like param (shape, dtype dt); m and v param's
// shape, both in dt or both in bf16 (the moments stored in bf16, op_args.h AdamWArgs); the optional
// bf16 copy param's shape in bf16.
void check_adamw_tensors(const Tensor& param, const Tensor& m, const Tensor& v, const Tensor& grad,
                         const Tensor& param_bf16, DType dt, Device dev, std::string_view op, const AdamWName& name) {
  check_adamw_tensor(param, param.shape, dt, dev, op, name, "param");
  check_adamw_tensor(grad, param.shape, dt, dev, op, name, "grad");
  for (const auto& [t, field] : {std::pair{&m, "m"}, std::pair{&v, "v"}})
    if (t->device != dev || (t->data == nullptr && t->numel() != 0)) check_device(*t, dev, op, name(field));
  if (m.dtype != dt && m.dtype != DType::kBF16) {
    DIFFMOE_FAIL("[{}] {} has dtype {}, expected {} (the param's) or bf16", op, name("m"), dtype_name(m.dtype),
                 dtype_name(dt));
  }
  if (v.dtype != m.dtype) {
    DIFFMOE_FAIL("[{}] {} has dtype {}, but {} has {}: the moments share one dtype", op, name("v"), dtype_name(v.dtype),
                 name("m"), dtype_name(m.dtype));
  }
  for (const auto& [t, field] : {std::pair{&m, "m"}, std::pair{&v, "v"}})
    check_adamw_tensor(*t, param.shape, m.dtype, dev, op, name, field);
  if (param_bf16.defined()) check_adamw_tensor(param_bf16, param.shape, DType::kBF16, dev, op, name, "param_bf16");
}

void check_adamw_step(int64_t step, double max_norm, const Tensor& grad_sq, DType dt, Device dev, std::string_view op) {
  DIFFMOE_CHECK(step >= 1, "[{}] step is 1-based, got {}", op, step);
  if (max_norm > 0.0) {  // grad_sq is only read when clipping
    check_device(grad_sq, dev, op, "grad_sq");
    check_shape(grad_sq, Shape{1}, op, "grad_sq");
    check_dtype(grad_sq, dt, op, "grad_sq");
  }
}

}  // namespace

void validate_adamw(const AdamWArgs& args, Device dev) {
  constexpr std::string_view kOp = "adamw";
  const DType dt = args.param.dtype;
  check_adamw_tensors(args.param, args.m, args.v, args.grad, args.param_bf16, dt, dev, kOp, AdamWName{});
  check_adamw_step(args.step, args.max_norm, args.grad_sq, dt, dev, kOp);
}

void validate_adamw_multi(const AdamWMultiArgs& args, Device dev) {
  constexpr std::string_view kOp = "adamw_multi";
  const DType dt = args.entries.empty() ? args.grad_sq.dtype : args.entries.front().param.dtype;
  for (size_t i = 0; i < args.entries.size(); ++i) {
    const AdamWEntry& e = args.entries[i];
    check_adamw_tensors(e.param, e.m, e.v, e.grad, e.param_bf16, dt, dev, kOp, AdamWName{static_cast<int64_t>(i)});
  }
  check_adamw_step(args.step, args.max_norm, args.grad_sq, dt, dev, kOp);
}

}  // namespace diffmoe
