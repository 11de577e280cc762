// The op case table (docs/style.md habit 5, as ggml's test-backend-ops): one OpCase describes one
// instance of a Backend op — its tensors (shapes, roles, seeded non-zero init), the forward call, the
// backward call and the scalar loss whose gradient the backward computes, and a tolerance with its
// reason for every output. One table drives every mode:
//   - finite differences of the backward on the CPU in f64 (tests/ops/op_cases_test.cpp),
//   - CUDA vs CPU on the same random inputs with the case's tolerances (tests/ops/op_cases_cuda.cpp),
//   - determinism: two runs on one backend give the same bits, or the case says why not,
//   - the op benchmark (bench/op_cases_bench.cpp, bench_op_cases), which times every case.
// This library knows no test framework: the tests assert on what OpInstance reports, the benchmark
// times it. How to add an op: docs/adding-an-op.md.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace diffmoe::opcases {

// |got − want| ≤ atol + rtol·|want| per element (plus one bf16 step for bf16 tensors: each side rounds
// once); `why` is the reason for the numbers (the numerics policy of docs/style.md: none tuned by eye).
struct Tol {
  double rtol = 0.0, atol = 0.0;
  const char* why = "";
};
// The same arithmetic on both sides: bitwise-equal values (integer outputs, copies, gathers).
inline constexpr Tol kExact{0.0, 0.0, "same arithmetic on both sides"};

// What a step does to a tensor.
//   kInput:  filled from its init and only read.
//   kOutput: overwritten by its step: starts poisoned (NaN, or kIntPoison for integers), so a value the
//            op forgets to write cannot pass.
//   kUpdate: filled from its init, then read and written by its step (accumulated gradients, in-place
//            ops, strided outputs whose gaps must stay).
enum class Role : uint8_t { kInput, kOutput, kUpdate };
// The step that writes a kOutput/kUpdate tensor (outputs are compared after it).
enum class Step : uint8_t { kFwd, kBwd };
inline constexpr int32_t kIntPoison = -77777;

// Host values of a tensor, keyed by a seed (never all zeros).
struct Init {
  enum class Kind : uint8_t { kNormal, kInts, kValues, kComputed } kind = Kind::kNormal;
  double std = 1.0, mean = 0.0;                               // kNormal: mean + std·N(0,1)
  int32_t lo = 0, hi = 1;                                     // kInts: uniform in [lo, hi)
  std::vector<double> values = {};                            // kValues: as given (length numel)
  std::function<std::vector<double>(uint64_t seed)> fn = {};  // kComputed: index plans, distinct ids, ...
  // kNormal / kInts: > 0 repeats the first `period` values (benchmark-size tensors fill quickly).
  int64_t period = 0;
};
inline Init normal(double std = 1.0, double mean = 0.0) {
  return {.kind = Init::Kind::kNormal, .std = std, .mean = mean};
}
inline Init ints(int32_t lo, int32_t hi) { return {.kind = Init::Kind::kInts, .lo = lo, .hi = hi}; }
inline Init tiled(Init i, int64_t period = (int64_t{1} << 16) + 7) {  // a period no row width here divides
  i.period = period;
  return i;
}
inline Init values(std::vector<double> v) { return {.kind = Init::Kind::kValues, .values = std::move(v)}; }
inline Init computed(std::function<std::vector<double>(uint64_t)> fn) {
  return {.kind = Init::Kind::kComputed, .fn = std::move(fn)};
}

// One tensor of a case. dtype kF32 means "the case's float type": f32 on every backend, f64 in the
// finite-difference mode (op_args.h: one float type per call). offset > 0 allocates that many extra
// elements in front and passes the view after them: 4·offset bytes off the 16-byte alignment, the
// kernels' scalar paths.
struct TensorSpec {
  std::string name = {};
  Shape shape = {};
  DType dtype = DType::kF32;
  Role role = Role::kInput;
  Step step = Step::kFwd;  // for kOutput / kUpdate: the step that writes it
  Init init = {};
  int64_t offset = 0;
  bool bwd_only = false;  // an input only the backward reads (the upstream gradient): not forward bytes
};

class OpInstance;
// The tensors of an instance, by name, on its backend.
using Tensors = std::function<Tensor(const std::string&)>;
using OpCall = std::function<void(Backend&, const Tensors&)>;

struct OpCase {
  std::string op = {};      // "rmsnorm", "gemm", "attention", ... (the Backend op or fwd/bwd pair)
  std::string branch = {};  // the code path of the kernels it exercises: "vector: warp, 1 pack", "scalar tail"
  std::string shape = {};   // "333x70", "B2 T37 H4 d7/5"
  std::vector<TensorSpec> tensors = {};
  OpCall fwd = {};
  OpCall bwd = {};  // empty: no backward
  GemmPrecision precision = GemmPrecision::kF32;
  uint64_t seed = 1;

