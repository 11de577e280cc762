#include "dist/communicator.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "dist/comm_util.h"

namespace diffmoe::dist {
namespace {

template <class T>
void reduce_typed(T* acc, const T* in, int64_t n, ReduceOp op) {
  if (op == ReduceOp::kMax) {
    for (int64_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], in[i]);
    return;
  }
  if constexpr (std::is_integral_v<T>) {  // two's complement wrap-around, without signed overflow
    using U = std::make_unsigned_t<T>;
    for (int64_t i = 0; i < n; ++i)
      acc[i] = static_cast<T>(static_cast<U>(static_cast<U>(acc[i]) + static_cast<U>(in[i])));
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += in[i];
  }
}

}  // namespace

std::string_view reduce_op_name(ReduceOp op) { return op == ReduceOp::kSum ? "sum" : "max"; }

bool collective_dtype(DType t) {
  return t == DType::kF32 || t == DType::kF64 || t == DType::kBF16 || t == DType::kI32 || t == DType::kI64 ||
         t == DType::kU8;
}

void host_reduce(void* acc, const void* in, int64_t n, DType dtype, ReduceOp op) {
  switch (dtype) {
    case DType::kF32: return reduce_typed(static_cast<float*>(acc), static_cast<const float*>(in), n, op);
    case DType::kF64: return reduce_typed(static_cast<double*>(acc), static_cast<const double*>(in), n, op);
    case DType::kI32: return reduce_typed(static_cast<int32_t*>(acc), static_cast<const int32_t*>(in), n, op);
    case DType::kI64: return reduce_typed(static_cast<int64_t*>(acc), static_cast<const int64_t*>(in), n, op);
    case DType::kU8: return reduce_typed(static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(in), n, op);
    case DType::kBF16: {
      auto* a = static_cast<uint16_t*>(acc);
      const auto* b = static_cast<const uint16_t*>(in);
      for (int64_t i = 0; i < n; ++i) {
        const float x = bf16_to_f32(a[i]);
        const float y = bf16_to_f32(b[i]);
        a[i] = f32_to_bf16(op == ReduceOp::kSum ? x + y : std::max(x, y));
      }
      return;
    }
    case DType::kF8E4M3: break;
  }
  DIFFMOE_FAIL("[dist] reduction over dtype {} is not supported", dtype_name(dtype));
}

std::string seconds_text(std::chrono::milliseconds t) {
  return fmt::format("{:g} s", static_cast<double>(t.count()) / 1000.0);
}

Communicator::Communicator(int rank, int size, std::string name) : rank_(rank), size_(size), name_(std::move(name)) {
  DIFFMOE_CHECK(size >= 1 && rank >= 0 && rank < size, "[dist] communicator '{}': rank {} of {} is invalid", name_,
                rank, size);
}

void Communicator::check_tensor(std::string_view op, std::string_view field, const Tensor& t) const {
  DIFFMOE_CHECK(collective_dtype(t.dtype), "[dist] {} on {}: {} has dtype {} (f32, f64, bf16, i32, i64 or u8 expected)",
                op, name_, field, dtype_name(t.dtype));
  DIFFMOE_CHECK(t.device == device(), "[dist] {} on {}: {} is {}, but this {} communicator takes {} tensors", op, name_,
                field, t.describe(), kind(), device_name(device()));
  DIFFMOE_CHECK(t.data != nullptr || t.numel() == 0, "[dist] {} on {}: {} {} has no data", op, name_, field,
                t.describe());
}

WorkPtr Communicator::all_reduce(Context ctx, const Tensor& in, const Tensor& out, ReduceOp op) {
  check_tensor("all_reduce", "in", in);
  check_tensor("all_reduce", "out", out);
  DIFFMOE_CHECK(in.dtype == out.dtype && in.numel() == out.numel(),
                "[dist] all_reduce on {}: in {} and out {} differ in dtype or count", name_, in.describe(),
                out.describe());
  DIFFMOE_CHECK(in.data == out.data || !overlaps(in, out),
                "[dist] all_reduce on {}: in and out overlap without being the same", name_);
  return do_all_reduce(ctx, in, out, op);
}

WorkPtr Communicator::reduce_scatter(Context ctx, const Tensor& in, const Tensor& out) {
  check_tensor("reduce_scatter", "in", in);
  check_tensor("reduce_scatter", "out", out);
  DIFFMOE_CHECK(in.dtype == out.dtype && in.numel() == out.numel() * size_,
                "[dist] reduce_scatter on {}: in {} must have {} (ranks) x the count of out {}, in the same dtype",
                name_, in.describe(), size_, out.describe());
  DIFFMOE_CHECK(!overlaps(in, out), "[dist] reduce_scatter on {}: in and out overlap", name_);
  return do_reduce_scatter(ctx, in, out);
}

