// CUDA adamw_multi (op_args.h AdamWMultiArgs; optim_ops.cu, adamw_multi_table.h): one launch over a
// list of 21 tensors against
// - the GPU's per-tensor adamw on a second copy of the same tensors: bitwise equal (p, m, v and the
//   bf16 copies; the multi kernel runs the per-tensor kernel's element code on each chunk), and
// - the CPU's adamw_multi (the per-tensor CPU op over the entries) within kRoundOnce, the adamw
//   tolerance of cuda_vs_cpu_moe.cpp,
// with odd sizes (float4 body and scalar tail), an empty tensor, sizes at and around the chunk
// (kAdamWChunk) and one over several chunks, views that start one float off a 16-byte boundary (the
// scalar path, also over several chunks), a bf16 copy one element off an 8-byte boundary, bf16
// copies on some entries and each entry's own weight decay; two steps on the same list (the second
// does not upload the device table again), then a changed list (every other tensor, another weight
// decay: a stale table would update the dropped tensors and use the old decay); with and without
// clipping. Then the validation errors name the entry.
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides (FMA contraction may differ)"};

CudaBackend& cuda_backend() { return dynamic_cast<CudaBackend&>(gpu()); }

struct TensorCase {
  Shape shape;
  int64_t offset;       // elements before the view of p, m, v, grad (1: not 16-byte aligned)
  bool copy;            // a bf16 copy
  int64_t copy_offset;  // elements before the copy's view (1: not 8-byte aligned)
  double weight_decay;
};

constexpr int64_t kC = kAdamWChunk;
const std::vector<TensorCase> kSpecs = {
    {Shape{1}, 0, true, 0, 0.0},
    {Shape{2}, 0, false, 0, 0.1},
    {Shape{3}, 1, true, 0, 0.1},
    {Shape{4}, 0, true, 0, 0.05},
    {Shape{0}, 0, true, 0, 0.1},  // empty: skipped
    {Shape{5}, 0, false, 0, 0.0},
    {Shape{7, 3}, 0, true, 0, 0.1},
    {Shape{64}, 1, false, 0, 0.0},
    {Shape{127}, 0, true, 1, 0.1},  // aligned floats, unaligned bf16 copy: the scalar path
    {Shape{1003}, 0, false, 0, 0.05},
    {Shape{4099}, 0, true, 0, 0.1},
    {Shape{kC - 1}, 0, true, 0, 0.0},
    {Shape{kC}, 0, false, 0, 0.1},
    {Shape{kC + 1}, 0, true, 0, 0.1},
    {Shape{kC + 5}, 1, true, 0, 0.0},
    {Shape{2 * kC + 7}, 1, false, 0, 0.1},   // unaligned over three chunks
    {Shape{5 * kC + 123}, 0, true, 0, 0.1},  // six chunks, the last partial, with a tail
    {Shape{33, 65}, 0, false, 0, 0.0},
    {Shape{257}, 1, true, 1, 0.05},
    {Shape{12}, 0, false, 0, 0.1},
    {Shape{3 * kC}, 0, true, 0, 0.05},  // whole chunks only
};

// One parameter's tensors on both sides, in Duals with room for the views' offsets.
struct Param {
  TensorCase spec;
  Dual p, m, v, g, copy;
  Param(const TensorCase& s, uint64_t seed)
      : spec(s),
        p(Shape{s.offset + s.shape.numel()}),
        m(Shape{s.offset + s.shape.numel()}),
        v(Shape{s.offset + s.shape.numel()}),
        g(Shape{s.offset + s.shape.numel()}),
        copy(Shape{s.copy_offset + s.shape.numel()}, DType::kBF16) {
    p.normal(seed);
    m.normal(seed + 1, 0.1);
    std::vector<double> vv(static_cast<size_t>(v.numel()));
    for (size_t i = 0; i < vv.size(); ++i) vv[i] = 0.01 * (1.0 + std::pow(normal_at(seed + 2, 0, i), 2));
    v.set(vv);  // positive second moments
    g.normal(seed + 3);
    copy.poison();
  }
  Tensor view(const Dual& d, Side s) const { return offset_view(d, s, spec.shape, spec.offset); }
  Tensor copy_view(Side s) const { return spec.copy ? offset_view(copy, s, spec.shape, spec.copy_offset) : Tensor{}; }
  AdamWEntry entry(Side s, double weight_decay) const {
    return {.param = view(p, s),
            .m = view(m, s),
            .v = view(v, s),
            .grad = view(g, s),
            .param_bf16 = copy_view(s),
            .weight_decay = weight_decay};
  }
};

