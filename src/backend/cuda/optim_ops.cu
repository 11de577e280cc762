// AdamW with decoupled weight decay and global-norm clipping folded in (op_args.h AdamWArgs) on the
// GPU. One thread per element, in double like the CPU reference (memory-bound); the moments f32 or
// bf16 (AdamWArgs), through the same arithmetic. The clip factor is
// computed by every thread from the device-resident grad_sq[0]: no host sync.
//
// adamw_multi (AdamWMultiArgs): every tensor of the list in one launch. Its blocks walk a flat list
// of work items (tensor, chunk of kAdamWChunk elements) from a device table that is uploaded only
// when the list changes (adamw_multi_table.h); each block updates its chunk with the same range
// function as the per-tensor kernel, so every element is bitwise the per-tensor op's. The per-tensor
// op launches once per tensor, and most of a model's tensors are tiny (norms, λ vectors) whose
// launch and tail cost more than their bytes; one launch removes that.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

struct AdamWConsts {
  double lr, beta1, beta2, eps, weight_decay, max_norm, bias1, bias2;  // bias_i = 1 − beta_i^step
};

// The moments' storage (op_args.h AdamWArgs): f32, or bf16 holding bf16(f32(x)) rounded to nearest
// even (the CPU twin rounds the same way, so the two agree bitwise).
__device__ __forceinline__ double load_moment(float x) { return x; }
__device__ __forceinline__ double load_moment(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store_moment(float& dst, double x) { dst = static_cast<float>(x); }
__device__ __forceinline__ void store_moment(__nv_bfloat16& dst, double x) {
  dst = __float2bfloat16_rn(static_cast<float>(x));
}

// One element: m = b1·m + (1−b1)·g;  v = b2·v + (1−b2)·g²;
// p −= lr·( m̂ / (sqrt(v̂) + eps) + wd·p ), decoupled decay on the pre-update p (with the unrounded
// new m and v).
template <class M>
__device__ __forceinline__ void adamw_element(float& p, M& m, M& v, float grad, double clip, const AdamWConsts& c) {
  const double g = grad * clip;
  const double mi = c.beta1 * load_moment(m) + (1.0 - c.beta1) * g;
  const double vi = c.beta2 * load_moment(v) + (1.0 - c.beta2) * g * g;
  store_moment(m, mi);
  store_moment(v, vi);
  const double pi = p;
  const double update = (mi / c.bias1) / (sqrt(vi / c.bias2) + c.eps) + c.weight_decay * pi;
  p = static_cast<float>(pi - c.lr * update);
}

// Four consecutive moments as one vector load and store: float4 (16 bytes) or four bf16 (8 bytes).
struct alignas(8) Bf16x4 {
  __nv_bfloat16 x, y, z, w;
};
template <class M>
using Moment4 = std::conditional_t<std::is_same_v<M, float>, float4, Bf16x4>;
static_assert(sizeof(Bf16x4) == 8 && alignof(Bf16x4) == 8, "four bf16 moments move as one 8-byte access");

// Elements [first, n) of one tensor, stepping by `stride`: the per-tensor kernel's grid-stride loop
// and one adamw_multi chunk's block-stride loop. M: the moments' type (float or __nv_bfloat16).
// vec4: p and grad 16-byte aligned, m and v aligned to four moments (16 or 8 bytes), p16, when
// given, 8-byte aligned, so the first n/4·4 elements move as vectors of four (the op is
// memory-bound: 16 bytes read and 12 written per element with f32 moments, 12 and 8 with bf16, 2
// more written with the bf16 copy); the tail, or everything otherwise, by scalars. The arithmetic
// per element is the same either way. p16: the bf16 weight copy (AdamWArgs::param_bf16), or null.
template <class M>
__device__ __forceinline__ void adamw_range(float* p, M* m, M* v, const float* grad, __nv_bfloat16* p16, int64_t n,
                                            bool vec4, double clip, const AdamWConsts& c, int64_t first,
                                            int64_t stride) {
  int64_t start = 0;
  if (vec4) {
    using M4 = Moment4<M>;
    for (int64_t i = first; i < n / 4; i += stride) {
      float4 pi = reinterpret_cast<float4*>(p)[i];
      M4 mi = reinterpret_cast<M4*>(m)[i], vi = reinterpret_cast<M4*>(v)[i];
      const float4 gi = reinterpret_cast<const float4*>(grad)[i];
      adamw_element(pi.x, mi.x, vi.x, gi.x, clip, c);
      adamw_element(pi.y, mi.y, vi.y, gi.y, clip, c);
      adamw_element(pi.z, mi.z, vi.z, gi.z, clip, c);
      adamw_element(pi.w, mi.w, vi.w, gi.w, clip, c);
      reinterpret_cast<float4*>(p)[i] = pi;
      reinterpret_cast<M4*>(m)[i] = mi;
      reinterpret_cast<M4*>(v)[i] = vi;
      if (p16 != nullptr) {
        reinterpret_cast<__nv_bfloat162*>(p16)[2 * i] = __floats2bfloat162_rn(pi.x, pi.y);
        reinterpret_cast<__nv_bfloat162*>(p16)[2 * i + 1] = __floats2bfloat162_rn(pi.z, pi.w);
      }
    }
    start = n / 4 * 4;
  }
  for (int64_t i = start + first; i < n; i += stride) {
    adamw_element(p[i], m[i], v[i], grad[i], clip, c);
    if (p16 != nullptr) p16[i] = __float2bfloat16_rn(p[i]);
  }
}

// clip = min(1, max_norm / (sqrt(Σg²) + 1e-6)) when clipping, else 1.
__device__ __forceinline__ double clip_factor(const float* grad_sq, const AdamWConsts& c) {
  return c.max_norm > 0.0 ? fmin(1.0, c.max_norm / (sqrt(static_cast<double>(grad_sq[0])) + 1e-6)) : 1.0;
}

template <class M>
__global__ void adamw_kernel(float* p, M* m, M* v, const float* grad, const float* grad_sq, AdamWConsts c, int64_t n,
                             bool vec4, __nv_bfloat16* p16) {
  const double clip = clip_factor(grad_sq, c);
  adamw_range(p, m, v, grad, p16, n, vec4, clip, c, blockIdx.x * int64_t{blockDim.x} + threadIdx.x,
              int64_t{gridDim.x} * blockDim.x);
}

// One block per work item (grid-stride over the items when there are more than the grid): the
// item's chunk of its tensor, with the tensor's weight decay; c.weight_decay is unused.
using Row = AdamWMultiTable::Row;
using Item = AdamWMultiTable::Item;
__global__ void adamw_multi_kernel(const Row* rows, const Item* items, int64_t n_items, const float* grad_sq,
                                   AdamWConsts c) {
  const double clip = clip_factor(grad_sq, c);
  for (int64_t it = blockIdx.x; it < n_items; it += gridDim.x) {
    const Item item = items[it];
    const Row r = rows[item.row];  // a copy in registers: the stores below need not reload it
    AdamWConsts ce = c;
    ce.weight_decay = r.weight_decay;
    const int64_t begin = int64_t{item.chunk} * kAdamWChunk;
    const int64_t len = r.n - begin < kAdamWChunk ? r.n - begin : kAdamWChunk;
    auto* p16 = static_cast<__nv_bfloat16*>(r.p16);
    if (r.bf16_moments != 0) {
      adamw_range(r.p + begin, static_cast<__nv_bfloat16*>(r.m) + begin, static_cast<__nv_bfloat16*>(r.v) + begin,
                  r.grad + begin, p16 == nullptr ? nullptr : p16 + begin, len, r.vec4 != 0, clip, ce, threadIdx.x,
                  blockDim.x);
    } else {
      adamw_range(r.p + begin, static_cast<float*>(r.m) + begin, static_cast<float*>(r.v) + begin, r.grad + begin,
                  p16 == nullptr ? nullptr : p16 + begin, len, r.vec4 != 0, clip, ce, threadIdx.x, blockDim.x);
    }
  }
}

AdamWConsts adamw_consts(double lr, double beta1, double beta2, double eps, double weight_decay, double max_norm,
                         int64_t step) {
  const double t = static_cast<double>(step);
  return {lr, beta1, beta2, eps, weight_decay, max_norm, 1.0 - std::pow(beta1, t), 1.0 - std::pow(beta2, t)};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// Four moments of this dtype (f32 or bf16) start at p: one vector load (Moment4).
bool aligned_moments4(const void* p, DType dt) { return reinterpret_cast<uintptr_t>(p) % (4 * dtype_size(dt)) == 0; }

}  // namespace

void CudaBackend::adamw(Context ctx, const AdamWArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "adamw");
  validate_adamw(a, Device::kCUDA);
  require_f32(a.param, "adamw");
  const int64_t n = a.param.numel();
  if (n == 0) return;
  const AdamWConsts c = adamw_consts(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.max_norm, a.step);
  auto* p16 = static_cast<__nv_bfloat16*>(a.param_bf16.data);  // null when no bf16 copy is asked for
  const bool vec4 = aligned16(a.param.data) && aligned_moments4(a.m.data, a.m.dtype) &&
                    aligned_moments4(a.v.data, a.v.dtype) && aligned16(a.grad.data) &&
                    reinterpret_cast<uintptr_t>(p16) % 8 == 0;
  const unsigned grid = grid_for(vec4 ? (n + 3) / 4 : n);
  const float* grad_sq = a.max_norm > 0.0 ? f32(a.grad_sq) : nullptr;
  if (a.m.dtype == DType::kBF16) {
    adamw_kernel<<<grid, kThreads, 0, stream(ctx)>>>(f32(a.param), static_cast<__nv_bfloat16*>(a.m.data),
                                                     static_cast<__nv_bfloat16*>(a.v.data), f32(a.grad), grad_sq, c, n,
                                                     vec4, p16);
  } else {
    adamw_kernel<<<grid, kThreads, 0, stream(ctx)>>>(f32(a.param), f32(a.m), f32(a.v), f32(a.grad), grad_sq, c, n, vec4,
                                                     p16);
  }
  CUDA_CHECK_LAUNCH("adamw");
}

