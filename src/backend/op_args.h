// Argument structs of every kernel-level op (docs/style.md habit 2 and 6): outputs first, then inputs,
// then weights, then sizes/options. Use designated initializers at call sites.
//
// Rules every backend follows:
// - Gradients of WEIGHTS accumulate (+=). Gradients of ACTIVATIONS are overwritten, unless the
//   field is named `*_accumulate` or the struct says so.
// - Ops never allocate. Scratch memory, where an op needs it, is passed in.
// - Every floating tensor of one op call has the op's float type, f32 or f64 (f64 is for
//   finite-difference gradient checks on the CPU; the CUDA backend computes in f32), except the
//   fields marked "bf16" below. Index tensors are i32.
// - bf16 (the bf16 GEMM mode's storage, docs/model.md §7; f32 calls only, every backend): a field marked
//   "may be bf16" holds bf16 values. A bf16 input is widened exactly to f32; a bf16 output is the
//   op's f32 result rounded once to nearest even (core/dtype.h), so it equals bf16(the f32 result
//   the op computes from the same, widened, inputs); the arithmetic in between is the f32 op's.
//   GEMM operands and outputs in bf16 also need GemmPrecision::kBF16 (backend.h).
// - Scalars that depend on device data (lambda, loss, norms) are tensors, never host values,
//   so a GPU step needs no host synchronisation.
// Shapes: N = tokens (B·T rows), D = model dim, V = vocab, E = routed experts, K = experts per token.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace diffmoe {

// ---------------------------------------------------------------- basic tensor ops
struct FillArgs {
  Tensor out;
  double value = 0.0;
};
struct CopyArgs {
  Tensor dst;
  Tensor src;
};  // same numel; converts dtypes
struct AxpyArgs {
  Tensor y;
  Tensor x;
  double alpha = 1.0;
};  // y += alpha * x (same shape)
struct ScaleArgs {
  Tensor y;
  double alpha = 1.0;
};  // y *= alpha
// out[0] += sum(x²) over all elements. out: [1], accumulates so one call per tensor builds a norm.
struct SumSquaresArgs {
  Tensor out;
  Tensor x;
};
// count[0] = the number of NaN and ±inf elements of x (overwritten): the finite check of weights
// and optimizer state before a checkpoint is written (one call over an arena's flat view).
// count: [1] i64, device-resident so that enqueueing it needs no host sync; x: a float tensor
// (CPU: f32, f64 or bf16; CUDA: f32 or bf16).
struct CountNonfiniteArgs {
  Tensor count;
  Tensor x;
};

// ---------------------------------------------------------------- embedding (docs/model.md §1)
// out[n, :] = scale · table[tokens[n], :]            out [N,D], tokens [N] i32, table [V,D]
struct EmbeddingFwdArgs {
  Tensor out;
  Tensor tokens;
  Tensor table;
  double scale = 1.0;
};
// dtable[tokens[n], :] += scale · dout[n, :]
struct EmbeddingBwdArgs {
  Tensor dtable;
  Tensor tokens;
  Tensor dout;
  double scale = 1.0;
};

// ---------------------------------------------------------------- RMSNorm (docs/derivations.md App. A)
// Rows of width `width` read at x + n·x_stride, written at y + n·y_stride (stride 0 = width), so a
// norm can run on the first columns of a wider buffer (kv_norm on the latent part of wkv_a's output).
// y = out_scale · x · r ⊙ w,   r = (mean(x²) + eps)^-1/2 saved in rstd [N].
// y may be bf16 (rounded once: an activation only GEMMs read).
struct RmsNormFwdArgs {
  Tensor y;
  Tensor rstd;
  Tensor x;
  Tensor w;
  int64_t rows = 0, width = 0, x_stride = 0, y_stride = 0;
  double eps = 1e-6, out_scale = 1.0;
  // Optional, with an f32 y: [rows, width] bf16 (contiguous) receives y rounded once as well: the
  // FFN's x_norm for its GEMMs beside the f32 one the router reads (the bf16 GEMM mode).
  Tensor y16 = {};
};
// dx = r·(g − x̂·mean(g⊙x̂)), g = out_scale·dy⊙w;  dw += Σ_rows out_scale·dy⊙x̂.
// dx rows use x_stride; dy rows use y_stride. dx is overwritten unless dx_accumulate.
struct RmsNormBwdArgs {
  Tensor dx;
  Tensor dw;
  Tensor dy;
  Tensor x;
  Tensor w;
  Tensor rstd;
  int64_t rows = 0, width = 0, x_stride = 0, y_stride = 0;
  double out_scale = 1.0;
  bool dx_accumulate = false;
  // Optional, with an f32 dx: [rows, width] bf16 (contiguous) receives the final dx (after
  // accumulation) rounded once: the residual gradient as the next backward GEMMs read it, without a
  // separate rounding pass (the bf16 GEMM mode, docs/model.md §7).
  Tensor dx16 = {};
};

