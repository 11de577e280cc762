// Standalone check and timing of the grouped GEMM kernels, src/backend/cuda/grouped_gemm.cuh (mma.sync)
// and grouped_gemm_tma.cuh (TMA + wgmma, Hopper) (no project dependencies, so it
// builds on the lent GPU machines):
//   nvcc -O3 -std=c++17 -arch=sm_90a -lineinfo -o /tmp/gg tools/kernel-dev/grouped_gemm_check.cu -lcublas
//   /tmp/gg           small checks vs a CPU reference, bench-shape checks vs cuBLAS, timings, table
//   /tmp/gg --small   small checks only (for compute-sanitizer)
// Small checks: every layout at odd sizes (k = 40, n = 24, and sizes spanning several tiles), uneven
// groups with empty and 1-row groups, offsets[G] < R (tail rows compared bitwise), alpha ≠ 1,
// beta = 0 on NaN-poisoned C and beta = 1, the f32 → bf16 padded copy bitwise, bad offsets recorded.
// The TMA kernel runs the same small checks plus tiles that wrap its 4-stage ring, several tiles
// per CTA and groups spanning many wgrad k-tiles. Two-term calls (fwd/dgrad, C = alpha·(A·op(B) +
// A2·op(B2)) + beta·C) on both kernels (mma.sync: two launches; TMA: one, both terms' k-tiles in one
// ring), k2 ≠ k, odd sizes, partial last k-tiles of either term, empty groups, beta 0 and 1.
// bf16 output (params c16, fwd/dgrad, beta 0) on both kernels: n where the TMA kernel's staged
// epilogue stores 16-byte vectors (n % 8 = 0, full and partial n-tiles) and where it falls back to
// pairs or scalars (n % 8 ≠ 0, odd n, C not 16-byte aligned), each value within one bf16 ulp of the
// double reference, rows past offsets[G] bitwise unchanged. f32 C not 16-byte aligned or n % 4 ≠ 0
// (the fallback's float2 and scalar stores).
// Bench shapes: both kernels are compared with the cuBLAS per-group loop (NaN-poisoned outputs),
// then timed, the TMA kernel also with its direct (fallback) epilogue forced, for an A/B of the
// staged one; fwd/dgrad also with bf16 output (bitwise = the TMA f32 result rounded, within one
// bf16 ulp of the mma.sync f32 result); then the MoE dgrad dx_perm = da·W1 + db·W3 as two launches
// and as one two-term launch.
// Reference: double sums of the bf16-rounded inputs; the kernel sums in f32, so ‖err‖/‖ref‖ ~1e-7
// (bound 1e-5: f32 sums of up to 1,000 products, far below the 1e-3 of one bf16 rounding).
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../src/backend/cuda/grouped_gemm_tma.cuh"

using namespace diffmoe::cuda::gg;

#define CK(call)                                                                                               \
  do {                                                                                                         \
    cudaError_t e_ = (call);                                                                                   \
    if (e_ != cudaSuccess) {                                                                                   \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #call); \
      std::exit(1);                                                                                            \
    }                                                                                                          \
  } while (0)