WorkPtr Communicator::all_gather(Context ctx, const Tensor& in, const Tensor& out) {
  check_tensor("all_gather", "in", in);
  check_tensor("all_gather", "out", out);
  DIFFMOE_CHECK(in.dtype == out.dtype && out.numel() == in.numel() * size_,
                "[dist] all_gather on {}: out {} must have {} (ranks) x the count of in {}, in the same dtype", name_,
                out.describe(), size_, in.describe());
  const bool in_place = in.data == byte_ptr(out, static_cast<int64_t>(rank_) * in.numel());
  DIFFMOE_CHECK(in_place || !overlaps(in, out),
                "[dist] all_gather on {}: in overlaps out without being its chunk {} (in place)", name_, rank_);
  return do_all_gather(ctx, in, out);
}

WorkPtr Communicator::all_to_all_v(Context ctx, const AllToAllVArgs& a) {
  check_tensor("all_to_all_v", "in", a.in);
  check_tensor("all_to_all_v", "out", a.out);
  DIFFMOE_CHECK(a.in.dtype == a.out.dtype, "[dist] all_to_all_v on {}: in {} and out {} differ in dtype", name_,
                a.in.describe(), a.out.describe());
  DIFFMOE_CHECK(!overlaps(a.in, a.out), "[dist] all_to_all_v on {}: in and out overlap", name_);
  const auto n = static_cast<size_t>(size_);
  DIFFMOE_CHECK(a.send_counts.size() == n && a.send_offsets.size() == n && a.recv_counts.size() == n &&
                    a.recv_offsets.size() == n,
                "[dist] all_to_all_v on {}: counts and offsets need {} entries each (got send {}/{}, recv {}/{})",
                name_, n, a.send_counts.size(), a.send_offsets.size(), a.recv_counts.size(), a.recv_offsets.size());
  std::vector<std::pair<int64_t, int64_t>> recv_ranges;
  for (size_t p = 0; p < n; ++p) {
    const int64_t sc = a.send_counts[p], so = a.send_offsets[p], rc = a.recv_counts[p], ro = a.recv_offsets[p];
    DIFFMOE_CHECK(sc >= 0 && so >= 0 && so <= a.in.numel() && sc <= a.in.numel() - so,
                  "[dist] all_to_all_v on {}: send block for rank {} [{}, +{}) is outside in ({} elements)", name_, p,
                  so, sc, a.in.numel());
    DIFFMOE_CHECK(rc >= 0 && ro >= 0 && ro <= a.out.numel() && rc <= a.out.numel() - ro,
                  "[dist] all_to_all_v on {}: receive block from rank {} [{}, +{}) is outside out ({} elements)", name_,
                  p, ro, rc, a.out.numel());
    if (rc > 0) recv_ranges.emplace_back(ro, ro + rc);
  }
  std::sort(recv_ranges.begin(), recv_ranges.end());
  for (size_t i = 1; i < recv_ranges.size(); ++i)
    DIFFMOE_CHECK(recv_ranges[i].first >= recv_ranges[i - 1].second,
                  "[dist] all_to_all_v on {}: receive blocks [{}, {}) and [{}, {}) overlap", name_,
                  recv_ranges[i - 1].first, recv_ranges[i - 1].second, recv_ranges[i].first, recv_ranges[i].second);
  DIFFMOE_CHECK(a.send_counts[static_cast<size_t>(rank_)] == a.recv_counts[static_cast<size_t>(rank_)],
                "[dist] all_to_all_v on {}: the block to itself has {} elements sent but {} received", name_,
                a.send_counts[static_cast<size_t>(rank_)], a.recv_counts[static_cast<size_t>(rank_)]);
  return do_all_to_all_v(ctx, a);
}

WorkPtr Communicator::broadcast(Context ctx, const Tensor& t, int root) {
  check_tensor("broadcast", "t", t);
  DIFFMOE_CHECK(root >= 0 && root < size_, "[dist] broadcast on {}: root {} is not a rank of {}", name_, root, size_);
  return do_broadcast(ctx, t, root);
}

WorkPtr Communicator::barrier(Context ctx) { return do_barrier(ctx); }

std::unique_ptr<Communicator> Communicator::split(int color, int key, const std::string& name) {
  DIFFMOE_CHECK(color >= 0, "[dist] split of {} into '{}': color {} must be >= 0", name_, name, color);
  DIFFMOE_CHECK(!name.empty(), "[dist] split of {}: the new communicator needs a name", name_);
  return do_split(color, key, name);
}

}  // namespace diffmoe::dist