// ---------------------------------------------------------------- GEMM
// C = alpha · op(A) · op(B) + beta · addend, all 2-D row-major; op(X) = Xᵀ when trans_X.
// op(A): [m,k], op(B): [k,n], C: [m,n]. A linear layer y = x Wᵀ is {C=y, A=x, B=W, trans_b=true}.
// addend: empty (default) = C itself (C = alpha·op(A)·op(B) + beta·C); else a tensor of C's shape
// and dtype that is only read (it may be C itself, but must not partly overlap it): a residual
// r + x Wᵀ is {C=out, A=x, B=W, trans_b=true, beta=1, addend=r}, without a copy of r into out.
// BLAS rule: with beta = 0 neither C nor the addend is read (stale NaNs do not propagate).
// Precision (backend.h GemmPrecision): kF32 multiplies the tensors' values; kBF16 rounds A and B to
// bf16 first and sums the products in f32. In the bf16 mode A and B may be bf16 (weight copies,
// activations rounded once for several GEMMs; read as they are) and C may be bf16 (beta = 0 only,
// not with f32_exact): the f32 result rounded once, for activations only element-wise ops read.
// f32_exact: f32 arithmetic on f32 operands even in the bf16 mode (the router's z = u Eᵀ, docs/model.md §5).
struct GemmArgs {
  Tensor c;
  Tensor a;
  Tensor b;
  bool trans_a = false, trans_b = false;
  double alpha = 1.0, beta = 0.0;
  bool f32_exact = false;
  Tensor addend = {};
};
// Grouped GEMM over experts, groups are contiguous row blocks of A and C given by
// offsets [G+1] (i32, device-resident; offsets[0] = 0, offsets[G] = rows in use):
//   C[rows_g] = alpha · (A[rows_g] · op(B[g]) + A2[rows_g] · op(B2[g])) + beta · C[rows_g]
// A: [R, k]; B: [G, n, k] when trans_b (weights stored [out,in]) else [G, k, n]; C: [R, n].
// The second term (a2, b2) is optional: both empty (default) = none. It has the same layout rules
// as (a, b) with its own inner size k2 (may differ from k): A2 [R, k2], B2 [G, n, k2] when trans_b
// else [G, k2, n]. It equals a one-term call followed by a second one with beta = 1, but the GPU
// kernel sums both products in one accumulator (K = k + k2) and writes C once: the MoE backward's
// dx_perm = da·W1 + db·W3. Rows at or beyond offsets[G] are left untouched.
// Precision as GemmArgs: in the bf16 mode A, B, A2, B2 may be bf16, and C may be bf16 with beta = 0:
// both terms summed in f32, then rounded once (docs/model.md §7; the expert activations that only
// element-wise ops read).
// max_group_rows: a bound the caller knows on every group's rows (0: none). The decode engine knows one: a token
// picks each expert at most once and each head's absorption is one row per token, so no group has more rows than
// the step has tokens. A backend may pick a kernel for few rows from it (CUDA: one that streams B with every SM
// busy, where the tiled kernel gives a group of one row a few CTAs); a group with more rows is an error, as a bad
// offset is, wherever the offsets are checked (the CPU, CUDA's f32 path and its few-rows kernel; the tiled kernel
// does not read the bound).
struct GroupedGemmArgs {
  Tensor c;
  Tensor a;
  Tensor b;
  Tensor offsets;
  bool trans_b = true;
  double alpha = 1.0, beta = 0.0;
  Tensor a2 = {};
  Tensor b2 = {};
  int64_t max_group_rows = 0;
};
// Weight gradient of a grouped GEMM ("k-grouped"): for each group g,
//   C[g] = alpha · A[rows_g]ᵀ · B[rows_g] + beta · C[g]
// A: [R, m], B: [R, n], C: [G, m, n]. An empty group leaves beta·C[g]. Precision as GemmArgs: in
// the bf16 mode A and B may be bf16; C (a weight gradient, accumulated) is never bf16.
// sum_sq (optional, [1], C's dtype): sum_sq[0] += Σ over all of C of the new C², as sum_squares
// would add it after the call. The optimizer's global gradient norm (docs/model.md §7) takes the expert
// stacks' share from here: the GPU kernel squares the values it is about to store, so the norm no
// longer reads the expert gradients (most of the model's bytes) a second time.
struct GroupedGemmWgradArgs {
  Tensor c;
  Tensor a;
  Tensor b;
  Tensor offsets;
  double alpha = 1.0, beta = 1.0;
  Tensor sum_sq = {};
};

// ---------------------------------------------------------------- FP8 (docs/model.md §7, docs/derivations.md §6)
// The DeepSeek-V3 recipe's e4m3 tensors, each with f32 scales for tiles of 128 along a GEMM's
// reduction dimension. Quantisation is exact and gives the same bits on every backend: per tile,
// amax = max|x| (f32), s = e4m3_scale(amax, ue8m0) (core/dtype.h: max(amax, 1e-4) / 448, with ue8m0
// rounded up to a power of two), q = e4m3(x · r) with r = 1 / s (core/dtype.h e4m3_inverse_scale): the f32
// product rounded to nearest even and saturated to ±448. q stands for q·s. Tiles at the edges (a size not a multiple of
// 128) take the max over the values present, as if zero-padded.
//
// Scale layouts are the ones cuBLASLt's block-scaled FP8 GEMM reads on Hopper, so the GEMM takes the
// quantisers' outputs as they are:
// - 1×128 tiles (activations, activation gradients; CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) of
//   X [R, K], each row cut into tiles of 128 along K: scale [ceil(K/128), R] f32, scale[kb, r] for
//   X[r, 128·kb ...]. Rows are the contiguous index ("outer-dimension major"), not K-blocks.
// - 128×128 blocks (weights; CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F) of W [N, K]:
//   scale [ceil(N/128), fp8_block_scale_cols(K)] f32, scale[nb, kb] for W[128·nb ..., 128·kb ...];
//   each row padded to a multiple of 4 floats (cuBLASLt wants 16-byte scale strides). The padding is
//   written 0 and never read.
constexpr int64_t kFp8Tile = 128;
constexpr int64_t fp8_tiles(int64_t n) { return (n + kFp8Tile - 1) / kFp8Tile; }
constexpr int64_t fp8_block_scale_cols(int64_t k) { return (fp8_tiles(k) + 3) / 4 * 4; }