#define CKB(call)                                                                                 \
  do {                                                                                            \
    cublasStatus_t s_ = (call);                                                                   \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                            \
      std::fprintf(stderr, "cuBLAS error %d at %s:%d: %s\n", (int)s_, __FILE__, __LINE__, #call); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

static int g_failures = 0;
static void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// ---------------------------------------------------------------- host helpers

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return s;
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  double normal() { return std::sqrt(-2.0 * std::log(uniform() + 1e-300)) * std::cos(6.283185307179586 * uniform()); }
};

static float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { CK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  void upload(const std::vector<T>& v) { CK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> download() const {
    std::vector<T> v(n);
    CK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

// Which kernel a check runs: mma.sync (grouped_gemm.cuh) or TMA + wgmma (grouped_gemm_tma.cuh).
enum class Kernel { kMma, kTma };
static const char* kernel_name(Kernel k) { return k == Kernel::kMma ? "" : "tma "; }

static const char* layout_name(GroupedLayout l) {
  return l == GroupedLayout::kFwd ? "fwd" : l == GroupedLayout::kDgrad ? "dgrad" : "wgrad";
}

// ---------------------------------------------------------------- small checks vs the CPU

struct SmallResult {
  double rel = 0, max_abs = 0;
};
static double g_max_rel[2][3] = {};  // [kernel][layout]

// Converts f32 [rows, cols] on the device to the padded bf16 copy and checks it bitwise.
static void to_bf16_checked(Dev<bf16>& dst, const std::vector<float>& src, int64_t rows, int64_t cols) {
  Dev<float> d(src.size());
  d.upload(src);
  CK(launch_to_bf16_padded(dst.p, d.p, rows, cols, nullptr));
  CK(cudaDeviceSynchronize());
  const std::vector<bf16> got = dst.download();
  const int64_t ld = pad8(cols);
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      const float want = c < cols ? bf16_round(src[r * cols + c]) : 0.0f;
      const float g = __bfloat162float(got[r * ld + c]);
      if (std::memcmp(&want, &g, 4) != 0) ++bad;
    }
  expect(bad == 0, "f32 -> bf16 padded copy: " + std::to_string(bad) + " elements differ");
}

static bool g_tma = false;  // the TMA kernel can run here (sm_90a code on a 9.x device, a tensor-map encoder)

// direct_epilogue: the TMA kernel stores C straight from its accumulators (its fallback path,
// forced) instead of through shared memory: the A/B timing of the staged epilogue.
static void launch(Kernel kern, const GroupedGemmParams& p, GroupedLayout L, bool direct_epilogue = false) {
  if (kern == Kernel::kTma) {
    if (!grouped_gemm_tma_usable(p, L)) {
      expect(false, std::string("TMA kernel not usable for ") + layout_name(L));
      return;
    }
    if (direct_epilogue) {
      if (L == GroupedLayout::kFwd) CK((launch_grouped_gemm_tma<GroupedLayout::kFwd, true>(p, nullptr)));
      if (L == GroupedLayout::kDgrad) CK((launch_grouped_gemm_tma<GroupedLayout::kDgrad, true>(p, nullptr)));
      if (L == GroupedLayout::kWgrad) CK((launch_grouped_gemm_tma<GroupedLayout::kWgrad, true>(p, nullptr)));
      return;
    }
    if (L == GroupedLayout::kFwd) CK(launch_grouped_gemm_tma<GroupedLayout::kFwd>(p, nullptr));
    if (L == GroupedLayout::kDgrad) CK(launch_grouped_gemm_tma<GroupedLayout::kDgrad>(p, nullptr));
    if (L == GroupedLayout::kWgrad) CK(launch_grouped_gemm_tma<GroupedLayout::kWgrad>(p, nullptr));
  } else {
    CK(launch_grouped_gemm(p, L, nullptr));
  }
}

// Where a small check's kernel writes C: bf16 (params c16; fwd/dgrad, beta 0) instead of f32, and
// `shift` elements past a 256-byte aligned allocation (1: 4-byte (f32) or 2-byte (bf16) aligned,
// 2: 8 or 4 bytes, …), to reach the epilogue's fallbacks for C not 16-byte aligned.
struct SmallOut {
  bool bf16 = false;
  int shift = 0;
};

// One bf16 ulp at |x|: 2^(e − 8) for |x| = f·2^e, f in [0.5, 1) (8 significant bits); the smallest
// subnormal step at 0.
static double bf16_ulp(double x) {
  if (x == 0.0) return std::ldexp(1.0, -133);
  int e;
  std::frexp(std::fabs(x), &e);
  return std::ldexp(1.0, std::max(e - 8, -133));
}

// One small grouped GEMM of layout L on random inputs vs a double reference; k2 > 0 (fwd/dgrad):
// with a second term A2 [R,k2], B2 [G,n,k2] (fwd) or [G,k2,n] (dgrad). out: see SmallOut; a bf16
// C must be within one bf16 ulp of the reference (f32 C: ‖err‖/‖ref‖ < 1e-5).
static SmallResult run_small(GroupedLayout L, int R, const std::vector<int>& off, int m, int n, int k, float alpha,
                             float beta, uint64_t seed, Kernel kern = Kernel::kMma, int k2 = 0, SmallOut out = {}) {
  const int G = static_cast<int>(off.size()) - 1;
  const bool wgrad = L == GroupedLayout::kWgrad;
  if (out.bf16 && (wgrad || beta != 0.0f)) {
    expect(false, "run_small: bf16 C only in fwd/dgrad with beta 0");
    return {};
  }
  // Logical shapes: fwd/dgrad A [R,k]; fwd B [G,n,k], dgrad B [G,k,n]; wgrad A [R,m], B [R,n].
  const int64_t a_cols = wgrad ? m : k, b_rows = wgrad ? R : int64_t{G} * (L == GroupedLayout::kFwd ? n : k);
  const int64_t b_cols = wgrad ? n : (L == GroupedLayout::kFwd ? k : n);
  const int64_t c_elems = wgrad ? int64_t{G} * m * n : int64_t{R} * n;
  Rng rng(seed);
  std::vector<float> a(R * a_cols), b(b_rows * b_cols), c0(c_elems);
  for (auto& x : a) x = static_cast<float>(rng.normal());
  for (auto& x : b) x = static_cast<float>(rng.normal());
  // The second term, laid out as the first with k2 (empty without one).
  const bool fwd = L == GroupedLayout::kFwd;
  const int64_t b2_rows = k2 == 0 ? 0 : int64_t{G} * (fwd ? n : k2), b2_cols = fwd ? k2 : n;
  std::vector<float> a2(int64_t{R} * k2), b2(b2_rows * b2_cols);
  for (auto& x : a2) x = static_cast<float>(rng.normal());
  for (auto& x : b2) x = static_cast<float>(rng.normal());
  const int used = off[G];
  for (int64_t i = 0; i < c_elems; ++i) {
    const bool in_use = wgrad || i < int64_t{used} * n;
    c0[i] = (beta == 0.0f && in_use) ? NAN : static_cast<float>(rng.normal());
    if (out.bf16) c0[i] = bf16_round(c0[i]);  // the tail as stored: compared bitwise below
  }
  Dev<bf16> da(R * pad8(a_cols)), db(b_rows * pad8(b_cols));
  to_bf16_checked(da, a, R, a_cols);
  to_bf16_checked(db, b, b_rows, b_cols);
  Dev<bf16> da2(int64_t{R} * pad8(k2)), db2(b2_rows * pad8(b2_cols));
  if (k2 > 0) {
    to_bf16_checked(da2, a2, R, k2);
    to_bf16_checked(db2, b2, b2_rows, b2_cols);
  }
  // C (f32 or bf16) at element `shift` of its allocation; the other kind stays null.
  Dev<float> dc(out.bf16 ? 0 : c_elems + out.shift);
  Dev<bf16> dc16(out.bf16 ? c_elems + out.shift : 0);
  std::vector<bf16> c0_16(out.bf16 ? c_elems : 0);
  if (out.bf16) {
    for (int64_t i = 0; i < c_elems; ++i) c0_16[i] = __float2bfloat16_rn(c0[i]);
    CK(cudaMemcpy(dc16.p + out.shift, c0_16.data(), c_elems * sizeof(bf16), cudaMemcpyHostToDevice));
  } else {
    CK(cudaMemcpy(dc.p + out.shift, c0.data(), c_elems * sizeof(float), cudaMemcpyHostToDevice));
  }
  Dev<int32_t> doff(off.size());
  doff.upload(std::vector<int32_t>(off.begin(), off.end()));
  Dev<GroupedGemmIssue> issue(1);
  CK(cudaMemset(issue.p, 0, sizeof(GroupedGemmIssue)));
  GroupedGemmParams p{.a = da.p,
                      .b = db.p,
                      .c = out.bf16 ? nullptr : dc.p + out.shift,
                      .offsets = doff.p,
                      .rows = R,
                      .groups = G,
                      .m = m,
                      .n = n,
                      .k = k,
                      .lda = static_cast<int>(pad8(a_cols)),
                      .ldb = static_cast<int>(pad8(b_cols)),
                      .alpha = alpha,
                      .beta = beta,
                      .issue = issue.p,
                      .issue_site = 7};
  if (out.bf16) p.c16 = dc16.p + out.shift;
  if (k2 > 0) {
    p.a2 = da2.p, p.b2 = db2.p, p.k2 = k2;
    p.lda2 = static_cast<int>(pad8(k2)), p.ldb2 = static_cast<int>(pad8(b2_cols));
  }
  launch(kern, p, L);
  CK(cudaDeviceSynchronize());
  std::vector<float> c(c_elems);
  std::vector<bf16> c16(out.bf16 ? c_elems : 0);
  if (out.bf16) {
    CK(cudaMemcpy(c16.data(), dc16.p + out.shift, c_elems * sizeof(bf16), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < c_elems; ++i) c[i] = __bfloat162float(c16[i]);
  } else {
    CK(cudaMemcpy(c.data(), dc.p + out.shift, c_elems * sizeof(float), cudaMemcpyDeviceToHost));
  }
  expect(issue.download()[0].flag == 0, "good offsets recorded an issue");

  std::vector<double> ref(c_elems), mag(c_elems, 0.0);  // mag: |alpha|·Σ|products| + |beta·C|
  for (int64_t i = 0; i < c_elems; ++i) ref[i] = c0[i];
  for (auto* v : {&a, &b, &a2, &b2})
    for (auto& x : *v) x = bf16_round(x);
  for (int g = 0; g < G; ++g) {
    if (!wgrad) {
      for (int r = off[g]; r < off[g + 1]; ++r)
        for (int j = 0; j < n; ++j) {
          double s = 0, sa = 0;
          for (int q = 0; q < k; ++q) {
            const double bv = fwd ? b[(int64_t{g} * n + j) * k + q] : b[(int64_t{g} * k + q) * n + j];
            s += double(a[int64_t{r} * k + q]) * bv;
            sa += std::fabs(double(a[int64_t{r} * k + q]) * bv);
          }
          for (int q = 0; q < k2; ++q) {
            const double bv = fwd ? b2[(int64_t{g} * n + j) * k2 + q] : b2[(int64_t{g} * k2 + q) * n + j];
            s += double(a2[int64_t{r} * k2 + q]) * bv;
            sa += std::fabs(double(a2[int64_t{r} * k2 + q]) * bv);
          }
          const double old = beta == 0.0f ? 0.0 : double(beta) * c0[int64_t{r} * n + j];
          ref[int64_t{r} * n + j] = double(alpha) * s + old;
          mag[int64_t{r} * n + j] = std::fabs(double(alpha)) * sa + std::fabs(old);
        }
    } else {
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double s = 0, sa = 0;
          for (int r = off[g]; r < off[g + 1]; ++r) {
            s += double(a[int64_t{r} * m + i]) * b[int64_t{r} * n + j];
            sa += std::fabs(double(a[int64_t{r} * m + i]) * b[int64_t{r} * n + j]);
          }
          const int64_t e = (int64_t{g} * m + i) * n + j;
          const double old = beta == 0.0f ? 0.0 : double(beta) * c0[e];
          ref[e] = double(alpha) * s + old;
          mag[e] = std::fabs(double(alpha)) * sa + std::fabs(old);
        }
    }
  }
  const int64_t checked = wgrad ? c_elems : int64_t{used} * n;
  const double f32_sum_bound = double(wgrad ? R : k + k2) * 0x1p-24;
  double err2 = 0, ref2 = 0, max_abs = 0, max_ulps = 0;
  int64_t nonfinite = 0, tail_changed = 0;
  for (int64_t i = 0; i < checked; ++i) {
    if (!std::isfinite(c[i])) ++nonfinite;
    const double d = c[i] - ref[i];
    err2 += d * d, ref2 += ref[i] * ref[i], max_abs = std::max(max_abs, std::fabs(d));
    // One bf16 ulp of the result plus the f32 accumulation's own bound, γ·Σ|terms| with γ = K·2^-24
    // for K summed terms (a result near 0 from large terms may round to a neighbouring bf16 value).
    if (out.bf16) max_ulps = std::max(max_ulps, std::fabs(d) / (bf16_ulp(ref[i]) + f32_sum_bound * mag[i]));
  }
  for (int64_t i = checked; i < c_elems; ++i)
    tail_changed += out.bf16 ? std::memcmp(&c16[i], &c0_16[i], sizeof(bf16)) != 0 : std::memcmp(&c[i], &c0[i], 4) != 0;
  SmallResult res{std::sqrt(err2 / std::max(ref2, 1e-300)), max_abs};
  char what[200];
  std::snprintf(what, sizeof what, "%s%s R=%d G=%d m=%d n=%d k=%d%s alpha=%g beta=%g%s%s", kernel_name(kern),
                layout_name(L), R, G, m, n, k, k2 > 0 ? ("+" + std::to_string(k2)).c_str() : "", alpha, beta,
                out.bf16 ? " ->bf16" : "", out.shift != 0 ? (" C+" + std::to_string(out.shift)).c_str() : "");
  if (out.bf16)
    std::printf("  small %-48s rel %.2e  max|diff| %.2e = %.2f bf16 ulp\n", what, res.rel, res.max_abs, max_ulps);
  else std::printf("  small %-48s rel %.2e  max|diff| %.2e\n", what, res.rel, res.max_abs);
  expect(nonfinite == 0, std::string(what) + ": non-finite outputs");
  expect(tail_changed == 0, std::string(what) + ": rows past offsets[G] changed");
  if (out.bf16) {
    expect(max_ulps <= 1.0,
           std::string(what) + ": a bf16 value more than one ulp (+ the f32 sum bound) from the reference");
    return res;  // (the f32 worst-case table below keeps f32 results only)
  }
  expect(res.rel < 1e-5, std::string(what) + ": relative error too large");
  // Empty groups of the weight gradient: exactly beta·C (alpha·0 + C for beta 1, 0 for beta 0).
  if (wgrad)
    for (int g = 0; g < G; ++g)
      if (off[g] == off[g + 1])
        for (int64_t e = int64_t{g} * m * n; e < int64_t{g + 1} * m * n; ++e)
          if (c[e] != static_cast<float>(ref[e])) {
            expect(false, std::string(what) + ": empty group not beta*C");
            break;
          }
  double& worst = g_max_rel[static_cast<int>(kern)][static_cast<int>(L)];
  worst = std::max(worst, res.rel);
  return res;
}

// Bad offsets: the first bad index is recorded and the kernel finishes without a fault.
static void run_bad_offsets(GroupedLayout L, const std::vector<int>& off, int want_index, int want_value,
                            Kernel kern = Kernel::kMma) {
  const int R = 64, G = static_cast<int>(off.size()) - 1, m = 24, n = 24, k = 40;
  const bool wgrad = L == GroupedLayout::kWgrad;
  Dev<bf16> da(int64_t{R} * 64), db(int64_t{G} * 64 * 64);
  CK(cudaMemset(da.p, 0, da.n * sizeof(bf16)));
  CK(cudaMemset(db.p, 0, db.n * sizeof(bf16)));
  Dev<float> dc(wgrad ? int64_t{G} * m * n : int64_t{R} * n);
  CK(cudaMemset(dc.p, 0, dc.n * sizeof(float)));
  Dev<int32_t> doff(off.size());
  doff.upload(std::vector<int32_t>(off.begin(), off.end()));
  Dev<GroupedGemmIssue> issue(1);
  CK(cudaMemset(issue.p, 0, sizeof(GroupedGemmIssue)));
  GroupedGemmParams p{.a = da.p,
                      .b = db.p,
                      .c = dc.p,
                      .offsets = doff.p,
                      .rows = R,
                      .groups = G,
                      .m = m,
                      .n = n,
                      .k = k,
                      .lda = static_cast<int>(pad8(wgrad ? m : k)),
                      .ldb = static_cast<int>(pad8(wgrad ? n : k)),
                      .alpha = 1.0f,
                      .beta = 0.0f,
                      .issue = issue.p,
                      .issue_site = 9};
  launch(kern, p, L);
  CK(cudaDeviceSynchronize());
  const GroupedGemmIssue rec = issue.download()[0];
  std::printf("  bad offsets %s%-5s -> flag %d site %d index %lld value %lld limit %lld\n", layout_name(L),
              kernel_name(kern), rec.flag, rec.site, (long long)rec.index, (long long)rec.value, (long long)rec.limit);
  expect(rec.flag == 1 && rec.site == 9 && rec.index == want_index && rec.value == want_value,
         std::string("bad offsets not recorded as expected (") + layout_name(L) + ")");
}

static void small_checks() {
  std::printf("small checks vs CPU (double) reference\n");
  // Uneven: empty groups (first, middle, last), a 1-row group, groups over one m-tile, tail rows.
  const std::vector<int> off = {0, 0, 1, 150, 150, 169, 300, 300, 301, 330};  // R = 341: 11 tail rows
  const int R = 341;
  uint64_t seed = 1;
  for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad})
    for (float beta : {0.0f, 1.0f}) {
      run_small(L, R, off, 0, 24, 40, 0.75f, beta, ++seed);
      run_small(L, R, off, 0, 200, 264, -1.25f, beta, ++seed);  // 2 n-tiles, 9 k-tiles (partial last)
      run_small(L, R, off, 0, 23, 19, 0.5f, beta, ++seed);      // odd n (scalar stores), odd k (padding)
    }
  for (float beta : {0.0f, 1.0f}) {
    run_small(GroupedLayout::kWgrad, R, off, 24, 40, 0, 0.75f, beta, ++seed);
    run_small(GroupedLayout::kWgrad, R, off, 200, 136, 0, -1.25f, beta, ++seed);
    run_small(GroupedLayout::kWgrad, R, off, 13, 11, 0, 0.5f, beta, ++seed);
  }
  run_small(GroupedLayout::kFwd, R, {0, 0, 0, 0}, 0, 24, 40, 1.0f, 1.0f, ++seed);  // no rows in use
  if (g_tma) {
    // 341 rows span several 128-row m-tiles; n = 300 two 256-wide n-tiles; k = 1000 16 k-tiles (the
    // 4-stage ring wraps, and one CTA runs several tiles when the grid is smaller than the tiles).
    for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad})
      for (float beta : {0.0f, 1.0f}) {
        run_small(L, R, off, 0, 24, 40, 0.75f, beta, ++seed, Kernel::kTma);
        run_small(L, R, off, 0, 200, 264, -1.25f, beta, ++seed, Kernel::kTma);
        run_small(L, R, off, 0, 23, 19, 0.5f, beta, ++seed, Kernel::kTma);
        run_small(L, R, off, 0, 300, 1000, 1.0f, beta, ++seed, Kernel::kTma);
      }
    for (float beta : {0.0f, 1.0f}) {
      run_small(GroupedLayout::kWgrad, R, off, 24, 40, 0, 0.75f, beta, ++seed, Kernel::kTma);
      run_small(GroupedLayout::kWgrad, R, off, 200, 136, 0, -1.25f, beta, ++seed, Kernel::kTma);
      run_small(GroupedLayout::kWgrad, R, off, 13, 11, 0, 0.5f, beta, ++seed, Kernel::kTma);
      run_small(GroupedLayout::kWgrad, R, off, 136, 300, 0, 1.0f, beta, ++seed, Kernel::kTma);
    }
    // Large groups: the wgrad reduction over many k-tiles (ring wraps), partial last k-tiles.
    const std::vector<int> big = {0, 700, 700, 1333, 2001};
    for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad, GroupedLayout::kWgrad})
      run_small(L, 2040, big, 72, 264, 96, 1.0f, 0.0f, ++seed, Kernel::kTma);
    run_small(GroupedLayout::kFwd, R, {0, 0, 0, 0}, 0, 24, 40, 1.0f, 1.0f, ++seed, Kernel::kTma);
  }
  // bf16 output, and C that the TMA kernel's staged epilogue (16-byte vectors through shared memory)
  // leaves to its fallback: rows not whole 16-byte vectors (f32 n % 4 ≠ 0, bf16 n % 8 ≠ 0) or C not
  // 16-byte aligned. (The checks above already take the staged path wherever n % 4 = 0: partial
  // m-tiles, n-tiles of 24, 200 and 300 − 256 columns, beta 1, wgrad.)
  std::printf("bf16 output (c16) and the epilogue's fallbacks (C+s: C starts s elements past 16-byte alignment)\n");
  for (Kernel kern : {Kernel::kMma, Kernel::kTma}) {
    if (kern == Kernel::kTma && !g_tma) continue;
    const SmallOut to16{.bf16 = true};
    const std::vector<int> big = {0, 700, 700, 1333, 2001};  // several m-tiles per group, empty group
    for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad}) {
      // bf16, n % 8 = 0 (staged): one n-tile of 24; 200 = 3 chunks of 64 columns + 8; 296 = a full
      // n-tile + 40 columns; 264 over several m-tiles per group; two terms.
      run_small(L, R, off, 0, 24, 40, 0.75f, 0.0f, ++seed, kern, 0, to16);
      run_small(L, R, off, 0, 200, 264, -1.25f, 0.0f, ++seed, kern, 0, to16);
      run_small(L, R, off, 0, 296, 72, 1.0f, 0.0f, ++seed, kern, 0, to16);
      run_small(L, 2040, big, 0, 264, 96, 1.0f, 0.0f, ++seed, kern, 0, to16);
      if (kern == Kernel::kTma)  // (mma.sync runs two passes: the first term rounded to bf16 in between)
        run_small(L, R, off, 0, 200, 264, -1.25f, 0.0f, ++seed, kern, 72, to16);
      // bf16 fallbacks: n % 8 = 4 with a 1000-long k-loop (bf16x2 pairs), odd n (scalars), C 8 bytes
      // past alignment (pairs), C 2 bytes past (scalars).
      run_small(L, R, off, 0, 300, 1000, 1.0f, 0.0f, ++seed, kern, 0, to16);
      run_small(L, R, off, 0, 23, 19, 0.5f, 0.0f, ++seed, kern, 0, to16);
      run_small(L, R, off, 0, 24, 40, 1.0f, 0.0f, ++seed, kern, 0, {.bf16 = true, .shift = 4});
      run_small(L, R, off, 0, 24, 40, 1.0f, 0.0f, ++seed, kern, 0, {.bf16 = true, .shift = 1});
      // f32 fallbacks: n % 4 = 2 (float2 pairs), C 8 bytes past alignment (float2), C 4 bytes past
      // (scalars); beta 0 and 1.
      for (float beta : {0.0f, 1.0f}) {
        run_small(L, R, off, 0, 266, 40, 0.75f, beta, ++seed, kern);
        run_small(L, R, off, 0, 24, 40, 0.75f, beta, ++seed, kern, 0, {.shift = 2});
        run_small(L, R, off, 0, 24, 40, 0.75f, beta, ++seed, kern, 0, {.shift = 1});
      }
    }
    for (float beta : {0.0f, 1.0f}) {  // wgrad's f32 fallbacks
      run_small(GroupedLayout::kWgrad, R, off, 200, 266, 0, 0.75f, beta, ++seed, kern);
      run_small(GroupedLayout::kWgrad, R, off, 136, 40, 0, 0.75f, beta, ++seed, kern, 0, {.shift = 2});
      run_small(GroupedLayout::kWgrad, R, off, 24, 40, 0, 0.75f, beta, ++seed, kern, 0, {.shift = 1});
    }
  }
  std::printf("two terms: C = alpha*(A*op(B) + A2*op(B2)) + beta*C (mma.sync: two launches; tma: one)\n");
  for (Kernel kern : {Kernel::kMma, Kernel::kTma}) {
    if (kern == Kernel::kTma && !g_tma) continue;
    for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad})
      for (float beta : {0.0f, 1.0f}) {
        // (n, k, k2): odd k2 (padded copy), partial last k-tiles of both terms over 2 n-tiles,
        // odd n with k < k2, whole k-tiles (the second term starts on a fresh stage), and a long
        // k-loop whose terms straddle the 4-stage ring's wrap (16 + 3 k-tiles).
        run_small(L, R, off, 0, 24, 40, 0.75f, beta, ++seed, kern, 19);
        run_small(L, R, off, 0, 200, 264, -1.25f, beta, ++seed, kern, 72);
        run_small(L, R, off, 0, 23, 19, 0.5f, beta, ++seed, kern, 40);
        run_small(L, R, off, 0, 24, 64, 1.0f, beta, ++seed, kern, 128);
        run_small(L, R, off, 0, 300, 1000, 1.0f, beta, ++seed, kern, 136);
      }
    const std::vector<int> big = {0, 700, 700, 1333, 2001};  // several m-tiles per group, empty group
    for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad})
      run_small(L, 2040, big, 0, 264, 96, 1.0f, 1.0f, ++seed, kern, 512);
    run_small(GroupedLayout::kDgrad, R, {0, 0, 0, 0}, 0, 24, 40, 1.0f, 1.0f, ++seed, kern, 24);  // no rows in use
  }
  std::printf("bad offsets (recorded, skipped)\n");
  for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad, GroupedLayout::kWgrad}) {
    run_bad_offsets(L, {0, 10, 5, 20}, 2, 5);        // decreasing
    run_bad_offsets(L, {0, -3, 5, 20}, 1, -3);       // negative
    run_bad_offsets(L, {0, 10, 20, 1000}, 3, 1000);  // offsets[G] > R
    run_bad_offsets(L, {4, 10, 20, 30}, 0, 4);       // offsets[0] != 0
  }
  if (g_tma)
    for (GroupedLayout L : {GroupedLayout::kFwd, GroupedLayout::kDgrad, GroupedLayout::kWgrad}) {
      run_bad_offsets(L, {0, 10, 5, 20}, 2, 5, Kernel::kTma);
      run_bad_offsets(L, {0, 10, 20, 1000}, 3, 1000, Kernel::kTma);
    }
}