using Params = std::vector<std::unique_ptr<Param>>;

Params make_params(uint64_t seed) {
  Params ps;
  for (size_t i = 0; i < kSpecs.size(); ++i) ps.push_back(std::make_unique<Param>(kSpecs[i], seed + 10 * i));
  return ps;
}

// The device bytes of a view (none for an undefined one: an entry without a bf16 copy).
std::vector<uint8_t> device_bytes(const Tensor& t) {
  std::vector<uint8_t> b(t.defined() ? t.nbytes() : 0);
  if (!b.empty()) gpu().download(b.data(), t);
  return b;
}

struct Hyper {
  double lr, beta1, beta2, eps, max_norm;
  int64_t step;
};

// One step: set `multi` (entries `use`, with weight decays `wd`) by adamw_multi on both sides, set
// `single` by the GPU's per-tensor adamw on the same entries; the GPU sides must then be bitwise equal.
void step_and_compare(const Params& multi, const Params& single, const std::vector<size_t>& use,
                      const std::vector<double>& wd, const Dual& gsq, const Hyper& h, const std::string& what) {
  run_both([&](Backend& be, Side s) {
    AdamWMultiArgs args{.grad_sq = h.max_norm > 0 ? gsq[s] : Tensor{},
                        .lr = h.lr,
                        .beta1 = h.beta1,
                        .beta2 = h.beta2,
                        .eps = h.eps,
                        .max_norm = h.max_norm,
                        .step = h.step};
    for (size_t k = 0; k < use.size(); ++k) args.entries.push_back(multi[use[k]]->entry(s, wd[k]));
    be.adamw_multi({}, args);
  });
  for (size_t k = 0; k < use.size(); ++k) {
    const AdamWEntry e = single[use[k]]->entry(Side::kGpu, wd[k]);
    gpu().adamw({}, {.param = e.param,
                     .m = e.m,
                     .v = e.v,
                     .grad = e.grad,
                     .grad_sq = h.max_norm > 0 ? gsq[Side::kGpu] : Tensor{},
                     .lr = h.lr,
                     .beta1 = h.beta1,
                     .beta2 = h.beta2,
                     .eps = h.eps,
                     .weight_decay = e.weight_decay,
                     .max_norm = h.max_norm,
                     .step = h.step,
                     .param_bf16 = e.param_bf16});
  }
  gpu().synchronize({});
  for (size_t i = 0; i < multi.size(); ++i) {  // every tensor, also those not in the list (untouched on both)
    const Param &a = *multi[i], &b = *single[i];
    const std::string name = fmt::format("{} entry {} {} offset {}", what, i, a.spec.shape.str(), a.spec.offset);
    for (const auto& [da, db, field] : {std::tuple{&a.p, &b.p, "param"}, {&a.m, &b.m, "m"}, {&a.v, &b.v, "v"}})
      EXPECT_EQ(device_bytes(a.view(*da, Side::kGpu)), device_bytes(b.view(*db, Side::kGpu))) << name << " " << field;
    EXPECT_EQ(device_bytes(a.copy_view(Side::kGpu)), device_bytes(b.copy_view(Side::kGpu))) << name << " bf16 copy";
  }
}

