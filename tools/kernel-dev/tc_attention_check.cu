// Standalone harness for src/backend/cuda/tc_attention.cuh (the sandbox of docs/style.md habit 9): a
// CPU double-precision reference of the forward and backward at small sizes for every covered
// (d_qk, width, differential) and a few T/B edge cases, then timing at the bench shape.
//   nvcc -O3 -std=c++17 -arch=sm_90a -lineinfo -o /tmp/tca tools/kernel-dev/tc_attention_check.cu && /tmp/tca
// Options: --quick (fewer correctness cases), --no-check (timing only), --no-time.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../src/backend/cuda/tc_attention.cuh"

using namespace diffmoe::cuda::tca;

#define CK(call)                                                                                               \
  do {                                                                                                         \
    cudaError_t e_ = (call);                                                                                   \
    if (e_ != cudaSuccess) {                                                                                   \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #call); \
      std::exit(1);                                                                                            \
    }                                                                                                          \
  } while (0)

struct Case {
  int batch, seq, heads, d_qk, d_v, comps;
};

struct Host {
  std::vector<float> q, k, v, dout, lambda;
  std::vector<float> out, o2, lse, dq, dk, dv, dlambda;
};

// ---------------------------------------------------------------- CPU reference (double)
void cpu_reference(const Case& cs, double scale, const Host& in, std::vector<double>* out, std::vector<double>* o2,
                   std::vector<double>* lse, std::vector<double>* dq, std::vector<double>* dk, std::vector<double>* dv,
                   double* dlambda, std::vector<double>* dq_mag, std::vector<double>* dk_mag, double* dlambda_mag) {
  const int B = cs.batch, T = cs.seq, H = cs.heads, Dq = cs.d_qk, Dv = cs.d_v, C = cs.comps, G = H / C, Wd = C * Dv;
  const double lam = C == 2 ? in.lambda[0] : 0.0;
  out->assign(static_cast<size_t>(B) * T * G * Wd, 0.0);
  o2->assign(out->size(), 0.0);
  lse->assign(static_cast<size_t>(B) * H * T, 0.0);
  dq->assign(static_cast<size_t>(B) * T * H * Dq, 0.0);
  dk->assign(dq->size(), 0.0);
  dv->assign(static_cast<size_t>(B) * T * H * Dv, 0.0);
  dq_mag->assign(dq->size(), 0.0);
  dk_mag->assign(dq->size(), 0.0);
  *dlambda = 0.0;
  *dlambda_mag = 0.0;
  auto qa = [&](int b, int t, int h) { return &in.q[((static_cast<size_t>(b) * T + t) * H + h) * Dq]; };
  auto ka = [&](int b, int t, int h) { return &in.k[((static_cast<size_t>(b) * T + t) * H + h) * Dq]; };
  auto vg = [&](int b, int t, int g) { return &in.v[((static_cast<size_t>(b) * T + t) * H + C * g) * Dv]; };
  auto orow = [&](int b, int t, int g) { return ((static_cast<size_t>(b) * T + t) * G + g) * Wd; };
  std::vector<double> P(static_cast<size_t>(C) * T * T), Oc(static_cast<size_t>(C) * T * Wd);
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < G; ++g) {
      std::fill(P.begin(), P.end(), 0.0);
      std::fill(Oc.begin(), Oc.end(), 0.0);
      for (int c = 0; c < C; ++c) {
        const int h = C * g + c;
        for (int t = 0; t < T; ++t) {
          double* p = &P[(static_cast<size_t>(c) * T + t) * T];
          double m = -1e300;
          for (int s = 0; s <= t; ++s) {
            double z = 0.0;
            for (int i = 0; i < Dq; ++i) z += static_cast<double>(qa(b, t, h)[i]) * ka(b, s, h)[i];
            p[s] = scale * z;
            m = std::max(m, p[s]);
          }
          double l = 0.0;
          for (int s = 0; s <= t; ++s) l += (p[s] = std::exp(p[s] - m));
          for (int s = 0; s <= t; ++s) p[s] /= l;
          (*lse)[(static_cast<size_t>(b) * H + h) * T + t] = m + std::log(l);
          double* o = &Oc[(static_cast<size_t>(c) * T + t) * Wd];
          for (int s = 0; s <= t; ++s)
            for (int i = 0; i < Wd; ++i) o[i] += p[s] * vg(b, s, g)[i];
        }
      }
      for (int t = 0; t < T; ++t)
        for (int i = 0; i < Wd; ++i) {
          const double y0 = Oc[static_cast<size_t>(t) * Wd + i];
          const double y1 = C == 2 ? Oc[(static_cast<size_t>(T) + t) * Wd + i] : 0.0;
          (*out)[orow(b, t, g) + i] = y0 - lam * y1;
          if (C == 2) {
            (*o2)[orow(b, t, g) + i] = y1;
            *dlambda -= static_cast<double>(in.dout[orow(b, t, g) + i]) * y1;
            *dlambda_mag += std::fabs(static_cast<double>(in.dout[orow(b, t, g) + i]) * y1);
          }
        }
      // backward: dO_c = coef_c·dout, dP = dO_c·V_gᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP))
      for (int c = 0; c < C; ++c) {
        const int h = C * g + c;
        const double coef = c == 0 ? 1.0 : -lam;
        for (int t = 0; t < T; ++t) {
          const double* p = &P[(static_cast<size_t>(c) * T + t) * T];
          const float* d = &in.dout[orow(b, t, g)];
          std::vector<double> dp(t + 1);
          double D = 0.0;
          for (int s = 0; s <= t; ++s) {
            double x = 0.0;
            for (int i = 0; i < Wd; ++i) x += coef * d[i] * vg(b, s, g)[i];
            dp[s] = x;
            D += p[s] * x;
          }
          for (int s = 0; s <= t; ++s) {
            const double ds = p[s] * (dp[s] - D), ds_mag = p[s] * (std::fabs(dp[s]) + std::fabs(D));
            for (int i = 0; i < Dq; ++i) {
              const size_t iq = ((static_cast<size_t>(b) * T + t) * H + h) * Dq + i;
              const size_t ik = ((static_cast<size_t>(b) * T + s) * H + h) * Dq + i;
              (*dq)[iq] += scale * ds * ka(b, s, h)[i];
              (*dk)[ik] += scale * ds * qa(b, t, h)[i];
              (*dq_mag)[iq] += scale * ds_mag * std::fabs(ka(b, s, h)[i]);
              (*dk_mag)[ik] += scale * ds_mag * std::fabs(qa(b, t, h)[i]);
            }
            for (int i = 0; i < Wd; ++i)
              (*dv)[((static_cast<size_t>(b) * T + s) * H + C * g) * Dv + i] += p[s] * coef * d[i];
          }
        }
      }
    }
}