// ---------------------------------------------------------------- bench shapes vs cuBLAS

__global__ void fill_bf16_kernel(bf16* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 29;
    p[i] = __float2bfloat16_rn(static_cast<float>((x >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f);
  }
}
// bf16 output checks: *mismatch += got ≠ bf16_rn(same) bitwise (same: the same kernel's f32 C, so
// the same accumulators), *max_ulps = max |got − ref| in bf16 ulps of ref (ref: another f32 result)
// as float bits (non-negative floats order as their bits); non-finite got counts as a mismatch and
// as 1e30 ulps.
__global__ void bf16_check_kernel(const bf16* got, const float* same, const float* ref, int64_t n,
                                  unsigned long long* mismatch, unsigned* max_ulps) {
  unsigned long long bad = 0;
  float worst = 0.0f;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = __bfloat162float(got[i]), r = ref[i];
    const bf16 want = __float2bfloat16_rn(same[i]);
    bad += !isfinite(g) || __bfloat16_as_ushort(got[i]) != __bfloat16_as_ushort(want);
    int e;
    frexpf(fabsf(r), &e);
    const float ulp = r == 0.0f ? ldexpf(1.0f, -133) : ldexpf(1.0f, max(e - 8, -133));
    worst = fmaxf(worst, isfinite(g) ? fabsf(g - r) / ulp : 1e30f);
  }
  atomicAdd(mismatch, bad);
  atomicMax(max_ulps, __float_as_uint(worst));
}
__global__ void diff_norm_kernel(const float* got, const float* want, int64_t n, double* out) {
  double e = 0, r = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const double d = double(got[i]) - want[i];
    e += std::isfinite(got[i]) ? d * d : 1e300;
    r += double(want[i]) * want[i];
  }
  atomicAdd(out, e);
  atomicAdd(out + 1, r);
}

