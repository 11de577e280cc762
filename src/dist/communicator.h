// A group of ranks and the collectives on it (data parallel ZeRO-1: all_reduce, reduce_scatter,
// all_gather; expert parallel: all_to_all_v; setup: broadcast, barrier, split). Implementations:
// single rank (single_rank_communicator.h), MPI and Gloo on host memory (made by dist_context.h),
// NCCL on CUDA memory (nccl_communicator.h, its own library).
//
// Tensors: `data`, `dtype`, `device`; the shape only gives the element count (views are dense:
// operations use numel() elements from data). dtypes f32, f64, bf16, i32, i64, u8; both tensors of
// an op have the same dtype and the communicator's device(). Counts and offsets are in elements.
//
// Threads: call a communicator from one thread at a time (MPI is initialised SERIALIZED; NCCL
// communicators are not thread-safe); Work::wait may be called from any thread.
// Order: every rank of the group issues the same collectives in the same order (as with MPI and
// NCCL); collectives on different communicators are independent of each other on the CPU (each has
// its own connections and worker), but on NCCL every rank must issue them in the same order too.
//
// Asynchrony: each collective returns a Work at once; the buffers must stay valid and unmodified
// (outputs unread) until the Work is waited for.
//   CUDA (NCCL): the collective runs on the communicator's own stream, ordered after the work
//     already queued on the caller's ctx.stream at the call (an event recorded there and waited
//     for); Work::wait(ctx) makes ctx.stream wait for its completion (no host sync). So a
//     reduce-scatter issued on the compute stream after a gradient is written overlaps the rest of
//     the backward, and wait(compute ctx) before the optimizer orders the two.
//   CPU (MPI, Gloo): the collective makes progress in the background (Gloo: the communicator's
//     worker thread, one op at a time in issue order; MPI: nonblocking collectives, progressed inside
//     MPI calls); wait(ctx) blocks the host until it completes and throws its error, if any.
//   Single rank: the copy is done at the call on ctx (backend copy; memmove for host tensors);
//     wait() does nothing (so on CUDA waiting on another stream than the call's is not ordered).
// Dropping a Work without waiting blocks (the host) until the collective completes; on CUDA it only
// releases the handle.
//
// Errors: bad arguments throw Error "[dist] <op> on <comm>: ..." at the call, before anything is
// sent. A failed or timed-out collective throws from wait() (CPU) as Error "rank R: <op> on <comm>:
// ...", e.g. "rank 0: all_reduce on world: peer rank 3 closed the connection"; after a failure the
// communicator is unusable (every later op fails). dist_context.h says how a failure stops the job.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "backend/backend.h"
#include "core/tensor.h"

namespace diffmoe::dist {

enum class ReduceOp : uint8_t { kSum, kMax };
std::string_view reduce_op_name(ReduceOp op);  // "sum", "max"

// The dtypes collectives take: f32, f64, bf16, i32, i64, u8 (not f8e4m3).
bool collective_dtype(DType t);

class Work {
 public:
  virtual ~Work() = default;
  // CUDA: ctx.stream waits for the collective (returns at once). CPU: the host waits; throws the
  // collective's error. May be called more than once (later calls return at once or throw again).
  virtual void wait(Context ctx) = 0;
};
using WorkPtr = std::unique_ptr<Work>;

// all_to_all_v: this rank sends in[send_offsets[p], +send_counts[p]) to rank p and receives rank
// p's block into out[recv_offsets[p], +recv_counts[p]), p over the group's ranks (the block to and
// from itself included: a local copy). recv_counts[p] here must equal send_counts[me] on rank p
// (the caller's contract, as with MPI and NCCL: it is not checked across ranks). Zero counts are
// allowed; received blocks must not overlap; in and out must not overlap. The spans need to live
// only during the call.
struct AllToAllVArgs {
  Tensor in;
  Tensor out;
  std::span<const int64_t> send_counts;   // [size()]
  std::span<const int64_t> send_offsets;  // [size()]
  std::span<const int64_t> recv_counts;   // [size()]
  std::span<const int64_t> recv_offsets;  // [size()]
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }  // in this group, 0 .. size()-1
  int size() const { return size_; }
  const std::string& name() const { return name_; }  // "world", "dp", "ep": in error messages
  virtual std::string_view kind() const = 0;         // "single", "mpi", "gloo", "nccl"
  virtual Device device() const = 0;                 // where the tensors live

  // out = op over ranks of in (n elements each). in == out (the same data) is in place.
  WorkPtr all_reduce(Context ctx, const Tensor& in, const Tensor& out, ReduceOp op = ReduceOp::kSum);
  // Sum over ranks of in (size()·n elements), of which this rank gets chunk rank(): out (n) =
  // Σ_r in_r[rank()·n, +n). in and out must not overlap.
  WorkPtr reduce_scatter(Context ctx, const Tensor& in, const Tensor& out);
  // out (size()·n) = the ranks' in (n each), rank r's at [r·n, +n). in may be exactly out's chunk
  // rank() (in place); no other overlap.
  WorkPtr all_gather(Context ctx, const Tensor& in, const Tensor& out);
  WorkPtr all_to_all_v(Context ctx, const AllToAllVArgs& a);
  // t (same count on every rank) = root's t.
  WorkPtr broadcast(Context ctx, const Tensor& t, int root);
  // Completes once every rank of the group has called it (CUDA: ctx.stream's wait is ordered after
  // every rank's call).
  WorkPtr barrier(Context ctx);
  // Collective over this communicator, blocking: the ranks that pass the same color (>= 0) form a
  // new communicator, ranked by (key, rank here). `name` is the new one's name in messages.
  std::unique_ptr<Communicator> split(int color, int key, const std::string& name);

 protected:
  Communicator(int rank, int size, std::string name);

  // Called after validation (counts consistent, dtypes supported, devices right).
  virtual WorkPtr do_all_reduce(Context ctx, const Tensor& in, const Tensor& out, ReduceOp op) = 0;
  virtual WorkPtr do_reduce_scatter(Context ctx, const Tensor& in, const Tensor& out) = 0;
  virtual WorkPtr do_all_gather(Context ctx, const Tensor& in, const Tensor& out) = 0;
  virtual WorkPtr do_all_to_all_v(Context ctx, const AllToAllVArgs& a) = 0;
  virtual WorkPtr do_broadcast(Context ctx, const Tensor& t, int root) = 0;
  virtual WorkPtr do_barrier(Context ctx) = 0;
  virtual std::unique_ptr<Communicator> do_split(int color, int key, const std::string& name) = 0;

 private:
  void check_tensor(std::string_view op, std::string_view field, const Tensor& t) const;

  int rank_;
  int size_;
  std::string name_;
};

// A Work whose collective is already complete (single rank, empty ops).
class DoneWork final : public Work {
 public:
  void wait(Context) override {}
};

}  // namespace diffmoe::dist