// ---------------------------------------------------------------- device run (mirrors tc_attention_ops.cu)
struct Dev {
  float *q, *k, *v, *dout, *lambda, *out, *o2, *lse, *dq, *dk, *dv, *dlambda;
  char* scratch;
  TcaScratchLayout layout;
};

template <class T>
T* dalloc(size_t n) {
  T* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return p;
}

void to_bf16(bf16* dst, const float* src, int64_t n, cudaStream_t s) {
  const bool vec4 = reinterpret_cast<uintptr_t>(src) % 16 == 0 && n % 4 == 0;
  const int64_t items = vec4 ? n / 4 : n;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, 1 << 16));
  tca_to_bf16_kernel<<<std::max(blocks, 1u), 256, 0, s>>>(dst, src, n, vec4);
  CK(cudaGetLastError());
}

struct Timing {
  float convert = 0, fwd = 0, prep = 0, dkv = 0, dq = 0, dlambda = 0;
};

TcaShape shape_of(const Case& cs, double scale) {
  return {cs.batch, cs.seq, cs.heads, cs.heads / cs.comps, cs.comps, cs.d_v, static_cast<float>(scale)};
}

void convert_qkv(const Case& cs, const Dev& d, cudaStream_t s) {
  const int64_t rows = static_cast<int64_t>(cs.batch) * cs.seq * cs.heads;
  to_bf16(reinterpret_cast<bf16*>(d.scratch + d.layout.q), d.q, rows * cs.d_qk, s);
  to_bf16(reinterpret_cast<bf16*>(d.scratch + d.layout.k), d.k, rows * cs.d_qk, s);
  to_bf16(reinterpret_cast<bf16*>(d.scratch + d.layout.v), d.v, rows * cs.d_v, s);
}

void run_fwd(const Case& cs, const TcaShape& sh, const Dev& d, const TcaKernels& kern, cudaStream_t s, bool convert) {
  if (convert) convert_qkv(cs, d, s);
  const TcaFwdArgs a{d.out,
                     cs.comps == 2 ? d.o2 : nullptr,
                     d.lse,
                     reinterpret_cast<const bf16*>(d.scratch + d.layout.q),
                     reinterpret_cast<const bf16*>(d.scratch + d.layout.k),
                     reinterpret_cast<const bf16*>(d.scratch + d.layout.v),
                     cs.comps == 2 ? d.lambda : nullptr,
                     sh};
  CK(kern.fwd(a, s));
}

