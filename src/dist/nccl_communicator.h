// Collectives on CUDA memory over NCCL (library diffmoe_dist_nccl, CUDA builds only; this header has
// no CUDA or NCCL types). communicator.h gives the semantics; here:
//
// Streams: each NCCL communicator owns a non-blocking, high-priority CUDA stream. A collective
//   records an event on the caller's ctx.stream, makes its own stream wait for it, enqueues the
//   NCCL call there and records a completion event; Work::wait(ctx) makes ctx.stream wait for that
//   event. The host never blocks (except split and creation). Buffers are used by the
//   communicator's stream between the call and the completion event: keep them alive and do not
//   reuse them on another stream before a wait() on that stream.
// Creation: make_nccl_world is collective over the DistContext's CPU world: rank 0 makes the NCCL
//   unique id and sends it through the rendezvous store (torchrun-style launches) or an MPI
//   broadcast (mpirun/srun); every rank joins (ncclCommInitRankConfig) on `device`, which the call
//   makes current (launch.local_rank normally; the calling thread must keep it current for every
//   later call). split uses ncclCommSplit. Communicators are non-blocking NCCL communicators
//   (config.blocking = 0): creation, split and enqueueing are polled, so a missing peer gives an
//   error after the timeout instead of a hang.
// Watchdog (as PyTorch's NCCL watchdog): a thread per communicator polls every collective's
//   completion event and ncclCommGetAsyncError. When a collective is not complete `timeout` after
//   it was enqueued (a peer died, hangs or issued other collectives), or NCCL reports an
//   asynchronous error (a peer's connection broke), the watchdog calls ncclCommAbort (which ends
//   the stuck kernels) and, with exit_on_failure (the default), prints
//     "error: rank R: <op> on <comm> (nccl): <what happened>; aborting the NCCL communicator and
//      this process"
//   on stderr and ends the process with exit status 1: after an abort the kernels' outputs are
//   garbage, and a host blocked in a stream synchronisation would otherwise go on with them. The
//   abort itself can block behind the stalled stream, so the process ends at most 2 s after the
//   message whether or not it returned.
//   Without exit_on_failure the communicator is marked failed and every later call and wait()
//   throws that message as Error.
#pragma once
#include <chrono>
#include <memory>

#include "dist/communicator.h"
#include "dist/dist_context.h"

namespace diffmoe::dist {

struct NcclOptions {
  std::chrono::milliseconds timeout = dist_timeout();  // DIFFMOE_DIST_TIMEOUT_S, default 300 s
  bool exit_on_failure = true;                         // the watchdog ends the process on a failure
};

// The world communicator ("world") on CUDA `device`. Collective over dist.cpu_world().
std::unique_ptr<Communicator> make_nccl_world(DistContext& dist, int device, const NcclOptions& options = {});

}  // namespace diffmoe::dist