// act_quant: x [M, K] (f32 or bf16) into one or both copies
//   q   [M, K] e4m3, scale   [ceil(K/128), M]: 1×128 tiles along K (row-wise: Fprop's and Dgrad's A)
//   q_t [K, M] e4m3, scale_t [ceil(M/128), K]: 128×1 tiles along M, stored transposed, i.e. xᵀ
//       quantised row-wise (K-major, as the Wgrad GEMM reads it: its reduction dimension is M)
// Either pair may be empty (not both); given both, one pass over x writes both, and each is quantised
// from x itself, never from the other copy (docs/model.md §7).
// offsets (optional, [G+1] i32 as GroupedGemmArgs'; q_t required, q optional): the rows are G
// groups (the routed experts' rows), and each group's 128×1 tiles start at its first row, so no tile
// crosses a group's end (the grouped Wgrad reduces over one group's rows). Group g's tile j is tile slot
// t = fp8_group_tile_base(g) + j, fp8_group_tile_base(g) = Σ_{g' < g} ceil(rows_g' / 128), and the
// copy is padded to whole tiles:
//   q_t [K, 128·T] e4m3, scale_t [T, K] with T = fp8_group_tiles(M, G) (a bound on the slots used):
//   q_t[k, 128·t + i] = x[offsets[g] + 128·j + i, k] quantised, 0 past the group's last row.
// The row-wise copy beside it (q, scale as without offsets; one pass over x for both): rows < offsets[G].
// Slots past the last group's and rows at or past offsets[G] are not written.
struct ActQuantArgs {
  Tensor q = {};
  Tensor scale = {};
  Tensor q_t = {};
  Tensor scale_t = {};
  Tensor x;
  bool ue8m0 = false;
  Tensor offsets = {};
};
// Tile slots of act_quant's grouped transposed copy: Σ_g ceil(rows_g/128) ≤ ceil(M/128) + G.
constexpr int64_t fp8_group_tiles(int64_t rows, int64_t groups) { return fp8_tiles(rows) + groups; }
// weight_quant: W [N, K] (f32 or bf16) in 128×128 blocks into one or both copies
//   q   [N, K] e4m3, scale   [ceil(N/128), fp8_block_scale_cols(K)]   (Fprop's B)
//   q_t [K, N] e4m3, scale_t [ceil(K/128), fp8_block_scale_cols(N)]   (Wᵀ: Dgrad's B)
// A block's amax does not depend on its orientation, so q_t = qᵀ and scale_t = scaleᵀ bit for bit.
// A stack W [G, N, K] (the routed experts) is G weights quantised each on its own, every tensor
// above with a leading G: q [G, N, K], scale [G, ceil(N/128), …], q_t [G, K, N], scale_t [G, ceil(K/128), …].
// bf16_source: quantise the bf16 rounding of w (each f32 value rounded to nearest even first, the bits
// a bf16 copy of w holds; a bf16 w is unchanged): the fp8 mode's f32 compute weights, without a copy.
struct WeightQuantArgs {
  Tensor q = {};
  Tensor scale = {};
  Tensor q_t = {};
  Tensor scale_t = {};
  Tensor w;
  bool ue8m0 = false;
  bool bf16_source = false;
};
// weight_dequant: w [N, K] = q[n, k] · scale[n/128, k/128], one f32 product per element, rounded to
// w's dtype (f32 or bf16; the CPU also f64, where the product is exact). q, scale as weight_quant's.
struct WeightDequantArgs {
  Tensor w;
  Tensor q;
  Tensor scale;
};