TcaBwdArgs bwd_args(const Case& cs, const TcaShape& sh, const Dev& d) {
  return {d.dq,
          d.dk,
          d.dv,
          reinterpret_cast<const bf16*>(d.scratch + d.layout.q),
          reinterpret_cast<const bf16*>(d.scratch + d.layout.k),
          reinterpret_cast<const bf16*>(d.scratch + d.layout.v),
          reinterpret_cast<const bf16*>(d.scratch + d.layout.dout),
          d.lse,
          reinterpret_cast<const float*>(d.scratch + d.layout.dvec),
          cs.comps == 2 ? d.lambda : nullptr,
          sh};
}

void run_prep(const Case& cs, const TcaShape& sh, const Dev& d, cudaStream_t s) {
  constexpr int kPrepThreads = 256, kRowsPerBlock = kPrepThreads / 32;
  const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(cs.seq) * sh.groups + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(cs.batch));
  tca_bwd_prep_kernel<<<grid, kPrepThreads, 0, s>>>(
      reinterpret_cast<bf16*>(d.scratch + d.layout.dout), reinterpret_cast<float*>(d.scratch + d.layout.dvec),
      reinterpret_cast<double*>(d.scratch + d.layout.dl_part), d.dout, d.out, cs.comps == 2 ? d.o2 : nullptr,
      cs.comps == 2 ? d.lambda : nullptr, sh, cs.comps * cs.d_v);
  CK(cudaGetLastError());
}

void run_dlambda(const Case& cs, const TcaShape& sh, const Dev& d, cudaStream_t s) {
  if (cs.comps != 2) return;
  tca_dlambda_kernel<<<1, kDlambdaThreads, 0, s>>>(d.dlambda,
                                                   reinterpret_cast<const double*>(d.scratch + d.layout.dl_part),
                                                   static_cast<int64_t>(cs.batch) * cs.seq * sh.groups);
  CK(cudaGetLastError());
}

void run_bwd(const Case& cs, const TcaShape& sh, const Dev& d, const TcaKernels& kern, cudaStream_t s) {
  convert_qkv(cs, d, s);
  run_prep(cs, sh, d, s);
  const TcaBwdArgs a = bwd_args(cs, sh, d);
  CK(kern.dkv(a, s));
  CK(kern.dq(a, s));
  run_dlambda(cs, sh, d, s);
}

Dev make_dev(const Case& cs, const Host& h) {
  Dev d{};
  const size_t nq = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_qk;
  const size_t nv = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_v;
  const size_t nl = static_cast<size_t>(cs.batch) * cs.heads * cs.seq;
  d.q = dalloc<float>(nq);
  d.k = dalloc<float>(nq);
  d.v = dalloc<float>(nv);
  d.dout = dalloc<float>(nv);
  d.lambda = dalloc<float>(1);
  d.out = dalloc<float>(nv);
  d.o2 = dalloc<float>(nv);
  d.lse = dalloc<float>(nl);
  d.dq = dalloc<float>(nq);
  d.dk = dalloc<float>(nq);
  d.dv = dalloc<float>(nv);
  d.dlambda = dalloc<float>(1);
  CK(cudaMemcpy(d.q, h.q.data(), nq * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.k, h.k.data(), nq * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.v, h.v.data(), nv * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.dout, h.dout.data(), nv * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.lambda, h.lambda.data(), 4, cudaMemcpyHostToDevice));
  d.layout = tca_scratch_layout(shape_of(cs, 1.0), cs.d_qk, true);
  d.scratch = dalloc<char>(d.layout.bytes);
  return d;
}
void free_dev(Dev& d) {
  for (float* p : {d.q, d.k, d.v, d.dout, d.lambda, d.out, d.o2, d.lse, d.dq, d.dk, d.dv, d.dlambda}) CK(cudaFree(p));
  CK(cudaFree(d.scratch));
}
// NaN bytes into every output (a kernel that skips an element fails the check).
void poison(const Case& cs, const Dev& d) {
  const size_t nq = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_qk;
  const size_t nv = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_v;
  const size_t nl = static_cast<size_t>(cs.batch) * cs.heads * cs.seq;
  CK(cudaMemset(d.out, 0xff, nv * 4));
  CK(cudaMemset(d.o2, 0xff, nv * 4));
  CK(cudaMemset(d.lse, 0xff, nl * 4));
  CK(cudaMemset(d.dq, 0xff, nq * 4));
  CK(cudaMemset(d.dk, 0xff, nq * 4));
  CK(cudaMemset(d.dv, 0xff, nv * 4));
  CK(cudaMemset(d.dlambda, 0xff, 4));
}

