// Host glue of the tensor-core attention (kernels and design: tc_attention.cuh): coverage, the
// scratch layout, and the launches, each checked. Sequence per call:
//   forward:  q, k, v → bf16 (scratch) → tca_fwd_kernel
//   backward: q, k, v → bf16; prep (dout → bf16, D_c, dλ row partials) → dK/dV kernel → dQ kernel
//             → dλ reduction (differential only)
// q, k, v → bf16 is skipped where they are bf16 already (the bf16 GEMM mode's saved activations,
// AttentionFwdArgs): the kernels read them in place, which saves 3 conversions (~0.13 ms at the
// bench shape) per call. A bf16 tensor not 16-byte aligned (cp.async reads 16-byte chunks; an
// offset view, never an arena's) is copied as it is into the scratch instead.
// The bf16 copies live in the backend's shared scratch (be.scratch: one stream at a time, grown on
// the first call, then reused), not in the GEMMs' bf16 buffer.
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/tc_attention.cuh"
#include "backend/cuda/tc_attention.h"

namespace diffmoe::cuda {
namespace {

tca::TcaShape tca_shape(const AttnDims& d, double scale) {
  return {static_cast<int>(d.batch), static_cast<int>(d.seq), static_cast<int>(d.heads), static_cast<int>(d.groups),
          static_cast<int>(d.comps), static_cast<int>(d.d_v), static_cast<float>(scale)};
}

tca::TcaKernels pick_or_throw(const AttnDims& d, std::string_view op) {
  tca::TcaKernels k{};
  DIFFMOE_CHECK(
      tca::tca_pick(static_cast<int>(d.d_qk), static_cast<int>(d.comps * d.d_v), static_cast<int>(d.comps), &k),
      "[{}] the tensor-core attention does not cover d_qk = {}, width = {}", op, d.d_qk, d.comps * d.d_v);
  return k;
}

struct Operands {  // bf16 q, k, v (the caller's or copies in the scratch), the backward's dout, D, dλ partials
  const tca::bf16 *q, *k, *v;
  tca::bf16* dout;
  float* dvec;
  double* dl_part;
};

// A bf16 tensor the kernels can read in place: cp.async takes 16-byte chunks, and every row offset
// is a multiple of 16 bytes (d_qk and the value-group widths are multiples of 8 values).
bool bf16_in_place(const Tensor& t) { return t.dtype == DType::kBF16 && reinterpret_cast<uintptr_t>(t.data) % 16 == 0; }

// bf16 q, k, v for the kernels: in place where all three can be (bf16_in_place), else all three
// into the scratch, f32 ones rounded to nearest even (cuda_common.cuh), bf16 ones copied as they are.
Operands stage_inputs(CudaBackend& be, cudaStream_t s, const AttnDims& d, const tca::TcaShape& sh, const Tensor& q,
                      const Tensor& k, const Tensor& v, bool backward, std::string_view op) {
  const bool in_place = bf16_in_place(q) && bf16_in_place(k) && bf16_in_place(v);
  const tca::TcaScratchLayout l = tca::tca_scratch_layout(sh, static_cast<int>(d.d_qk), backward, !in_place);
  char* base = l.bytes == 0 ? nullptr : static_cast<char*>(be.scratch(l.bytes));
  Operands o{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (backward) {
    o.dout = reinterpret_cast<tca::bf16*>(base + l.dout);
    o.dvec = reinterpret_cast<float*>(base + l.dvec);
    o.dl_part = reinterpret_cast<double*>(base + l.dl_part);
  }
  if (in_place) {
    o.q = static_cast<const tca::bf16*>(q.data);
    o.k = static_cast<const tca::bf16*>(k.data);
    o.v = static_cast<const tca::bf16*>(v.data);
    return o;
  }
  const auto stage = [&](const Tensor& t, size_t offset) {
    void* dst = base + offset;
    if (t.dtype == DType::kBF16) CUDA_CHECK(cudaMemcpyAsync(dst, t.data, t.nbytes(), cudaMemcpyDeviceToDevice, s));
    else f32_to_bf16(dst, f32(t), t.numel(), s, op);
    return static_cast<const tca::bf16*>(dst);
  };
  o.q = stage(q, l.q);
  o.k = stage(k, l.k);
  o.v = stage(v, l.v);
  return o;
}

// The kernels' tiles are sized for Hopper's 227 KB of shared memory per block (the backward at d_qk
// 128 needs 173 KB): other devices (A100 164 KB, sm_86/89 99 KB) keep the f32 flash kernels.
bool tc_attention_device_ok() {
  static const bool ok = [] {
    int dev = 0, major = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    return major == 9;
  }();
  return ok;
}

}  // namespace

bool tc_attention_covers(const AttnDims& d) {
  tca::TcaKernels k{};
  return tc_attention_device_ok() && d.seq <= INT32_MAX / 2 && d.heads <= 65535 && d.groups <= 65535 &&
         d.batch <= 65535 &&
         tca::tca_pick(static_cast<int>(d.d_qk), static_cast<int>(d.comps * d.d_v), static_cast<int>(d.comps), &k);
}

void tc_attention_fwd(CudaBackend& be, cudaStream_t s, const AttentionFwdArgs& a, const AttnDims& d) {
  constexpr std::string_view kOp = "attention_fwd";
  const tca::TcaKernels k = pick_or_throw(d, kOp);
  const tca::TcaShape sh = tca_shape(d, a.scale);
  const Operands o = stage_inputs(be, s, d, sh, a.q, a.k, a.v, false, kOp);
  const tca::TcaFwdArgs args{f32(a.out), a.differential ? f32(a.o2) : nullptr,     f32(a.lse), o.q, o.k,
                             o.v,        a.differential ? f32(a.lambda) : nullptr, sh};
  CUDA_CHECK(k.fwd(args, s));
  CUDA_CHECK_LAUNCH(kOp);
}

void tc_attention_bwd(CudaBackend& be, cudaStream_t s, const AttentionBwdArgs& a, const AttnDims& d) {
  constexpr std::string_view kOp = "attention_bwd";
  const tca::TcaKernels k = pick_or_throw(d, kOp);
  const tca::TcaShape sh = tca_shape(d, a.scale);
  const Operands o = stage_inputs(be, s, d, sh, a.q, a.k, a.v, true, kOp);
  const float* lambda = a.differential ? f32(a.lambda) : nullptr;
  constexpr int kPrepThreads = 256, kRowsPerBlock = kPrepThreads / kWarp;  // one warp per output row
  const dim3 prep_grid(static_cast<unsigned>((d.seq * d.groups + kRowsPerBlock - 1) / kRowsPerBlock),
                       static_cast<unsigned>(d.batch));
  tca::tca_bwd_prep_kernel<<<prep_grid, kPrepThreads, 0, s>>>(o.dout, o.dvec, o.dl_part, f32(a.dout), f32(a.out),
                                                              a.differential ? f32(a.o2) : nullptr, lambda, sh,
                                                              static_cast<int>(d.comps * d.d_v));
  CUDA_CHECK_LAUNCH(kOp);
  // dq, dk, dv: f32, or bf16 with bf16 q, k, v (validate_attention_bwd): exactly one pointer each.
  const auto f32_or_null = [](const Tensor& t) { return t.dtype == DType::kBF16 ? nullptr : f32(t); };
  // Two adjacent values per store need the pair's alignment (columns start even: d_qk, d_v are even).
  const auto pair_aligned = [](const Tensor* t) {
    return reinterpret_cast<uintptr_t>(t->data) % (t->dtype == DType::kBF16 ? 4 : 8) == 0;
  };
  const Tensor* grads[] = {&a.dq, &a.dk, &a.dv};
  const auto bf16_or_null = [](const Tensor& t) {
    return t.dtype == DType::kBF16 ? static_cast<__nv_bfloat16*>(t.data) : nullptr;
  };
  const tca::TcaBwdArgs args{f32_or_null(a.dq),
                             f32_or_null(a.dk),
                             f32_or_null(a.dv),
                             o.q,
                             o.k,
                             o.v,
                             o.dout,
                             f32(a.lse),
                             o.dvec,
                             lambda,
                             sh,
                             bf16_or_null(a.dq),
                             bf16_or_null(a.dk),
                             bf16_or_null(a.dv),
                             /*pair_stores=*/std::all_of(std::begin(grads), std::end(grads), pair_aligned)};
  CUDA_CHECK(k.dkv(args, s));
  CUDA_CHECK_LAUNCH(kOp);
  CUDA_CHECK(k.dq(args, s));
  CUDA_CHECK_LAUNCH(kOp);
  if (a.differential) {
    tca::tca_dlambda_kernel<<<1, tca::kDlambdaThreads, 0, s>>>(f32(a.dlambda), o.dl_part, d.batch * d.seq * d.groups);
    CUDA_CHECK_LAUNCH(kOp);
  }
}

}  // namespace diffmoe::cuda