// fp8_gemm: C = alpha · Â·B̂ᵀ + beta · addend, Â and B̂ the dequantised values (q·s) of
//   A [M, K] e4m3, 1×128 tiles along K:  a_scale [ceil(K/128), M]
//   B [N, K] e4m3, b_scaling kBlock128x128: b_scale [ceil(N/128), fp8_block_scale_cols(K)]
//                  b_scaling kTile1x128:    b_scale [ceil(K/128), N]
//   C [M, N] f32, or bf16 with beta = 0 (the product rounded once); the CPU also writes f64
// Both operands K-major: the "TN" layout that Hopper's FP8 tensor cores need. The three GEMMs of a
// Linear Y = X Wᵀ (docs/derivations.md §6.1):
//   Fprop  Y   = X Wᵀ:  A = act_quant(X).q,    B = weight_quant(W).q,   kBlock128x128
//   Dgrad  dX  = dY W:  A = act_quant(dY).q,   B = weight_quant(W).q_t, kBlock128x128
//   Wgrad  dW += dYᵀX:  A = act_quant(dY).q_t, B = act_quant(X).q_t,    kTile1x128, beta = 1
// addend as GemmArgs::addend (empty = C; BLAS rule: beta = 0 reads neither). Arithmetic: the CPU
// dequantises exactly into f64, multiplies with f64 sums and rounds once into C; CUDA runs cuBLASLt's
// block-scaled FP8 GEMM (Hopper): exact products, f32 accumulation promoted out of the tensor cores
// (fast accumulation off, docs/derivations.md §6.3). CUDA also needs K % 16 == 0, M % 8 == 0, N % 8 == 0 and
// 16-byte aligned tensors (cuBLASLt's FP8 rules).
enum class Fp8Scaling : uint8_t { kTile1x128, kBlock128x128 };
struct Fp8GemmArgs {
  Tensor c;
  Tensor a;
  Tensor a_scale;
  Tensor b;
  Tensor b_scale;
  Fp8Scaling b_scaling = Fp8Scaling::kBlock128x128;
  double alpha = 1.0, beta = 0.0;
  Tensor addend = {};
};

// fp8_grouped_gemm: the routed experts' Fprop and Dgrad on FP8 operands, all groups in one call
// (offsets [G+1] as GroupedGemmArgs', device-resident):
//   C[rows_g] = Â[rows_g]·B̂[g]ᵀ (+ Â2[rows_g]·B̂2[g]ᵀ)
//   A [R, K] e4m3, a_scale [ceil(K/128), R]: act_quant of all R rows at once (a 1×128 tile never
//     crosses rows, so this is each group's own quantisation)
//   B [G, N, K] e4m3, b_scale [G, ceil(N/128), fp8_block_scale_cols(K)]: weight_quant of the stack
//   A2 [R, K2], B2 [G, N, K2] (optional, both or neither) likewise: the MoE backward's
//     dx = da·W1 + db·W3 in one accumulator
//   C [R, N] f32 or bf16 (the CPU also f64): written, each value rounded once; rows ≥ offsets[G] untouched.
// Fprop: B = weight_quant(W).q of the stack [G, out, in]; Dgrad: B = weight_quant(W).q_t [G, in, out].
// Arithmetic as fp8_gemm's: the CPU's exact dequantised product in f64; CUDA (Hopper, sm_90a) wgmma
// with the partial sums of each 128-wide k-tile promoted to f32 with their two scales
// (docs/derivations.md §6.3). CUDA also needs K, K2 multiples of 16, N a multiple of 8 and 16-byte
// aligned tensors.
struct Fp8GroupedGemmArgs {
  Tensor c;
  Tensor a;
  Tensor a_scale;
  Tensor b;
  Tensor b_scale;
  Tensor offsets;
  Tensor a2 = {};
  Tensor a2_scale = {};
  Tensor b2 = {};
  Tensor b2_scale = {};
};

// fp8_grouped_gemm_wgrad: the routed experts' FP8 weight gradient, all groups in one call
// (GroupedGemmWgradArgs with FP8 operands): for each group g,
//   C[g] = Â_g·B̂_gᵀ + beta·C[g],  summed over the group's rows
//   A [M, 128·T] e4m3, a_scale [T, M]: dy's grouped transposed copy (act_quant with offsets)
//   B [N, 128·T] e4m3, b_scale [T, N]: x's, from the same offsets
//   C [G, M, N] f32 (the CPU also f64); an empty group leaves beta·C[g]
// T = the copies' tile slots (A's width / 128); group g reduces over its slots
// fp8_group_tile_base(g) … + ceil(rows_g/128) − 1 (act_quant's layout: zeros past its last row).
// sum_sq (optional, [1], C's dtype): sum_sq[0] += Σ of the new C² (GroupedGemmWgradArgs::sum_sq).
// Arithmetic as fp8_grouped_gemm's. CUDA also needs M, N multiples of 8 and 16-byte aligned tensors.
struct Fp8GroupedGemmWgradArgs {
  Tensor c;
  Tensor a;
  Tensor a_scale;
  Tensor b;
  Tensor b_scale;
  Tensor offsets;
  double beta = 1.0;
  Tensor sum_sq = {};
};

// ---------------------------------------------------------------- RoPE (docs/model.md §3, interleaved)
// In place on x: [N, W]; for each row n and head h < n_heads the pairs at columns
// h·head_stride + col_offset + 2i, +1 (i < rope_dim/2) are rotated by angle pos·θ'_i, where
// pos = pos_offset + n % seq_len, cos/sin tables [max_pos, rope_dim/2] (YaRN already folded in).
// inverse = true rotates by −angle: the backward of RoPE. x may be bf16 (q as its GEMM writes it in
// the bf16 mode; cos, sin f32): widened, rotated in f32, rounded once; other columns keep their bits.
// positions (optional, [N] i32): row n sits at position positions[n] instead (seq_len and pos_offset
// are then unused): the packed rows of a serving step, each sequence at its own position. Each
// position must be in [0, max_pos).
struct RopeArgs {
  Tensor x;
  Tensor cos;
  Tensor sin;
  int64_t n_heads = 1, head_stride = 0, col_offset = 0, rope_dim = 0, seq_len = 0, pos_offset = 0;
  bool inverse = false;
  Tensor positions = {};
};