std::vector<float> fetch(const float* p, size_t n) {
  std::vector<float> h(n);
  CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
  return h;
}
// ‖a − ref‖ / ‖ref‖. Where the exact result cancels to nothing, ‖ref‖ is no scale for rounding
// errors: dq and dk vanish identically at T = 1 (dS = P·(dP − D) with one key), so there (mag
// given) the denominator is ‖mag‖, mag = the same sums over the absolute terms
// (scale·P·(|dP| + |D|)·|k|): the error relative to the terms that cancel.
double rel_err(const std::vector<float>& a, const std::vector<double>& ref, const std::vector<double>* mag = nullptr) {
  double num = 0.0, den = 0.0, den_mag = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = a[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
    if (mag) den_mag += (*mag)[i] * (*mag)[i];
  }
  den = std::max(den, den_mag);
  if (!(num == num)) return INFINITY;  // NaN never passes
  return std::sqrt(num / std::max(den, 1e-300));
}

Host make_host(const Case& cs, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Host h;
  const size_t nq = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_qk;
  const size_t nv = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_v;
  for (auto* vec : {&h.q, &h.k}) {
    vec->resize(nq);
    for (float& x : *vec) x = n01(rng);
  }
  for (auto* vec : {&h.v, &h.dout}) {
    vec->resize(nv);
    for (float& x : *vec) x = n01(rng);
  }
  h.lambda = {0.3f};
  return h;
}

// One correctness case; returns the worst relative error (and prints a row).
double check_case(const Case& cs, uint32_t seed) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(cs.d_qk));
  TcaKernels kern{};
  if (!tca_pick(cs.d_qk, cs.comps * cs.d_v, cs.comps, &kern)) {
    std::printf("not covered\n");
    return INFINITY;
  }
  const Host h = make_host(cs, seed);
  std::vector<double> out, o2, lse, dq, dk, dv, dq_mag, dk_mag;
  double dlam = 0.0, dlam_mag = 0.0;
  cpu_reference(cs, scale, h, &out, &o2, &lse, &dq, &dk, &dv, &dlam, &dq_mag, &dk_mag, &dlam_mag);
  Dev d = make_dev(cs, h);
  const TcaShape sh = shape_of(cs, scale);
  poison(cs, d);
  run_fwd(cs, sh, d, kern, nullptr, true);
  run_bwd(cs, sh, d, kern, nullptr);
  CK(cudaDeviceSynchronize());
  const double e_out = rel_err(fetch(d.out, out.size()), out);
  const double e_o2 = cs.comps == 2 ? rel_err(fetch(d.o2, o2.size()), o2) : 0.0;
  const double e_lse = rel_err(fetch(d.lse, lse.size()), lse);
  const double e_dq = rel_err(fetch(d.dq, dq.size()), dq, cs.seq == 1 ? &dq_mag : nullptr);
  const double e_dk = rel_err(fetch(d.dk, dk.size()), dk, cs.seq == 1 ? &dk_mag : nullptr);
  const double e_dv = rel_err(fetch(d.dv, dv.size()), dv);
  // dλ = −Σ dout ⊙ o2 over random-sign terms: its error is relative to Σ|dout ⊙ o2| (the sum's
  // condition), not to the sum itself, which random data can make arbitrarily small.
  double e_dl = cs.comps == 2 ? std::fabs(fetch(d.dlambda, 1)[0] - dlam) / dlam_mag : 0.0;
  if (!(e_dl == e_dl)) e_dl = INFINITY;  // NaN never passes
  free_dev(d);
  const double worst = std::max({e_out, e_o2, e_lse, e_dq, e_dk, e_dv, e_dl});
  std::printf("%-5s B%d T%-4d H%-2d dqk %-3d W %-3d | out %.1e o2 %.1e lse %.1e dq %.1e dk %.1e dv %.1e dl %.1e %s\n",
              cs.comps == 2 ? "diff" : "plain", cs.batch, cs.seq, cs.heads, cs.d_qk, cs.comps * cs.d_v, e_out, e_o2,
              e_lse, e_dq, e_dk, e_dv, e_dl, worst <= 1e-2 ? "ok" : "FAIL");
  return worst;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class Fn>
float time_ms(int reps, Fn&& fn) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  fn();
  fn();
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a));
    fn();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return median(ms);
}

