// Cross-entropy over the vocabulary of the CPU reference backend.
//
// Each row's log-sum-exp is computed stably in double (max subtracted first). The forward sums the
// per-row losses serially in row order, so the total does not depend on the thread count. Targets
// are validated serially before any parallel loop (no exception may leave an OpenMP region).
// `valid` counts targets ≠ −1; it may be the logits' float type or i32. bf16 logits (f32 calls, the
// head's output in the bf16 GEMM mode) are widened exactly, a bf16 dlogits is the f32 gradient
// rounded once (bf16_staging.h).
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "backend/cpu/bf16_staging.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;
// Every target is −1 (ignored) or a vocabulary index; reports the first bad row and its value.
void check_targets(const Tensor& targets, int64_t vocab, std::string_view op) {
  const int32_t* tgt = targets.ptr<int32_t>();
  for (int64_t n = 0; n < targets.numel(); ++n)
    DIFFMOE_CHECK(tgt[n] == -1 || (tgt[n] >= 0 && tgt[n] < vocab),
                  "[{}] targets[{}] = {} is neither −1 (ignore) nor in [0, {})", op, n, tgt[n], vocab);
}

double read_valid(const Tensor& valid) {
  if (valid.dtype == DType::kI32) return valid.ptr<int32_t>()[0];
  if (valid.dtype == DType::kF64) return valid.ptr<double>()[0];
  return valid.ptr<float>()[0];
}

void add_valid(const Tensor& valid, int64_t count) {
  if (valid.dtype == DType::kI32) valid.ptr<int32_t>()[0] += static_cast<int32_t>(count);
  else if (valid.dtype == DType::kF64) valid.ptr<double>()[0] += static_cast<double>(count);
  else valid.ptr<float>()[0] += static_cast<float>(count);
}

template <class T>
double logsumexp(const T* row, int64_t vocab) {
  double mx = row[0];
  for (int64_t j = 1; j < vocab; ++j) mx = std::max(mx, static_cast<double>(row[j]));
  double sum = 0.0;
  for (int64_t j = 0; j < vocab; ++j) sum += std::exp(row[j] - mx);
  return mx + std::log(sum);
}

}  // namespace

// loss_sum[0] += Σ_valid (logsumexp(logits[n]) − logits[n, target[n]]);  valid[0] += #targets ≠ −1
void CpuBackend::cross_entropy_fwd(Context, const CrossEntropyFwdArgs& a) {
  constexpr std::string_view kOp = "cross_entropy_fwd";
  const auto [rows, vocab] = validate_cross_entropy_fwd(a, Device::kCPU);
  check_targets(a.targets, vocab, kOp);
  Bf16Staging staged(scratch_);
  const Tensor tl = staged.input(a.logits);
  dispatch_float(tl.dtype, kOp, [&]<class T>() {
    const T* logits = tl.ptr<T>();
    const int32_t* tgt = a.targets.ptr<int32_t>();
    std::vector<double> row_loss(static_cast<size_t>(rows), 0.0);
#pragma omp parallel for if (rows * vocab >= kParallelMinWork)
    for (int64_t n = 0; n < rows; ++n) {
      if (tgt[n] == -1) continue;
      const T* row = logits + n * vocab;
      row_loss[static_cast<size_t>(n)] = logsumexp(row, vocab) - row[tgt[n]];
    }
    double total = 0.0;
    int64_t count = 0;
    for (int64_t n = 0; n < rows; ++n) {
      total += row_loss[static_cast<size_t>(n)];
      count += tgt[n] != -1 ? 1 : 0;
    }
    T* loss_sum = a.loss_sum.ptr<T>();
    loss_sum[0] = static_cast<T>(loss_sum[0] + total);
    add_valid(a.valid, count);
  });
}

// dlogits = grad_scale · (softmax(logits) − onehot(target)) / valid[0]; ignored rows get 0.
void CpuBackend::cross_entropy_bwd(Context, const CrossEntropyBwdArgs& a) {
  constexpr std::string_view kOp = "cross_entropy_bwd";
  const auto [rows, vocab] = validate_cross_entropy_bwd(a, Device::kCPU);
  check_targets(a.targets, vocab, kOp);
  // With no valid target every row is ignored and the gradient is 0; never divide by 0.
  const double valid = read_valid(a.valid);
  const double coef = valid > 0.0 ? a.grad_scale / valid : 0.0;
  Bf16Staging staged(scratch_);
  const Tensor tl = staged.input(a.logits), tdl = staged.output(a.dlogits);
  dispatch_float(tl.dtype, kOp, [&]<class T>() {
    const T* logits = tl.ptr<T>();
    const int32_t* tgt = a.targets.ptr<int32_t>();
    T* dlogits = tdl.ptr<T>();
#pragma omp parallel for if (rows * vocab >= kParallelMinWork)
    for (int64_t n = 0; n < rows; ++n) {
      const T* row = logits + n * vocab;
      T* drow = dlogits + n * vocab;
      if (tgt[n] == -1) {
        for (int64_t j = 0; j < vocab; ++j) drow[j] = T(0);
        continue;
      }
      const double lse = logsumexp(row, vocab);
      for (int64_t j = 0; j < vocab; ++j) {
        const double p = std::exp(row[j] - lse);  // softmax
        drow[j] = static_cast<T>(coef * (p - (j == tgt[n] ? 1.0 : 0.0)));
      }
    }
  });
  staged.finish();
}

}  // namespace diffmoe