// The GPU's multi results against the CPU's, and the bf16 copies against the GPU's own params.
void compare_with_cpu(const Params& multi, const std::string& what) {
  for (size_t i = 0; i < multi.size(); ++i) {
    const Param& a = *multi[i];
    if (a.spec.shape.numel() == 0) continue;
    const std::string name = fmt::format("{} {} {}", what, i, a.spec.shape.str());
    for (const auto& [d, field] : {std::pair{&a.p, "param"}, {&a.m, "m"}, {&a.v, "v"}})
      expect_close(*d, kRoundOnce, fmt::format("adamw_multi {} {}", name, field));
    if (!a.spec.copy) continue;
    const std::vector<double> got = a.copy.device_values(), param = a.p.device_values();
    const int64_t n = a.spec.shape.numel();
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double want = bf16_to_f32(f32_to_bf16(static_cast<float>(param[static_cast<size_t>(a.spec.offset + j)])));
      bad += got[static_cast<size_t>(a.spec.copy_offset + j)] == want ? 0 : 1;
    }
    EXPECT_EQ(bad, 0) << name << ": bf16 copy elements that are not bf16 of the GPU's param";
    EXPECT_TRUE(a.copy.guard_intact()) << name << " bf16 copy";
  }
}

TEST(CudaOptim, AdamWMultiEqualsPerTensor) {
  DIFFMOE_REQUIRE_CUDA();
  CudaBackend& be = cuda_backend();
  std::vector<size_t> all(kSpecs.size());
  std::vector<double> wd(kSpecs.size());
  for (size_t i = 0; i < kSpecs.size(); ++i) {
    all[i] = i;
    wd[i] = kSpecs[i].weight_decay;
  }
  for (const double max_norm : {0.0, 1.0}) {
    const std::string what = fmt::format("max_norm={}", max_norm);
    const Params multi = make_params(1300), single = make_params(1300);  // new tensors: a new list
    Dual gsq(Shape{1});
    gsq.set({7.3});  // clip = 1 / (√7.3 + 1e-6) < 1 when clipping
    const int64_t uploads = be.adamw_table_uploads();
    for (int64_t step = 1; step <= 2; ++step) {
      step_and_compare(multi, single, all, wd, gsq, {1e-2, 0.9, 0.95, 1e-8, max_norm, step},
                       fmt::format("{} step {}", what, step));
      EXPECT_EQ(be.adamw_table_uploads(), uploads + 1)
          << what << " step " << step << ": the same list must be uploaded once";
      for (const Params* ps : {&multi, &single})  // the next step's gradients
        for (size_t i = 0; i < ps->size(); ++i) (*ps)[i]->g.normal(1400 + 10 * i);
    }
    compare_with_cpu(multi, what);

    // A changed list: every other tensor, each with weight decay 0.2.
    std::vector<size_t> half;
    for (size_t i = 0; i < kSpecs.size(); i += 2) half.push_back(i);
    const std::vector<double> wd2(half.size(), 0.2);
    step_and_compare(multi, single, half, wd2, gsq, {1e-2, 0.9, 0.95, 1e-8, max_norm, 3}, what + " changed list");
    EXPECT_EQ(be.adamw_table_uploads(), uploads + 2) << what << ": a changed list must be uploaded";
    compare_with_cpu(multi, what + " changed list");
  }
}

TEST(CudaOptim, AdamWMultiErrorsNameTheEntry) {
  DIFFMOE_REQUIRE_CUDA();
  Dual p(Shape{3, 5}), m(Shape{3, 5}), v(Shape{3, 5}), g(Shape{3, 5}), wrong(Shape{5, 3}), gsq(Shape{1});
  const AdamWEntry ok{.param = p[Side::kGpu], .m = m[Side::kGpu], .v = v[Side::kGpu], .grad = g[Side::kGpu]};
  AdamWEntry bad = ok;
  bad.m = wrong[Side::kGpu];
  expect_error(
      [&] {
        gpu().adamw_multi({}, {.entries = {ok, bad}, .grad_sq = gsq[Side::kGpu], .max_norm = 1.0});
      },
      {"[adamw_multi]", "entries[1].m", "shape"});
  bad = ok;
  bad.grad = g[Side::kCpu];
  expect_error([&] { gpu().adamw_multi({}, {.entries = {bad}, .grad_sq = gsq[Side::kGpu], .max_norm = 1.0}); },
               {"[adamw_multi]", "entries[0].grad", "cpu"});
  expect_error([&] { gpu().adamw_multi({}, {.entries = {ok}, .grad_sq = gsq[Side::kCpu], .max_norm = 1.0}); },
               {"[adamw_multi]", "grad_sq"});
}

}  // namespace
}  // namespace diffmoe::cudatest