// ---------------------------------------------------------------- MLA key/value assembly (docs/model.md §2)
// From the up-projection kv = ĉ W_kvbᵀ: [N, H·(d_nope + d_v)] (per head: k-nope then v) and the
// shared rope key kr = the last d_rope columns of wkv_a's output ([N, kr_stride], column kr_offset):
//   k[n, h] = [kv[n, h, :d_nope] ; kr[n]]   k: [N, H, d_nope + d_rope]
//   v[n, h] = kv[n, h, d_nope:]             v: [N, H, d_v]
// kv may be bf16 (W_kvb's output in the bf16 mode); k and v may be bf16, both or neither (the
// attention's operands, AttentionFwdArgs): each value moved, or rounded once from f32. kr is the
// op's float type.
struct MlaKvSplitFwdArgs {
  Tensor k;
  Tensor v;
  Tensor kv;
  Tensor kr;
  int64_t n_heads = 0, d_nope = 0, d_rope = 0, d_v = 0, kr_stride = 0, kr_offset = 0;
};
// Backward: dkv overwritten from dk, dv; dkr[n] = Σ_h dk[n, h, d_nope:] (docs/derivations.md §2.5, summed over
// heads in order in the op's float type), written into kr's columns of its wider buffer
// (overwritten there; other columns untouched). dk and dv may be bf16, both or neither (the
// attention's bf16 gradients), and dkv too (read only by W_kvb's backward GEMMs); dkr is never bf16.
struct MlaKvSplitBwdArgs {
  Tensor dkv;
  Tensor dkr;
  Tensor dk;
  Tensor dv;
  int64_t n_heads = 0, d_nope = 0, d_rope = 0, d_v = 0, kr_stride = 0, kr_offset = 0;
};

// ---------------------------------------------------------------- differential λ (docs/model.md §2)
// lambda[0] = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + lambda_init.  Vectors [d_qk], lambda [1].
struct DiffLambdaFwdArgs {
  Tensor lambda;
  Tensor lq1;
  Tensor lk1;
  Tensor lq2;
  Tensor lk2;
  double lambda_init = 0.0;
};
// dλ_q1 += dλ·e1·λ_k1, dλ_k1 += dλ·e1·λ_q1, dλ_q2 += −dλ·e2·λ_k2, dλ_k2 += −dλ·e2·λ_q2 (docs/derivations.md §1.4)
struct DiffLambdaBwdArgs {
  Tensor dlq1;
  Tensor dlk1;
  Tensor dlq2;
  Tensor dlk2;
  Tensor dlambda;
  Tensor lq1;
  Tensor lk1;
  Tensor lq2;
  Tensor lk2;
};

// ---------------------------------------------------------------- causal attention (docs/model.md §2)
// q, k: [B, T, H, d_qk]; v: [B, T, H, d_v]; H = component heads (even when differential).
// Plain (differential = false): out[b,t,h] = Σ_s softmax_s(scale·q_h·k_h + mask) v_h   out [B,T,H,d_v]
// Differential: diff head g pairs components 2g, 2g+1; V_g = [v_2g ; v_2g+1] (2·d_v wide);
//   O_g = A_{g,0} V_g − λ A_{g,1} V_g,  written as out[b,t,g] [2·d_v] (out is [B,T,H/2,2·d_v], the
//   same bytes as [B,T,H,d_v]); o2 = A_{g,1} V_g is saved for dλ. lambda: [1].
// lse [B, H, T]: log-sum-exp of each component's scaled, masked scores (saved for the backward).
// The op's float type is out's. q, k, v may be bf16, all three or none (the bf16 GEMM mode saves
// them so for every shape), with f32 outputs. The CPU and the CUDA f32 kernels widen them exactly;
// the CUDA tensor-core kernels (bf16 mode, shapes they cover) read them in place and round f32 q, k,
// v (and P, dS, dout) to bf16 themselves, so their results are the f32 op's within the bf16 bound.
struct AttentionFwdArgs {
  Tensor out;
  Tensor o2;
  Tensor lse;
  Tensor q;
  Tensor k;
  Tensor v;
  Tensor lambda;
  double scale = 1.0;
  bool differential = true;
};
// dq, dk, dv overwritten; dlambda[0] overwritten with −Σ⟨dO, O2⟩ (docs/derivations.md §1.4). dout has out's shape.
// o2 and lambda/dlambda are unused when not differential. q, k, v: as in AttentionFwdArgs; dq, dk, dv
// may be bf16 where q, k, v are (each rounded once: dq feeds W_q's GEMMs after RoPE, dk and dv the
// split's backward); dout and the rest have out's float type.
struct AttentionBwdArgs {
  Tensor dq;
  Tensor dk;
  Tensor dv;
  Tensor dlambda;
  Tensor dout;
  Tensor q;
  Tensor k;
  Tensor v;
  Tensor out;
  Tensor o2;
  Tensor lse;
  Tensor lambda;
  double scale = 1.0;
  bool differential = true;
};

