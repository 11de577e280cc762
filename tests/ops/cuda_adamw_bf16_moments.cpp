// CUDA adamw and adamw_multi with bf16 moments (op_args.h AdamWArgs: m, v stored as bf16(f32(x)),
// rounded to nearest even; optim_ops.cu) against the CPU twin, on one list whose entries alternate
// bf16 and f32 moments (one launch handles both), with odd sizes (vector body and scalar tail),
// views one element off their alignment (the scalar path: a bf16 moment view one element in is
// 2-byte aligned), sizes around and over kAdamWChunk, bf16 copies on some entries; three steps, with
// and without clipping.
// - GPU adamw_multi vs the GPU's per-tensor adamw on a second copy: bitwise (p, m, v, copies).
// - GPU vs CPU: the bf16 moments bitwise (kBf16Moments below); the params within kRoundOnce, the
//   f32-moment adamw tolerance of cuda_adamw_multi.cpp; every bf16 copy is bf16 of the GPU's param.
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides (FMA contraction may differ)"};
// Both sides compute m and v in f64 (FMA contraction may move the last f64 bit), round to f32 and
// then to bf16: the bf16 values can differ only where an f64 value lies within an f64 ulp of an f32
// rounding boundary whose two f32 neighbours also round to different bf16 values, about 2^-45 per
// element; and the inputs of the next step are the same bf16 values on both sides.
constexpr Tol kBf16Moments{0.0, 0.0, "the same f64 update rounded to f32 then bf16 on both sides"};

struct TensorCase {
  Shape shape;
  int64_t offset;  // elements before every view (1: not 16-byte aligned, bf16 moments not 8-byte aligned)
  bool copy;       // a bf16 copy
  bool bf16;       // bf16 moments (else f32)
  double weight_decay;
};

constexpr int64_t kC = kAdamWChunk;
const std::vector<TensorCase> kSpecs = {
    {Shape{1}, 0, true, true, 0.0},       {Shape{3}, 1, true, true, 0.1},
    {Shape{4}, 0, false, false, 0.05},    {Shape{0}, 0, true, true, 0.1},  // empty: skipped
    {Shape{7, 3}, 0, true, true, 0.1},    {Shape{127}, 0, false, true, 0.0},
    {Shape{1003}, 1, false, false, 0.05}, {Shape{4099}, 0, true, true, 0.1},
    {Shape{kC - 1}, 0, true, true, 0.0},  {Shape{kC + 5}, 1, true, true, 0.0},
    {Shape{kC + 1}, 0, true, false, 0.1}, {Shape{3 * kC + 9}, 0, true, true, 0.05},  // four chunks, a tail
    {Shape{33, 65}, 0, false, true, 0.0}, {Shape{2 * kC + 7}, 1, false, true, 0.1},  // unaligned, three chunks
};

struct Param {
  TensorCase spec;
  Dual p, m, v, g, copy;
  Param(const TensorCase& s, uint64_t seed)
      : spec(s),
        p(Shape{s.offset + s.shape.numel()}),
        m(Shape{s.offset + s.shape.numel()}, s.bf16 ? DType::kBF16 : DType::kF32),
        v(Shape{s.offset + s.shape.numel()}, s.bf16 ? DType::kBF16 : DType::kF32),
        g(Shape{s.offset + s.shape.numel()}),
        copy(Shape{s.offset + s.shape.numel()}, DType::kBF16) {
    p.normal(seed);
    m.normal(seed + 1, 0.1);
    std::vector<double> vv(static_cast<size_t>(v.numel()));
    for (size_t i = 0; i < vv.size(); ++i) vv[i] = 0.01 * (1.0 + std::pow(normal_at(seed + 2, 0, i), 2));
    v.set(vv);  // positive second moments
    g.normal(seed + 3);
    copy.poison();
  }
  Tensor view(const Dual& d, Side s) const { return offset_view(d, s, spec.shape, spec.offset); }
  AdamWEntry entry(Side s) const {
    return {.param = view(p, s),
            .m = view(m, s),
            .v = view(v, s),
            .grad = view(g, s),
            .param_bf16 = spec.copy ? view(copy, s) : Tensor{},
            .weight_decay = spec.weight_decay};
  }
};

using Params = std::vector<std::unique_ptr<Param>>;

Params make_params(uint64_t seed) {
  Params ps;
  for (size_t i = 0; i < kSpecs.size(); ++i) ps.push_back(std::make_unique<Param>(kSpecs[i], seed + 10 * i));
  return ps;
}

std::vector<uint8_t> device_bytes(const Tensor& t) {
  std::vector<uint8_t> b(t.defined() ? t.nbytes() : 0);
  if (!b.empty()) gpu().download(b.data(), t);
  return b;
}

