// Decoding against the compressed (latent) KV cache on the GPU (docs/model.md §2; docs/derivations.md §2.4, §3.3):
// absorbed MQA with one shared key/value head, key [ĉ_s ; k^R_s] (r_kv + d_rope), value ĉ_s.
//
// Design: one block per (query t, value group g, batch b), like attention_fwd. The block keeps the
// group's queries (one or two components) in shared memory, one warp per cached row s ≤ p_t
// scores it for every component into shared memory, then the max and normaliser per component
// (block reductions) turn the scores into w_s = Σ_c coef_c·A_{c,s} (coef_0 = 1, coef_1 = −λ), and
// each thread forms one latent column Σ_s w_s ĉ_s[i]: the differential subtraction happens in
// latent space, as on the CPU. Shared memory grows with kv_len (comps floats per cached row).
#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kLatentThreads = 128;
constexpr int kMaxComps = 2;

struct LatentShape {
  int64_t tq, heads, r_kv, d_rope, q_rope_width, q_rope_offset, capacity, comps, groups, kv_len;
};

// Shared memory: queries [comps][r_kv + d_rope], then scores [comps][kv_len].
__global__ void __launch_bounds__(kLatentThreads)
    latent_attention_kernel(float* out, const float* q_lat, const float* q_rope, const float* cache,
                            const float* lambda, LatentShape sh, float scale) {
  extern __shared__ float smem[];
  __shared__ float red[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const int64_t t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t row_w = sh.r_kv + sh.d_rope;
  float* q_s = smem;                           // [comps][row_w]: [q̃_j ; q^R_j]
  float* z = smem + sh.comps * row_w;          // [comps][kv_len]
  const int64_t last = sh.kv_len - sh.tq + t;  // absolute position p_t: keys s = 0 … p_t
  const float* cache_b = cache + b * sh.capacity * row_w;
  for (int64_t c = 0; c < sh.comps; ++c) {
    const int64_t j = sh.comps * g + c;
    const float* ql = q_lat + ((b * sh.tq + t) * sh.heads + j) * sh.r_kv;
    const float* qr = q_rope + ((b * sh.tq + t) * sh.heads + j) * sh.q_rope_width + sh.q_rope_offset;
    for (int64_t i = threadIdx.x; i < row_w; i += blockDim.x)
      q_s[c * row_w + i] = i < sh.r_kv ? ql[i] : qr[i - sh.r_kv];
  }
  __syncthreads();
  // z_{c,s} = scale · (q̃_j·ĉ_s + q^R_j·k^R_s) = scale · [q̃_j ; q^R_j]·row_s
  float m_local[kMaxComps] = {-INFINITY, -INFINITY};
  for (int64_t s = warp; s <= last; s += n_warps) {
    const float* row = cache_b + s * row_w;
#pragma unroll
    for (int c = 0; c < kMaxComps; ++c) {
      if (c >= sh.comps) break;
      float dot = 0.0f;
      for (int64_t i = lane; i < row_w; i += kWarp) dot += q_s[c * row_w + i] * row[i];
      const float zs = scale * warp_sum(dot);
      if (lane == 0) z[c * sh.kv_len + s] = zs;
      m_local[c] = fmaxf(m_local[c], zs);
    }
  }
  float m[kMaxComps] = {0.0f, 0.0f}, inv_l[kMaxComps] = {0.0f, 0.0f};
#pragma unroll
  for (int c = 0; c < kMaxComps; ++c)
    if (c < sh.comps) m[c] = block_max(m_local[c], red);  // barriers publish z (comps is uniform)
#pragma unroll
  for (int c = 0; c < kMaxComps; ++c) {
    if (c >= sh.comps) break;
    float l = 0.0f;
    for (int64_t s = threadIdx.x; s <= last; s += blockDim.x) l += expf(z[c * sh.kv_len + s] - m[c]);
    inv_l[c] = 1.0f / block_sum(l, red);
  }
  // w_s = Σ_c coef_c · exp(z_{c,s} − m_c) / l_c, written over component 0's scores.
  const float coef1 = sh.comps == 2 ? -lambda[0] : 0.0f;
  for (int64_t s = threadIdx.x; s <= last; s += blockDim.x) {
    float w = expf(z[s] - m[0]) * inv_l[0];
    if (sh.comps == 2) w += coef1 * (expf(z[sh.kv_len + s] - m[1]) * inv_l[1]);
    z[s] = w;
  }
  __syncthreads();
  float* o = out + ((b * sh.tq + t) * sh.groups + g) * sh.r_kv;
  for (int64_t i = threadIdx.x; i < sh.r_kv; i += blockDim.x) {
    float acc = 0.0f;
    for (int64_t s = 0; s <= last; ++s) acc += z[s] * cache_b[s * row_w + i];
    o[i] = acc;
  }
}

}  // namespace

void CudaBackend::latent_attention(Context ctx, const LatentAttentionArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "latent_attention");
  constexpr std::string_view kOp = "latent_attention";
  const LatentDims d = validate_latent_attention(a, Device::kCUDA);
  require_f32(a.q_lat, kOp);
  if (d.batch == 0) return;
  const LatentShape sh{.tq = d.tq,
                       .heads = d.heads,
                       .r_kv = d.r_kv,
                       .d_rope = d.d_rope,
                       .q_rope_width = d.q_rope_width,
                       .q_rope_offset = a.q_rope_offset,
                       .capacity = d.capacity,
                       .comps = d.comps,
                       .groups = d.groups,
                       .kv_len = a.kv_len};
  const size_t bytes = static_cast<size_t>(d.comps * (d.row() + a.kv_len)) * sizeof(float);
  DIFFMOE_CHECK(bytes <= max_shared_bytes(),
                "[{}] kv_len = {} needs {} bytes of shared memory per block, the device allows {}", kOp, a.kv_len,
                bytes, max_shared_bytes());
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(latent_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
  DIFFMOE_CHECK(d.groups <= 65535 && d.batch <= 65535, "[{}] grid too large: B = {}, groups = {}", kOp, d.batch,
                d.groups);
  const dim3 grid(static_cast<unsigned>(d.tq), static_cast<unsigned>(d.groups), static_cast<unsigned>(d.batch));
  latent_attention_kernel<<<grid, kLatentThreads, bytes, stream(ctx)>>>(
      f32(a.out), f32(a.q_lat), f32(a.q_rope), f32(a.cache), a.differential ? f32(a.lambda) : nullptr, sh,
      static_cast<float>(a.scale));
  CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace diffmoe