int main(int argc, char** argv) {
  bool quick = false, check = true, timing = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--no-check")) check = false;
    if (!std::strcmp(argv[i], "--no-time")) timing = false;
  }
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  double worst = 0.0;
  int failures = 0;
  if (check) {
    std::vector<Case> cases;
    for (int comps : {2, 1})
      for (int dqk : {32, 48, 64, 96, 128})
        for (int w : {32, 64, 128}) {
          if (quick && !(dqk == 96 || w == 128)) continue;
          cases.push_back({2, 131, 4, dqk, w / comps, comps});
        }
    // edge cases on the bench head shape: T = 1, T < tile, T = tile, odd T over several tiles, B > 1
    for (int comps : {2, 1})
      for (int t : {1, 17, 64, 200}) cases.push_back({3, t, 4, 96, 128 / comps, comps});
    for (const Case& cs : cases) {
      const double e = check_case(cs, 1234u + static_cast<uint32_t>(cases.size()));
      worst = std::max(worst, e);
      failures += !(e <= 1e-2);
    }
    std::printf("correctness: %zu cases, worst rel. error %.2e, %d failures\n", cases.size(), worst, failures);
  }
  if (timing) {
    const Case cs{8, 2048, 16, 96, 64, 2};
    const double scale = 1.0 / std::sqrt(96.0);
    TcaKernels kern{};
    tca_pick(cs.d_qk, cs.comps * cs.d_v, cs.comps, &kern);
    const Host h = make_host(cs, 7);
    Dev d = make_dev(cs, h);
    const TcaShape sh = shape_of(cs, scale);
    constexpr int kReps = 15;
    const float fwd_total = time_ms(kReps, [&] { run_fwd(cs, sh, d, kern, nullptr, true); });
    const float fwd_kernel = time_ms(kReps, [&] { run_fwd(cs, sh, d, kern, nullptr, false); });
    const float convert = time_ms(kReps, [&] { convert_qkv(cs, d, nullptr); });
    const float bwd_total = time_ms(kReps, [&] { run_bwd(cs, sh, d, kern, nullptr); });
    const TcaBwdArgs a = bwd_args(cs, sh, d);
    const float prep = time_ms(kReps, [&] { run_prep(cs, sh, d, nullptr); });
    const float dkv = time_ms(kReps, [&] { CK(kern.dkv(a, nullptr)); });
    const float dq = time_ms(kReps, [&] { CK(kern.dq(a, nullptr)); });
    // determinism: two backward runs, bitwise
    run_bwd(cs, sh, d, kern, nullptr);
    const size_t nq = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_qk;
    const size_t nv = static_cast<size_t>(cs.batch) * cs.seq * cs.heads * cs.d_v;
    const auto dq1 = fetch(d.dq, nq), dk1 = fetch(d.dk, nq), dv1 = fetch(d.dv, nv);
    poison(cs, d);
    run_fwd(cs, sh, d, kern, nullptr, true);
    run_bwd(cs, sh, d, kern, nullptr);
    const bool same = dq1 == fetch(d.dq, nq) && dk1 == fetch(d.dk, nq) && dv1 == fetch(d.dv, nv);
    CK(cudaDeviceSynchronize());
    free_dev(d);
    const double flops =
        4.0 * cs.batch * cs.heads * (static_cast<double>(cs.seq) * cs.seq / 2) * (cs.d_qk + cs.comps * cs.d_v);
    std::printf("\nbench shape B 8 T 2048 H 16 (8 differential groups) d_qk 96 W 128, median of %d (ms):\n", kReps);
    std::printf("  %-34s %8s %10s\n", "part", "ms", "TFLOP/s");
    std::printf("  %-34s %8.3f %10.1f\n", "forward total (convert + kernel)", fwd_total, flops / fwd_total / 1e9);
    std::printf("  %-34s %8.3f %10.1f\n", "  forward kernel", fwd_kernel, flops / fwd_kernel / 1e9);
    std::printf("  %-34s %8.3f\n", "  q/k/v f32->bf16", convert);
    std::printf("  %-34s %8.3f %10.1f\n", "backward total", bwd_total, 2.5 * flops / bwd_total / 1e9);
    std::printf("  %-34s %8.3f\n", "  prep (dout->bf16, D, dl)", prep);
    std::printf("  %-34s %8.3f\n", "  dK/dV kernel", dkv);
    std::printf("  %-34s %8.3f\n", "  dQ kernel", dq);
    std::printf("  backward bitwise deterministic: %s\n", same ? "yes" : "NO");
  }
  return failures == 0 ? 0 : 1;
}
