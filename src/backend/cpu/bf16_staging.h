// bf16 tensors on the CPU reference backend (op_args.h says which fields may be bf16; docs/model.md §7).
// The CPU ops compute in f32 or f64 only, so a call's bf16 tensors pass through f32 buffers:
// - an input is widened exactly into a buffer (every bf16 value is an f32 value) and the op's f32
//   code reads the buffer;
// - an output is computed into a buffer and rounded once, to nearest even, into the tensor by
//   Bf16Staging::finish(). The buffer starts as the tensor's widened values, so elements the op
//   leaves alone (columns between strided rows, rows past a grouped GEMM's offsets) round-trip to
//   their own bits, and an in-place op (RoPE) reads what the tensor holds;
// - a GEMM operand in the bf16 GEMM mode is copied with every value rounded to bf16 (an f32 tensor)
//   or widened (a bf16 one): the values the products multiply.
// So every bf16 result is bitwise bf16(the op's f32 result on the widened inputs), the definition
// the CUDA backend is checked against. The buffers belong to the backend (CpuScratch): each grows to
// the largest call that used it and is then reused, so steady-state calls do not allocate.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace diffmoe {

// The backend's f32 buffers, handed out stack-wise: a Bf16Staging takes the next free ones and
// gives them back when it ends, so an op that calls another op while staged (grouped_gemm_wgrad's
// sum_squares) never shares a buffer.
class CpuScratch {
 public:
  // Buffer `slot` with room for at least n floats (grown, never shrunk).
  float* buffer(size_t slot, int64_t n);
  size_t in_use = 0;  // buffers taken by the live Bf16Staging objects

 private:
  std::vector<std::vector<float>> buffers_;
};

// The f32 stand-ins of one op call's bf16 tensors (file comment). Tensors that are not bf16 (and
// undefined ones) are returned as they are, with no copy.
class Bf16Staging {
 public:
  explicit Bf16Staging(CpuScratch& scratch) : scratch_(scratch), first_(scratch.in_use) {}
  ~Bf16Staging() { scratch_.in_use = first_; }
  Bf16Staging(const Bf16Staging&) = delete;
  Bf16Staging& operator=(const Bf16Staging&) = delete;

  // An input: a bf16 t widened into an f32 buffer of t's shape.
  Tensor input(const Tensor& t);
  // An output: a bf16 t as an f32 buffer of t's shape holding t's widened values; finish() rounds
  // the buffer into t.
  Tensor output(const Tensor& t);
  // A GEMM operand in the bf16 GEMM mode: an f32 buffer holding t's values rounded to bf16 (f32 t)
  // or widened (bf16 t). f64 tensors are returned as they are (the mode is for f32 calls).
  Tensor rounded(const Tensor& t);
  // Rounds every output buffer into its bf16 tensor, once. Call after the op's f32 code.
  void finish();

 private:
  Tensor take(const Tensor& like);  // the next buffer as an f32 tensor of like's shape
  CpuScratch& scratch_;
  size_t first_;
  std::vector<std::pair<Tensor, Tensor>> outputs_;  // (bf16 tensor, its f32 buffer)
};

// dst[i] = bf16(src[i]) for i < n (round to nearest even, core/dtype.h).
void round_to_bf16(uint16_t* dst, const float* src, int64_t n);

}  // namespace diffmoe