struct BenchCall {
  const char* name;
  GroupedLayout layout;
  int m, n, k;  // fwd/dgrad: n, k; wgrad: m, n
};

struct Row {
  std::string name;
  double rel = 0;                             // mma.sync vs the cuBLAS loop
  double ours = 0, tma = 0;                   // TFLOP/s: mma.sync, TMA kernel
  double ours_acc = 0, tma_acc = 0;           // the same with beta = 1 (C read and accumulated)
  double tma_direct = 0, tma_direct_acc = 0;  // TMA with the direct epilogue forced (A/B), beta 0 / 1
  double tma_rel = -1;                        // vs mma.sync
  double loop = 0, dense = 0;
};

// fwd/dgrad with bf16 output (c16) on the TMA kernel.
struct Bf16Row {
  std::string name;
  unsigned long long mismatch = 0;         // elements ≠ the TMA f32 result rounded (bitwise)
  double max_ulps = 0;                     // max |diff| vs the mma.sync f32 result, in bf16 ulps
  double tma = 0, tma_direct = 0;          // TFLOP/s: bf16 out staged / direct epilogue
  double tma_f32 = 0, tma_f32_direct = 0;  // the same call with f32 out (from Row)
};

template <class F>
static double median_ms(F&& f, int reps) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 2; ++i) f();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(e0));
    f();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