// ---------------------------------------------------------------- latent-cache decoding (docs/model.md §2)
// Absorbed ("MQA mode") attention against the compressed cache (docs/derivations.md §2.4, §3.3): B sequences,
// Tq new query positions each, H component heads, r_kv = latent width, d_rope = rope key width.
//   out    [B, Tq, H_out, r_kv]   latent outputs; H_out = H/2 when differential, else H (overwritten)
//   q_lat  [B, Tq, H, r_kv]       q̃_j = q^C_j W^UK_j (the absorbed no-RoPE query)
//   q_rope [B, Tq, H, W]          q^R_j, already rotated, in columns [q_rope_offset, q_rope_offset +
//                                 d_rope) of each head's W values (so the rope part of the full query
//                                 [B, Tq, H, d_qk] can be passed with q_rope_offset = d_nope)
//   cache  [B, S, r_kv + d_rope]  row s = [ĉ_s ; k^R_s] (post-norm latent, post-RoPE key); only
//                                 positions s < kv_len are read, S ≥ kv_len is the capacity
//   lambda [1]                    differential only
// The queries are the LAST Tq cached positions: query t sits at p_t = kv_len − Tq + t and sees
// s ≤ p_t (causal). With z_{j,s} = scale · (q̃_j·ĉ_s + q^R_j·k^R_s) and A_j = softmax_s(z_j):
//   plain:        out[b,t,j] = Σ_s A_{j,s} ĉ_s
//   differential: out[b,t,h] = Σ_s A_{2h,s} ĉ_s − λ Σ_s A_{2h+1,s} ĉ_s   (subtraction in latent space)
// The caller up-projects: o_j = out_h W^UVᵀ_j with h = j (plain) or j/2 (differential).
struct LatentAttentionArgs {
  Tensor out;
  Tensor q_lat;
  Tensor q_rope;
  Tensor cache;
  Tensor lambda;
  int64_t kv_len = 0, q_rope_offset = 0;
  double scale = 1.0;
  bool differential = true;
};

// ---------------------------------------------------------------- paged latent cache (docs/model.md §2)
// The serving engine's cache: one pool per layer of n_blocks blocks of block_size rows, row
// [ĉ_s ; k^R_s] (W = r_kv + d_rope values, as LatentAttentionArgs::cache). A sequence's positions
// live in the blocks its block table lists: position s of sequence b is row s % block_size of block
// block_table[b, s / block_size]. Slots name one row of the pool: slot = block · block_size + row.
//
// paged_cache_write: cache[slots[n] / block_size, slots[n] % block_size, :] = rows[n, :]
//   cache [n_blocks, block_size, W], rows [N, W], slots [N] i32 (distinct, in [0, n_blocks·block_size))
struct PagedCacheWriteArgs {
  Tensor cache;
  Tensor rows;
  Tensor slots;
};

// paged_latent_attention: LatentAttentionArgs over a paged cache and a packed batch of B sequences
// with different lengths and different numbers of new query rows (decode steps beside prefill chunks).
//   out         [H_out, N, r_kv]  latent outputs, head-major (the up-projection's grouped GEMM reads
//                                 head h's N rows contiguously); H_out = H/2 differential, else H
//   q_lat       [H, N, r_kv]      q̃_j = q^C_j W^UK_j, head-major (the absorption's grouped GEMM output)
//   q_rope      [N, H, W]         q^R_j, rotated, in columns [q_rope_offset, q_rope_offset + d_rope) of
//                                 each head's W values (the full query [N, H, d_qk], offset d_nope)
//   cache       [n_blocks, block_size, r_kv + d_rope]   one layer's pool
//   block_table [B, max_blocks] i32   blocks of sequence b in position order (entries past its length unused)
//   kv_lens     [B] i32               cached positions of sequence b, the new ones included
//   q_offsets   [B + 1] i32           query rows of sequence b: q_offsets[b] … q_offsets[b+1] − 1
//                                     (0 = q_offsets[0] ≤ … ≤ q_offsets[B] = N); they are its LAST
//                                     positions: row q_offsets[b] + t sits at p = kv_lens[b] − n_b + t,
//                                     n_b = q_offsets[b+1] − q_offsets[b] ≤ kv_lens[b]
//   lambda      [1]                   differential only
// Row n of sequence b at position p attends to s ≤ p of sequence b, with z_{j,s} = scale·(q̃_j·ĉ_s +
// q^R_j·k^R_s), A_j = softmax_s(z_j):
//   plain: out[j, n] = Σ_s A_{j,s} ĉ_s;   differential: out[h, n] = Σ_s A_{2h,s} ĉ_s − λ Σ_s A_{2h+1,s} ĉ_s
// Index contents (block ids in [0, n_blocks), kv_lens ≤ max_blocks·block_size, the offsets) are the
// backend's checks (op_validation.h). A sequence with n_b = 0 is skipped.
struct PagedLatentAttentionArgs {
  Tensor out;
  Tensor q_lat;
  Tensor q_rope;
  Tensor cache;
  Tensor lambda;
  Tensor block_table;
  Tensor kv_lens;
  Tensor q_offsets;
  int64_t q_rope_offset = 0;
  double scale = 1.0;
  bool differential = true;
};