  // Tolerance of the CUDA-vs-CPU mode for every compared tensor; `tol_of` overrides it per name.
  Tol tol = kExact;
  std::map<std::string, Tol> tol_of = {};

  // Finite differences (f64, CPU): the gradient tensor of each differentiated input, and the scalar loss
  // whose gradient the backward writes. Default loss: Σ ⟨forward output, its upstream gradient⟩ over
  // `upstream` pairs {output, upstream gradient input}; `loss` replaces it (e.g. a mean over valid rows).
  std::vector<std::pair<std::string, std::string>> grads = {};
  std::vector<std::pair<std::string, std::string>> upstream = {};
  std::function<double(const OpInstance&)> loss = {};
  const char* no_fd = nullptr;  // why the finite-difference mode skips a case that has a backward

  // Why two runs on the CUDA backend may differ in the last bits (then they are compared within `tol`
  // instead of bitwise); nullptr = bitwise reproducible. The CPU backend is always bitwise.
  const char* cuda_nondeterministic = nullptr;

  // Benchmark-size cases (the bench preset's shapes) run only in bench_op_cases; the others in every mode.
  bool bench_only = false;
  double fwd_flops = 0.0, bwd_flops = 0.0;  // 0: memory-bound, report GB/s

  bool has_bwd() const { return static_cast<bool>(bwd); }
  bool fd_applies() const { return has_bwd() && no_fd == nullptr && !grads.empty() && !bench_only; }
  const Tol& tol_for(const std::string& name) const;
  const TensorSpec& spec(const std::string& name) const;                 // throws naming the case and tensor
  std::string label() const { return op + "/" + branch + "/" + shape; }  // "op/branch/shape"
  std::string test_name() const;                                         // the label as a gtest name: [A-Za-z0-9_] only
  // Bytes the step moves: every tensor it reads read once, every tensor it writes written once.
  double bytes(Step s) const;
};

// The table: every case, in a fixed order (op_cases.cpp assembles it from the per-family files).
const std::vector<OpCase>& op_cases();
// The families (op_cases_*.cpp).
std::vector<OpCase> norm_gemm_cases();
std::vector<OpCase> elementwise_cases();
std::vector<OpCase> attention_cases();
std::vector<OpCase> moe_cases();

// One case materialised on one backend: its tensors allocated from the backend's allocator, each
// followed by guard bytes; host values kept for re-initialisation (finite differences perturb them).
class OpInstance {
 public:
  static constexpr int64_t kGuardBytes = 64;
  static constexpr uint8_t kGuardByte = 0xA5;

  // float_type: kF32, or kF64 for finite differences (CPU only).
  OpInstance(const OpCase& c, Backend& be, DType float_type = DType::kF32);
  OpInstance(const OpInstance&) = delete;
  OpInstance& operator=(const OpInstance&) = delete;

  const OpCase& op_case() const { return c_; }
  Backend& backend() const { return be_; }
  Tensor tensor(const std::string& name) const;
  DType dtype_of(const std::string& name) const;

  // Uploads every tensor from the host values (outputs poisoned), the elements in front of offset
  // views and the guard bytes too.
  void init();
  void fwd();
  void bwd();
  void sync();

  // The host values init() uploads, made on first use (finite differences perturb them; benchmark-size
  // tensors never need them: init() streams their values to the backend in chunks).
  std::vector<double>& host(const std::string& name);
  // Current values on the backend, as doubles (exact for f32, f64, bf16, i32).
  std::vector<double> values(const std::string& name) const;
  void set_values(const std::string& name, const std::vector<double>& v);
  bool guard_intact(const std::string& name) const;
  // The names of the tensors written by step s.
  std::vector<std::string> written_by(Step s) const;

 private:
  size_t index(const std::string& name) const;
  Tensor full_view(size_t i) const;  // offset prefix + tensor + guard, as bytes of the tensor's dtype
  uint64_t seed_of(size_t i) const;

  const OpCase& c_;
  Backend& be_;
  DType float_type_;
  Arena arena_;
  std::vector<Tensor> views_;
  std::vector<std::vector<double>> host_;
  std::vector<bool> have_host_;
};

// The default finite-difference loss: Σ ⟨out, dout⟩ over the case's upstream pairs, or its own.
double case_loss(const OpInstance& inst);

// Values stored in `dtype` (f32, f64, bf16, i32, i64) and back: what a tensor of that type holds.
double representable(double v, DType dtype);

}  // namespace diffmoe::opcases