static void bench() {
  const int R = 65536, G = 64, D = 1536, I = 512;
  // ~Balanced routing: sizes 1024·(1 ± 25%), summing to R.
  Rng rng(42);
  std::vector<double> w(G);
  double ws = 0;
  for (auto& x : w) ws += (x = 0.75 + 0.5 * rng.uniform());
  std::vector<int> off(G + 1, 0);
  for (int g = 0; g < G; ++g) off[g + 1] = g + 1 == G ? R : off[g] + static_cast<int>(R * w[g] / ws);
  int mn = R, mx = 0;
  for (int g = 0; g < G; ++g) mn = std::min(mn, off[g + 1] - off[g]), mx = std::max(mx, off[g + 1] - off[g]);
  std::printf("\nbench shapes: R=%d G=%d rows per group %d..%d\n", R, G, mn, mx);

  Dev<bf16> x(int64_t{R} * D), h(int64_t{R} * D), wts(int64_t{G} * D * I);
  Dev<float> c(int64_t{R} * D), cref(int64_t{R} * D);
  Dev<bf16> c16(int64_t{R} * D);
  Dev<unsigned long long> mismatch(1);
  Dev<unsigned> max_ulps(1);
  Dev<int32_t> doff(G + 1);
  doff.upload(std::vector<int32_t>(off.begin(), off.end()));
  Dev<double> norms(2);
  fill_bf16_kernel<<<4096, 256>>>(x.p, x.n, 1);
  fill_bf16_kernel<<<4096, 256>>>(h.p, h.n, 2);
  fill_bf16_kernel<<<4096, 256>>>(wts.p, wts.n, 3);
  CK(cudaGetLastError());
  Dev<GroupedGemmIssue> issue(1);
  CK(cudaMemset(issue.p, 0, sizeof(GroupedGemmIssue)));
  cublasHandle_t hb;
  CKB(cublasCreate(&hb));

  // f32 → bf16 copy of A [R, 1536]: what the backend adds before each call.
  {
    Dev<float> af(int64_t{R} * D);
    CK(cudaMemset(af.p, 0, af.n * sizeof(float)));
    const double ms = median_ms([&] { CK(launch_to_bf16_padded(x.p, af.p, R, D, nullptr)); }, 10);
    std::printf("f32->bf16 copy of [%d, %d]: %.3f ms, %.0f GB/s\n", R, D, ms, R * double(D) * 6 / ms / 1e6);
    fill_bf16_kernel<<<4096, 256>>>(x.p, x.n, 1);
    CK(cudaGetLastError());
  }

  const BenchCall calls[] = {
      {"fwd  x*W1^T  [R,1536]->[R,512]", GroupedLayout::kFwd, 0, I, D},
      {"fwd  h*W2^T  [R,512]->[R,1536]", GroupedLayout::kFwd, 0, D, I},
      {"dgrad dy*W2  [R,1536]->[R,512]", GroupedLayout::kDgrad, 0, I, D},
      {"dgrad da*W1  [R,512]->[R,1536]", GroupedLayout::kDgrad, 0, D, I},
      {"wgrad dyT*h  -> [G,1536,512]", GroupedLayout::kWgrad, D, I, 0},
      {"wgrad daT*x  -> [G,512,1536]", GroupedLayout::kWgrad, I, D, 0},
  };
  std::vector<Row> rows;
  std::vector<Bf16Row> bf16_rows;
  const float one = 1.0f, zero = 0.0f;
  for (const BenchCall& bc : calls) {
    const bool wg = bc.layout == GroupedLayout::kWgrad;
    // Operands: A = x (wide, 1536 columns) or h (512 columns) as the call needs; B = weights or h/x.
    const int a_cols = wg ? bc.m : bc.k, b_cols = wg ? bc.n : (bc.layout == GroupedLayout::kFwd ? bc.k : bc.n);
    const bf16* a = a_cols == D ? x.p : h.p;
    const bf16* b = wg ? (b_cols == D ? x.p : h.p) : wts.p;
    GroupedGemmParams p{.a = a,
                        .b = b,
                        .c = c.p,
                        .offsets = doff.p,
                        .rows = R,
                        .groups = G,
                        .m = bc.m,
                        .n = bc.n,
                        .k = bc.k,
                        .lda = a_cols,
                        .ldb = b_cols,
                        .alpha = 1.0f,
                        .beta = 0.0f,
                        .issue = issue.p,
                        .issue_site = 1};
    const int64_t c_elems = wg ? int64_t{G} * bc.m * bc.n : int64_t{R} * bc.n;
    const double flops = wg ? 2.0 * R * bc.m * bc.n : 2.0 * R * bc.n * bc.k;
    // cuBLAS, one call per group (row-major C = A·op(B) as column-major Cᵀ = op(B)ᵀ·Aᵀ).
    const auto cublas_loop = [&](float* out) {
      for (int g = 0; g < G; ++g) {
        const int r0 = off[g], r = off[g + 1] - off[g];
        if (r == 0) continue;
        if (bc.layout == GroupedLayout::kFwd)
          CKB(cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, bc.n, r, bc.k, &one, b + int64_t{g} * bc.n * bc.k, CUDA_R_16BF,
                           bc.k, a + int64_t{r0} * bc.k, CUDA_R_16BF, bc.k, &zero, out + int64_t{r0} * bc.n, CUDA_R_32F,
                           bc.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        else if (bc.layout == GroupedLayout::kDgrad)
          CKB(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_N, bc.n, r, bc.k, &one, b + int64_t{g} * bc.k * bc.n, CUDA_R_16BF,
                           bc.n, a + int64_t{r0} * bc.k, CUDA_R_16BF, bc.k, &zero, out + int64_t{r0} * bc.n, CUDA_R_32F,
                           bc.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        else
          CKB(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_T, bc.n, bc.m, r, &one, b + int64_t{r0} * bc.n, CUDA_R_16BF, bc.n,
                           a + int64_t{r0} * bc.m, CUDA_R_16BF, bc.m, &zero, out + int64_t{g} * bc.m * bc.n, CUDA_R_32F,
                           bc.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
    };
    // One dense GEMM of the same FLOPs (the ceiling): M = R (fwd/dgrad) or K = R (wgrad).
    const auto dense = [&] {
      if (bc.layout == GroupedLayout::kFwd)
        CKB(cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, bc.n, R, bc.k, &one, b, CUDA_R_16BF, bc.k, a, CUDA_R_16BF, bc.k,
                         &zero, cref.p, CUDA_R_32F, bc.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      else if (bc.layout == GroupedLayout::kDgrad)
        CKB(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_N, bc.n, R, bc.k, &one, b, CUDA_R_16BF, bc.n, a, CUDA_R_16BF, bc.k,
                         &zero, cref.p, CUDA_R_32F, bc.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      else
        CKB(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_T, bc.n, bc.m, R, &one, b, CUDA_R_16BF, bc.n, a, CUDA_R_16BF, bc.m,
                         &zero, cref.p, CUDA_R_32F, bc.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    // Correctness vs the cuBLAS loop (both f32 sums of the same bf16 products).
    CK(cudaMemset(c.p, 0xFF, c_elems * sizeof(float)));  // NaN poison: every element must be written
    CK(launch_grouped_gemm(p, bc.layout, nullptr));
    cublas_loop(cref.p);
    CK(cudaMemset(norms.p, 0, 2 * sizeof(double)));
    diff_norm_kernel<<<1024, 256>>>(c.p, cref.p, c_elems, norms.p);
    CK(cudaGetLastError());
    const std::vector<double> nr = norms.download();
    Row row{.name = bc.name, .rel = std::sqrt(nr[0] / nr[1])};
    expect(row.rel < 1e-5, std::string(bc.name) + ": differs from cuBLAS");
    const auto tflops = [&](double ms) { return flops / ms / 1e9; };
    // The other kernels must match the mma.sync result c within f32 summation-order noise.
    const auto check_vs_c = [&](const char* what, auto&& run_into_cref) {
      CK(cudaMemset(cref.p, 0xFF, c_elems * sizeof(float)));
      run_into_cref();
      CK(cudaMemset(norms.p, 0, 2 * sizeof(double)));
      diff_norm_kernel<<<1024, 256>>>(cref.p, c.p, c_elems, norms.p);
      CK(cudaGetLastError());
      const std::vector<double> nv = norms.download();
      const double rel = std::sqrt(nv[0] / nv[1]);
      expect(rel < 1e-5, std::string(bc.name) + ": " + what + " differs");
      return rel;
    };
    row.ours = tflops(median_ms([&] { CK(launch_grouped_gemm(p, bc.layout, nullptr)); }, 20));
    GroupedGemmParams q = p;
    q.c = cref.p;
    if (g_tma) {
      check_vs_c("tma direct epilogue", [&] { launch(Kernel::kTma, q, bc.layout, true); });
      row.tma_direct = tflops(median_ms([&] { launch(Kernel::kTma, q, bc.layout, true); }, 20));
      row.tma_rel = check_vs_c("tma", [&] { launch(Kernel::kTma, q, bc.layout); });
      row.tma = tflops(median_ms([&] { launch(Kernel::kTma, q, bc.layout); }, 20));
    }
    if (g_tma && !wg) {  // bf16 output; cref holds the TMA kernel's f32 C, c the mma.sync one
      Bf16Row br{.name = std::string(bc.name) + " bf16 out", .tma_f32 = row.tma, .tma_f32_direct = row.tma_direct};
      GroupedGemmParams o16 = p;
      o16.c = nullptr, o16.c16 = c16.p;
      for (const bool direct : {true, false}) {               // the staged epilogue's result last (reported)
        CK(cudaMemset(c16.p, 0xFF, c_elems * sizeof(bf16)));  // NaN poison
        launch(Kernel::kTma, o16, bc.layout, direct);
        CK(cudaMemset(mismatch.p, 0, sizeof(unsigned long long)));
        CK(cudaMemset(max_ulps.p, 0, sizeof(unsigned)));
        bf16_check_kernel<<<1024, 256>>>(c16.p, cref.p, c.p, c_elems, mismatch.p, max_ulps.p);
        CK(cudaGetLastError());
        br.mismatch = mismatch.download()[0];
        const unsigned ub = max_ulps.download()[0];
        float uf;
        std::memcpy(&uf, &ub, 4);
        br.max_ulps = uf;
        const std::string what = br.name + (direct ? " (direct epilogue)" : "");
        expect(br.mismatch == 0, what + ": " + std::to_string(br.mismatch) + " values differ from the f32 C rounded");
        expect(br.max_ulps <= 1.0, what + ": more than one bf16 ulp from the mma.sync f32 C");
      }
      br.tma_direct = tflops(median_ms([&] { launch(Kernel::kTma, o16, bc.layout, true); }, 20));
      br.tma = tflops(median_ms([&] { launch(Kernel::kTma, o16, bc.layout); }, 20));
      std::printf("  %-41s mismatches vs f32 rounded %llu  max %.2f ulp vs mma.sync  tma %.0f (direct epilogue %.0f)\n",
                  br.name.c_str(), br.mismatch, br.max_ulps, br.tma, br.tma_direct);
      bf16_rows.push_back(br);
    }
    {  // beta = 1, as the model's gradient accumulation (c and cref hold finite values by now)
      GroupedGemmParams acc = p;
      acc.beta = 1.0f;
      row.ours_acc = tflops(median_ms([&] { CK(launch_grouped_gemm(acc, bc.layout, nullptr)); }, 20));
      if (g_tma) {
        row.tma_acc = tflops(median_ms([&] { launch(Kernel::kTma, acc, bc.layout); }, 20));
        row.tma_direct_acc = tflops(median_ms([&] { launch(Kernel::kTma, acc, bc.layout, true); }, 20));
      }
    }
    row.loop = tflops(median_ms([&] { cublas_loop(cref.p); }, 10));
    row.dense = tflops(median_ms(dense, 10));
    rows.push_back(row);
    std::printf(
        "  %-32s rel %.2e  mma.sync %.0f (beta 1: %.0f)  tma %.0f (beta 1: %.0f, rel %.1e; direct epilogue "
        "%.0f, beta 1: %.0f)  loop %.0f  dense %.0f\n",
        row.name.c_str(), row.rel, row.ours, row.ours_acc, row.tma, row.tma_acc, row.tma_rel, row.tma_direct,
        row.tma_direct_acc, row.loop, row.dense);
  }

  // The MoE backward's dx_perm = da·W1 + db·W3 (dgrad, [R,512]·[G,512,1536] twice into [R,1536]):
  // two launches (the model before: beta 0, then beta 1 re-reading C) vs one two-term launch.
  // da = h, db = x (their first R·512 elements read as [R,512]), W1 = wts, W3 = a second weight set.
  struct TwoTermRow {
    const char* name;
    double tma_ms = 0, mma_ms = 0, rel = -1;
  };
  std::vector<TwoTermRow> two_rows;
  {
    Dev<bf16> w3(int64_t{G} * I * D);
    fill_bf16_kernel<<<4096, 256>>>(w3.p, w3.n, 4);
    CK(cudaGetLastError());
    const GroupedGemmParams first{.a = h.p,
                                  .b = wts.p,
                                  .c = c.p,
                                  .offsets = doff.p,
                                  .rows = R,
                                  .groups = G,
                                  .m = 0,
                                  .n = D,
                                  .k = I,
                                  .lda = I,
                                  .ldb = D,
                                  .alpha = 1.0f,
                                  .beta = 0.0f,
                                  .issue = issue.p,
                                  .issue_site = 1};
    GroupedGemmParams second = first, fused = first;
    second.a = x.p, second.b = w3.p, second.beta = 1.0f;
    fused.a2 = x.p, fused.b2 = w3.p, fused.k2 = I, fused.lda2 = I, fused.ldb2 = D;
    const double flops = 2.0 * R * D * (2.0 * I);
    const int64_t c_elems = int64_t{R} * D;
    const Kernel fast = g_tma ? Kernel::kTma : Kernel::kMma;
    const auto two_launches = [&](Kernel kern, float* out) {
      GroupedGemmParams p1 = first, p2 = second;
      p1.c = p2.c = out;
      launch(kern, p1, GroupedLayout::kDgrad);
      launch(kern, p2, GroupedLayout::kDgrad);
    };
    const auto one_launch = [&](Kernel kern, float* out) {
      GroupedGemmParams p = fused;
      p.c = out;
      launch(kern, p, GroupedLayout::kDgrad);  // mma.sync: two launches inside launch_grouped_gemm
    };
    // Correctness: the one-launch result vs the two-launch one (NaN-poisoned, f32 sums in another
    // order: ~1e-7).
    const auto rel_of = [&](auto&& run_into_cref) {
      CK(cudaMemset(c.p, 0xFF, c_elems * sizeof(float)));
      CK(cudaMemset(cref.p, 0xFF, c_elems * sizeof(float)));
      two_launches(fast, c.p);
      run_into_cref();
      CK(cudaMemset(norms.p, 0, 2 * sizeof(double)));
      diff_norm_kernel<<<1024, 256>>>(cref.p, c.p, c_elems, norms.p);
      CK(cudaGetLastError());
      const std::vector<double> nv = norms.download();
      return std::sqrt(nv[0] / nv[1]);
    };
    TwoTermRow two{.name = "dgrad da*W1 + db*W3 (two launches)"}, one{.name = "dgrad da*W1 + db*W3 (one launch)"};
    one.rel = rel_of([&] { one_launch(fast, cref.p); });
    expect(one.rel < 1e-5, "two-term dgrad: one launch differs from two launches");
    two.rel = rel_of([&] { two_launches(Kernel::kMma, cref.p); });
    expect(two.rel < 1e-5, "two-term dgrad: mma.sync differs from the TMA kernel");
    if (g_tma) {
      two.tma_ms = median_ms([&] { two_launches(Kernel::kTma, c.p); }, 20);
      one.tma_ms = median_ms([&] { one_launch(Kernel::kTma, c.p); }, 20);
    }
    two.mma_ms = median_ms([&] { two_launches(Kernel::kMma, c.p); }, 20);
    one.mma_ms = median_ms([&] { one_launch(Kernel::kMma, c.p); }, 20);
    for (TwoTermRow* r : {&two, &one}) {
      std::printf("  %-40s tma %.3f ms (%.0f TFLOP/s)  mma.sync %.3f ms (%.0f TFLOP/s)  rel %.1e\n", r->name, r->tma_ms,
                  r->tma_ms > 0 ? flops / r->tma_ms / 1e9 : 0.0, r->mma_ms, flops / r->mma_ms / 1e9, r->rel);
      two_rows.push_back(*r);
    }
  }
  expect(issue.download()[0].flag == 0, "bench offsets recorded an issue");
  CKB(cublasDestroy(hb));

  std::printf(
      "\nTFLOP/s (median of 20; cuBLAS: 10). TMA: staged epilogue (shipped); TMA direct: its fallback "
      "(stores from the accumulators) forced, the A/B\n"
      "| call | rel vs cuBLAS | mma.sync 128x128x64 | TMA wgmma 128x256x64 | TMA direct | mma.sync, beta 1 | "
      "TMA, beta 1 | TMA direct, beta 1 | cuBLAS loop | dense cuBLAS |\n"
      "|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows)
    std::printf("| %s | %.1e | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f |\n", r.name.c_str(), r.rel,
                r.ours, r.tma, r.tma_direct, r.ours_acc, r.tma_acc, r.tma_direct_acc, r.loop, r.dense);
  if (!bf16_rows.empty()) {
    std::printf(
        "\nbf16 output (c16, beta 0), TMA kernel, TFLOP/s (median of 20); mismatches: values != the TMA "
        "f32 C rounded to bf16 (bitwise); ulp: max |diff| vs the mma.sync f32 C in bf16 ulps (<= 1)\n"
        "| call | mismatches | max ulp | TMA bf16 out | TMA direct, bf16 out | TMA f32 out | TMA direct, f32 out |\n"
        "|---|---|---|---|---|---|---|\n");
    for (const Bf16Row& r : bf16_rows)
      std::printf("| %s | %llu | %.2f | %.0f | %.0f | %.0f | %.0f |\n", r.name.c_str(), r.mismatch, r.max_ulps, r.tma,
                  r.tma_direct, r.tma_f32, r.tma_f32_direct);
  }
  std::printf(
      "\nMoE dgrad dx_perm = da*W1 + db*W3, R=%d, [R,%d]*[G,%d,%d] twice (median of 20; mma.sync runs "
      "two launches either way)\n"
      "| call | TMA ms | TMA TFLOP/s | mma.sync ms | rel (vs TMA, two launches) |\n|---|---|---|---|---|\n",
      R, I, I, D);
  const double two_flops = 2.0 * R * D * (2.0 * I);
  for (const TwoTermRow& r : two_rows)
    std::printf("| %s | %.3f | %.0f | %.3f | %.1e |\n", r.name, r.tma_ms,
                r.tma_ms > 0 ? two_flops / r.tma_ms / 1e9 : 0.0, r.mma_ms, r.rel);
}

int main(int argc, char** argv) {
  const bool small_only = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  g_tma = wgmma_supported(0) && tensor_map_encoder() != nullptr;
  std::printf("TMA kernel: %s\n", g_tma ? "runs" : "not available here (skipped)");
  small_checks();
  if (!small_only) bench();
  std::printf(
      "\nmax relative error of the small checks (fwd/dgrad/wgrad): mma.sync %.2e %.2e %.2e; tma %.2e %.2e %.2e\n",
      g_max_rel[0][0], g_max_rel[0][1], g_max_rel[0][2], g_max_rel[1][0], g_max_rel[1][1], g_max_rel[1][2]);
  std::printf("%s (%d failures)\n", g_failures == 0 ? "ALL CHECKS PASSED" : "CHECKS FAILED", g_failures);
  return g_failures == 0 ? 0 : 1;
}