// ---------------------------------------------------------------- SwiGLU (docs/model.md §4)
// h = silu(a) ⊙ b, all [N, I]. a and b (and dh) share one dtype: f32, or bf16 (the expert GEMMs'
// outputs in the bf16 mode), which makes the outputs bf16 too; with f32 inputs h, and in the
// backward da and db (one dtype), may be bf16 (rounded once; they feed the expert GEMMs).
struct SwigluFwdArgs {
  Tensor h;
  Tensor a;
  Tensor b;
};
// da = dh ⊙ b ⊙ silu'(a), db = dh ⊙ silu(a) (overwritten).
struct SwigluBwdArgs {
  Tensor da;
  Tensor db;
  Tensor dh;
  Tensor a;
  Tensor b;
};

// ---------------------------------------------------------------- MoE routing (docs/model.md §5)
enum class ScoreFunc : uint8_t { kSigmoid, kSoftmax };
struct RouterOptions {
  ScoreFunc score_func = ScoreFunc::kSigmoid;
  int64_t n_groups = 1, n_limited_groups = 1, top_k = 1;
  double route_scale = 1.0;
  bool use_bias = true;  // group score = top-2 sum of s+b when true, max of s when false
};
// logits z [N,E] → scores s [N,E]; topk_idx [N,K] i32 (selected with s+b and group limits, ordered
// by descending selection score, ties to the lower index); topk_w [N,K] = s[idx] (renormalised for
// sigmoid) · route_scale. counts [E] (i32) += number of tokens routed to each expert.
struct RouterFwdArgs {
  Tensor scores;
  Tensor topk_idx;
  Tensor topk_w;
  Tensor counts;
  Tensor logits;
  Tensor bias;
  RouterOptions opt;
};
// dlogits [N,E] overwritten from dtopk_w [N,K] (docs/derivations.md §4.4; no gradient through selection).
struct RouterBwdArgs {
  Tensor dlogits;
  Tensor dtopk_w;
  Tensor scores;
  Tensor topk_idx;
  Tensor topk_w;
  RouterOptions opt;
};
// Sequence-wise aux loss (docs/derivations.md §4.6): scores [B·T, E] (unbiased s); loss[0] += alpha · mean over
// the B sequences of Σ_i f_i P_i. f uses the plain top_k of s (no bias, no groups).
struct AuxLossFwdArgs {
  Tensor loss;
  Tensor scores;
  int64_t seq_len = 0, top_k = 1;
  double alpha = 0.0;
  ScoreFunc score_func = ScoreFunc::kSigmoid;
};
// dlogits [N,E] += dloss · ∂L/∂z, dloss a host scale (the loss is a plain sum into the total).
struct AuxLossBwdArgs {
  Tensor dlogits;
  Tensor scores;
  int64_t seq_len = 0, top_k = 1;
  double alpha = 0.0;
  double dloss = 1.0;
  ScoreFunc score_func = ScoreFunc::kSigmoid;
};

// Routing plan: sorts the N·K (token, slot) assignments by expert, stable in (token, slot) order.
//   offsets [E+1] i32: rows of expert e are offsets[e] .. offsets[e+1]
//   src_row [≤ N·K] i32: token of permuted row r;   slot_pos [N, K] i32: permuted row of (n, k)
// A slot whose topk_idx is -1 is unused (expert parallelism: the token's rows that another rank
// computes, EpDispatchPlanArgs): it gets no row and slot_pos -1; offsets[E] counts the used slots, and
// src_row needs room for them only (rows past them are left untouched).
struct MoePermuteArgs {
  Tensor offsets;
  Tensor src_row;
  Tensor slot_pos;
  Tensor topk_idx;
  int64_t n_experts = 0;
};
// x_perm[r] = x[src_row[r]]   x: [N,D], x_perm: [R, D] with R = src_row's length (typically N·K)
struct MoeGatherArgs {
  Tensor x_perm;
  Tensor x;
  Tensor src_row;
};
// dx[n] += Σ_k dx_perm[slot_pos[n,k]] over the slots with slot_pos >= 0 (accumulates: dx already
// holds the shared expert's dx). slot_pos [N, S] for any S (expert parallelism also gathers rows per
// (token, rank) pair with it).
struct MoeGatherBwdArgs {
  Tensor dx;
  Tensor dx_perm;
  Tensor slot_pos;
};
// y[n] += Σ_k topk_w[n,k] · y_perm[slot_pos[n,k]] over the slots with slot_pos >= 0
// (y already holds the shared expert's output)
struct MoeCombineFwdArgs {
  Tensor y;
  Tensor y_perm;
  Tensor topk_w;
  Tensor slot_pos;
};
// dy_perm[slot_pos[n,k]] = topk_w[n,k]·dy[n];  dtopk_w[n,k] = ⟨dy[n], y_perm[slot_pos[n,k]]⟩ (overwritten),
// and dtopk_w[n,k] = 0 for an unused slot (slot_pos -1).
// (dy_perm may be bf16 for f32 dy; it feeds only the bf16 expert GEMMs)
struct MoeCombineBwdArgs {
  Tensor dy_perm;
  Tensor dtopk_w;
  Tensor dy;
  Tensor y_perm;
  Tensor topk_w;
  Tensor slot_pos;
};
// Expert-parallel dispatch plan (docs/model.md §12): ranks P, each holding E_l = E/P consecutive experts
// (rank r: [r·E_l, (r+1)·E_l)). A token is sent once to every rank holding one of its experts: the
// pairs (n, r) with some slot k whose expert topk_idx[n,k] is on r, numbered in (r, n) order.
//   counts     [P·(1+E_l)] i32: counts[r·(1+E_l)] = pairs to rank r; counts[r·(1+E_l) + 1 + e] =
//              slots routed to r's local expert e (overwritten)
//   pair_token [M] i32: the token of pair i (M >= the number of pairs, N·min(K, P) always suffices;
//              entries past the pairs are left untouched)
//   pair_of    [N, P] i32: the pair of (n, r), or -1 when n has no expert on r
//   pair_idx   [M, K] i32: for pair i = (n, r), slot k: topk_idx[n,k] − r·E_l when on r, else -1
//   pair_w     [M, K] (topk_w's dtype): topk_w[n,k] when on r, else 0
// topk_idx [N, K], topk_w [N, K]. The rank receiving pair i runs its experts on it with
// (pair_idx, pair_w) as the token's routing (moe_permute's unused slots), and returns one row per pair.
struct EpDispatchPlanArgs {
  Tensor counts;
  Tensor pair_token;
  Tensor pair_of;
  Tensor pair_idx;
  Tensor pair_w;
  Tensor topk_idx;
  Tensor topk_w;
  int64_t ranks = 1, local_experts = 1;
};
// Bias update once per optimizer step (docs/model.md §5): b_i += rate · sign(mean(counts) − counts_i).
struct MoeBiasUpdateArgs {
  Tensor bias;
  Tensor counts;
  double rate = 1e-3;
};