TEST(CudaOptim, AdamWBf16MomentsMatchCpu) {
  DIFFMOE_REQUIRE_CUDA();
  for (const double max_norm : {0.0, 1.0}) {
    const Params multi = make_params(2300), single = make_params(2300);
    Dual gsq(Shape{1});
    gsq.set({7.3});  // clip = 1 / (√7.3 + 1e-6) < 1 when clipping
    for (int64_t step = 1; step <= 3; ++step) {
      const std::string what = fmt::format("max_norm={} step {}", max_norm, step);
      // The list op on both sides, the per-tensor op on both sides (on the second copy).
      run_both([&](Backend& be, Side s) {
        AdamWMultiArgs args{.grad_sq = gsq[s],
                            .lr = 1e-2,
                            .beta1 = 0.9,
                            .beta2 = 0.95,
                            .eps = 1e-8,
                            .max_norm = max_norm,
                            .step = step};
        for (const auto& p : multi) args.entries.push_back(p->entry(s));
        be.adamw_multi({}, args);
        for (const auto& p : single) {
          const AdamWEntry e = p->entry(s);
          be.adamw({}, {.param = e.param,
                        .m = e.m,
                        .v = e.v,
                        .grad = e.grad,
                        .grad_sq = gsq[s],
                        .lr = 1e-2,
                        .beta1 = 0.9,
                        .beta2 = 0.95,
                        .eps = 1e-8,
                        .weight_decay = e.weight_decay,
                        .max_norm = max_norm,
                        .step = step,
                        .param_bf16 = e.param_bf16});
        }
      });
      for (size_t i = 0; i < kSpecs.size(); ++i) {
        const Param &a = *multi[i], &b = *single[i];
        const std::string name = fmt::format("{} entry {} {} offset {} {}", what, i, a.spec.shape.str(), a.spec.offset,
                                             a.spec.bf16 ? "bf16 moments" : "f32 moments");
        for (const auto& [da, db, field] :
             {std::tuple{&a.p, &b.p, "param"}, {&a.m, &b.m, "m"}, {&a.v, &b.v, "v"}, {&a.copy, &b.copy, "copy"}}) {
          EXPECT_EQ(device_bytes(a.view(*da, Side::kGpu)), device_bytes(b.view(*db, Side::kGpu)))
              << name << " " << field << ": adamw_multi vs adamw on the GPU";
        }
        if (a.spec.shape.numel() == 0) continue;
        expect_close(a.p, kRoundOnce, name + " param");
        expect_close(a.m, a.spec.bf16 ? kBf16Moments : kRoundOnce, name + " m");
        expect_close(a.v, a.spec.bf16 ? kBf16Moments : kRoundOnce, name + " v");
        if (!a.spec.copy) continue;
        const std::vector<double> got = a.copy.device_values(), param = a.p.device_values();
        int64_t bad = 0;
        for (int64_t j = 0; j < a.spec.shape.numel(); ++j) {
          const size_t k = static_cast<size_t>(a.spec.offset + j);
          bad += got[k] == bf16_to_f32(f32_to_bf16(static_cast<float>(param[k]))) ? 0 : 1;
        }
        EXPECT_EQ(bad, 0) << name << ": bf16 copy elements that are not bf16 of the GPU's param";
        EXPECT_TRUE(a.copy.guard_intact()) << name << " bf16 copy";
      }
      for (const Params* ps : {&multi, &single})  // the next step's gradients
        for (size_t i = 0; i < ps->size(); ++i) (*ps)[i]->g.normal(2400 + 10 * i + static_cast<uint64_t>(step));
    }
    // Not vacuous: the bf16 moments changed from their start.
    const Params fresh = make_params(2300);
    EXPECT_NE(multi[7]->m.device_values(), fresh[7]->m.host_values());
    EXPECT_NE(multi[7]->v.device_values(), fresh[7]->v.host_values());
  }
}

TEST(CudaOptim, AdamWBf16MomentErrorsNameTheField) {
  DIFFMOE_REQUIRE_CUDA();
  Dual p(Shape{6}), g(Shape{6}), m16(Shape{6}, DType::kBF16), v16(Shape{6}, DType::kBF16), v32(Shape{6}), gsq(Shape{1});
  expect_error(
      [&] {
        gpu().adamw({}, {.param = p[Side::kGpu],
                         .m = m16[Side::kGpu],
                         .v = v32[Side::kGpu],
                         .grad = g[Side::kGpu],
                         .grad_sq = gsq[Side::kGpu]});
      },
      {"[adamw]", "v", "f32", "bf16"});
  const AdamWEntry bad{.param = p[Side::kGpu], .m = v32[Side::kGpu], .v = v16[Side::kGpu], .grad = g[Side::kGpu]};
  expect_error([&] { gpu().adamw_multi({}, {.entries = {bad}, .grad_sq = gsq[Side::kGpu]}); },
               {"[adamw_multi]", "entries[0].v", "bf16"});
}

}  // namespace
}  // namespace diffmoe::cudatest
