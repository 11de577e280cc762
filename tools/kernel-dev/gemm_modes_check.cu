// Which cuBLAS mode should the dense GEMMs of bf16_gemm use? Our tensors are f32; today each call
// rounds A and B to bf16 in a separate pass and calls cublasGemmEx(bf16, bf16 -> f32). cuBLAS can
// instead take the f32 operands itself and use the tensor cores (CUBLAS_COMPUTE_32F_FAST_16BF /
// _FAST_TF32). This times the three, plus plain SGEMM, at the bench preset's dense GEMM shapes
// (16,384 tokens), and prints each mode's relative error against SGEMM.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/gm tools/kernel-dev/gemm_modes_check.cu -lcublas && /tmp/gm
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(call)                                                                                       \
  do {                                                                                                 \
    cudaError_t e_ = (call);                                                                           \
    if (e_ != cudaSuccess) {                                                                           \
      std::fprintf(stderr, "CUDA error %s at line %d: %s\n", cudaGetErrorString(e_), __LINE__, #call); \
      std::exit(1);                                                                                    \
    }                                                                                                  \
  } while (0)
#define CKB(call)                                                                         \
  do {                                                                                    \
    cublasStatus_t s_ = (call);                                                           \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                    \
      std::fprintf(stderr, "cuBLAS error %d at line %d: %s\n", (int)s_, __LINE__, #call); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

__global__ void to_bf16(__nv_bfloat16* d, const float* s, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x)
    d[i] = __float2bfloat16_rn(s[i]);
}
__global__ void fill_random(float* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    unsigned x = static_cast<unsigned>(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = (x & 0xffffff) / 16777216.0f - 0.5f;
  }
}

struct Shape {
  const char* name;
  int m, n, k;
  bool ta, tb;  // row-major C[m,n] = op(A)·op(B)
};

int main() {
  cublasHandle_t h;
  CKB(cublasCreate(&h));
  size_t ws_bytes = size_t{64} << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  CKB(cublasSetWorkspace(h, ws, ws_bytes));
  const Shape shapes[] = {
      {"x.Wq_a^T   16384x768x1536", 16384, 768, 1536, false, true},
      {"cq.Wq_b^T  16384x1536x768", 16384, 1536, 768, false, true},
      {"x.Wkv_a^T  16384x288x1536", 16384, 288, 1536, false, true},
      {"c.Wkv_b^T  16384x2048x256", 16384, 2048, 256, false, true},
      {"o.Wo^T     16384x1536x1024", 16384, 1536, 1024, false, true},
      {"x.Wsh^T    16384x1024x1536", 16384, 1024, 1536, false, true},
      {"dY.Wo      16384x1024x1536", 16384, 1024, 1536, false, false},
      {"wgrad dY^T.X 1536x1024x16384", 1536, 1024, 16384, true, false},
      {"head x.E^T 16384x32768x1536", 16384, 32768, 1536, false, true},
      {"head wgrad 32768x1536x16384", 32768, 1536, 16384, true, false},
  };
  std::printf("%-32s %10s %10s %10s %10s %10s | %9s %9s\n", "shape", "sgemm", "cvt+bf16", "(gemm)", "fast16bf",
              "fast_tf32", "err16bf", "errcvt");
  for (const Shape& s : shapes) {
    const size_t na = size_t(s.m) * s.k, nb = size_t(s.k) * s.n, nc = size_t(s.m) * s.n;
    float *a, *b, *c0, *c1, *c2;
    __nv_bfloat16 *a16, *b16;
    CK(cudaMalloc(&a, na * 4));
    CK(cudaMalloc(&b, nb * 4));
    CK(cudaMalloc(&c0, nc * 4));
    CK(cudaMalloc(&c1, nc * 4));
    CK(cudaMalloc(&c2, nc * 4));
    CK(cudaMalloc(&a16, na * 2));
    CK(cudaMalloc(&b16, nb * 2));
    fill_random<<<1024, 256>>>(a, na, 1);
    fill_random<<<1024, 256>>>(b, nb, 2);
    CK(cudaGetLastError());
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const cublasOperation_t opb = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opa = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
    const float one = 1.0f, zero = 0.0f;
    auto sgemm = [&](float* c) { CKB(cublasSgemm(h, opb, opa, s.n, s.m, s.k, &one, b, ldb, a, lda, &zero, c, s.n)); };
    auto gemm_ex = [&](float* c, cublasComputeType_t ct) {
      CKB(cublasGemmEx(h, opb, opa, s.n, s.m, s.k, &one, b, CUDA_R_32F, ldb, a, CUDA_R_32F, lda, &zero, c, CUDA_R_32F,
                       s.n, ct, CUBLAS_GEMM_DEFAULT));
    };
    auto bf16_only = [&](float* c) {
      CKB(cublasGemmEx(h, opb, opa, s.n, s.m, s.k, &one, b16, CUDA_R_16BF, ldb, a16, CUDA_R_16BF, lda, &zero, c,
                       CUDA_R_32F, s.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    auto cvt_bf16 = [&](float* c) {
      to_bf16<<<2048, 256>>>(a16, a, na);
      to_bf16<<<2048, 256>>>(b16, b, nb);
      bf16_only(c);
    };
    auto time = [&](auto&& fn) {
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0));
      CK(cudaEventCreate(&e1));
      for (int i = 0; i < 3; ++i) fn();
      std::vector<float> ms;
      for (int i = 0; i < 15; ++i) {
        CK(cudaEventRecord(e0));
        fn();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      return ms[ms.size() / 2];
    };
    const float t_s = time([&] { sgemm(c0); });
    const float t_c = time([&] { cvt_bf16(c2); });
    const float t_g = time([&] { bf16_only(c2); });
    const float t_f = time([&] { gemm_ex(c1, CUBLAS_COMPUTE_32F_FAST_16BF); });
    const float t_t = time([&] { gemm_ex(c1, CUBLAS_COMPUTE_32F_FAST_TF32); });
    gemm_ex(c1, CUBLAS_COMPUTE_32F_FAST_16BF);
    CK(cudaDeviceSynchronize());
    std::vector<float> h0(nc), h1(nc), h2(nc);
    CK(cudaMemcpy(h0.data(), c0, nc * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h1.data(), c1, nc * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h2.data(), c2, nc * 4, cudaMemcpyDeviceToHost));
    double num1 = 0, num2 = 0, den = 0;
    for (size_t i = 0; i < nc; ++i) {
      num1 += double(h1[i] - h0[i]) * (h1[i] - h0[i]);
      num2 += double(h2[i] - h0[i]) * (h2[i] - h0[i]);
      den += double(h0[i]) * h0[i];
    }
    std::printf("%-32s %9.3fms %9.3fms %9.3fms %9.3fms %9.3fms | %9.2e %9.2e\n", s.name, t_s, t_c, t_g, t_f, t_t,
                std::sqrt(num1 / den), std::sqrt(num2 / den));
    for (void* p : {(void*)a, (void*)b, (void*)c0, (void*)c1, (void*)c2, (void*)a16, (void*)b16}) CK(cudaFree(p));
  }
  return 0;
}