void CudaBackend::adamw_multi(Context ctx, const AdamWMultiArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "adamw_multi");
  validate_adamw_multi(a, Device::kCUDA);  // one dtype for all entries: checking the first checks all
  if (a.entries.empty()) return;
  require_f32(a.entries.front().param, "adamw_multi");
  const AdamWMultiTable::View table = adamw_table_.prepare(a.entries, stream(ctx));
  if (table.n_items == 0) return;
  const AdamWConsts c = adamw_consts(a.lr, a.beta1, a.beta2, a.eps, 0.0, a.max_norm, a.step);
  adamw_multi_kernel<<<grid_for(table.n_items, 1), kThreads, 0, stream(ctx)>>>(
      table.rows, table.items, table.n_items, a.max_norm > 0.0 ? f32(a.grad_sq) : nullptr, c);
  CUDA_CHECK_LAUNCH("adamw_multi");
  adamw_table_.mark_read(stream(ctx));
}

// ---------------------------------------------------------------- AdamWMultiTable

AdamWMultiTable::~AdamWMultiTable() {
  if (read_done_ != nullptr) (void)cudaEventDestroy(read_done_);  // never throws: a destructor
}

AdamWMultiTable::View AdamWMultiTable::prepare(const std::vector<AdamWEntry>& entries, cudaStream_t s) {
  candidate_.clear();  // keeps its capacity: no allocation once the list has been seen
  for (const AdamWEntry& e : entries) {
    const int64_t n = e.param.numel();
    if (n == 0) continue;
    DIFFMOE_CHECK((n - 1) / kAdamWChunk < std::numeric_limits<int32_t>::max(),
                  "[adamw_multi] a tensor of {} elements has more chunks than an i32 counts", n);
    Row r{};  // value-initialised: rows compare bytewise
    r.p = f32(e.param);
    r.m = e.m.data;  // f32 or bf16 (validated: m and v share one dtype)
    r.v = e.v.data;
    r.grad = f32(e.grad);
    r.p16 = e.param_bf16.data;  // null when no bf16 copy is asked for
    r.n = n;
    r.weight_decay = e.weight_decay;
    r.vec4 = aligned16(r.p) && aligned_moments4(r.m, e.m.dtype) && aligned_moments4(r.v, e.v.dtype) &&
             aligned16(r.grad) && reinterpret_cast<uintptr_t>(r.p16) % 8 == 0;
    r.bf16_moments = e.m.dtype == DType::kBF16 ? 1 : 0;
    candidate_.push_back(r);
  }
  DIFFMOE_CHECK(candidate_.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max()),
                "[adamw_multi] {} non-empty entries are more than an i32 counts", candidate_.size());
  if (candidate_.empty()) return {};
  const bool same = current_ && candidate_.size() == rows_.size() &&
                    std::memcmp(candidate_.data(), rows_.data(), rows_.size() * sizeof(Row)) == 0;
  if (!same) {
    current_ = false;  // until both copies are issued (a failed one leaves the device table stale)
    rows_.swap(candidate_);
    items_.clear();
    for (size_t r = 0; r < rows_.size(); ++r) {
      const int64_t chunks = (rows_[r].n + kAdamWChunk - 1) / kAdamWChunk;
      for (int64_t k = 0; k < chunks; ++k) items_.push_back({static_cast<int32_t>(r), static_cast<int32_t>(k)});
    }
    const size_t row_bytes = rows_.size() * sizeof(Row), item_bytes = items_.size() * sizeof(Item);
    items_offset_ = cuda::align256(row_bytes);
    device_.reserve(items_offset_ + item_bytes);  // grows only (cudaFree waits for the device)
    // The previous table may still be read by the last launch, possibly on another stream.
    if (read_recorded_) CUDA_CHECK(cudaStreamWaitEvent(s, read_done_, 0));
    // From pageable host memory: the call returns once the source is staged, and rows_ / items_
    // stay unchanged until the next change anyway.
    auto* base = static_cast<char*>(device_.get());
    CUDA_CHECK(cudaMemcpyAsync(base, rows_.data(), row_bytes, cudaMemcpyHostToDevice, s));
    CUDA_CHECK(cudaMemcpyAsync(base + items_offset_, items_.data(), item_bytes, cudaMemcpyHostToDevice, s));
    current_ = true;
    ++uploads_;
  }
  const auto* base = static_cast<const char*>(device_.get());
  return {reinterpret_cast<const Row*>(base), reinterpret_cast<const Item*>(base + items_offset_),
          static_cast<int64_t>(items_.size())};
}

void AdamWMultiTable::mark_read(cudaStream_t s) {
  if (read_done_ == nullptr) CUDA_CHECK(cudaEventCreateWithFlags(&read_done_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(read_done_, s));
  read_recorded_ = true;
}

}  // namespace diffmoe