// ---------------------------------------------------------------- loss
// Cross-entropy over the vocabulary: logits [N,V], targets [N] i32 (−1 = ignore). logits may be bf16
// (the head's GEMM output in the bf16 mode; then loss_sum and valid are f32).
// loss_sum[0] += Σ_valid (logsumexp − logit[target]);  valid[0] += number of targets ≠ −1.
struct CrossEntropyFwdArgs {
  Tensor loss_sum;
  Tensor valid;
  Tensor logits;
  Tensor targets;
};
// dlogits = grad_scale · (softmax(logits) − onehot(target)) / valid[0]; rows with target −1 get 0.
// dlogits may be bf16 (rounded once; it feeds only the head's GEMMs).
struct CrossEntropyBwdArgs {
  Tensor dlogits;
  Tensor logits;
  Tensor targets;
  Tensor valid;
  double grad_scale = 1.0;
};

// ---------------------------------------------------------------- optimizer
// AdamW (decoupled weight decay), one tensor. step is 1-based (bias correction).
// The gradient is first multiplied by clip = min(1, max_norm / (sqrt(grad_sq[0]) + 1e-6)) when
// max_norm > 0, where grad_sq [1] is the global Σg² (device-resident, no host sync).
//   m = b1·m + (1−b1)·g;  v = b2·v + (1−b2)·g²
//   p −= lr · ( m/(1−b1^t) / (sqrt(v/(1−b2^t)) + eps) + weight_decay · p )
// param_bf16 (optional, param's shape, bf16): also receives bf16(updated param), rounded to nearest
// even: the bf16 GEMM mode's weight copy, written in the same pass instead of a refresh later.
// m, v: param's dtype, or both bf16 (optim.moment_dtype, docs/model.md §7): read exactly, updated as
// above in the same arithmetic, stored as bf16(f32(m)) and bf16(f32(v)) rounded to nearest even;
// the param update uses the unrounded new m and v, so it is the same as with moments m, v of the
// param's dtype holding the same values.
struct AdamWArgs {
  Tensor param;
  Tensor m;
  Tensor v;
  Tensor grad;
  Tensor grad_sq;
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0, max_norm = 0.0;
  int64_t step = 1;
  Tensor param_bf16 = {};
};

// AdamW over many tensors in one call: for every entry exactly the per-tensor AdamWArgs update
// (bitwise the same results), with the entry's own weight_decay and the shared hyper-parameters
// and grad_sq below. Every entry is checked like AdamWArgs before any is updated; all float tensors
// of the call have one dtype (an entry's m and v may be bf16, as in AdamWArgs); empty tensors are
// allowed and skipped. Entries must not overlap.
// (CUDA: one launch for all entries; the backend caches the list's device table and uploads it again
// only when the list changes — keep one AdamWMultiArgs and refresh it, as AdamW (train) does.)
struct AdamWEntry {
  Tensor param;
  Tensor m;
  Tensor v;
  Tensor grad;
  Tensor param_bf16 = {};  // optional bf16 copy of the updated param (AdamWArgs::param_bf16)
  double weight_decay = 0.0;
};
struct AdamWMultiArgs {
  std::vector<AdamWEntry> entries = {};
  Tensor grad_sq = {};  // read only when max_norm > 0
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, max_norm = 0.0;
  int64_t step = 1;
};

}  // namespace diffmoe
