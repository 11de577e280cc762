// The process's distributed state: the launch (launch.h), the transport of the CPU collectives and
// the world communicator on host memory. One per process, made first (before the model), kept to
// the end; NCCL communicators (nccl_communicator.h) and the process grid (process_grid.h) are built
// on it.
//
//   auto dist = DistContext::init(detect_launch());      // collective: every rank calls it
//   backend sets device launch.local_rank; comm = make_nccl_world(*dist, local_rank)  (CUDA)
//   ProcessGrid grid(*comm, ep);                          // dp and ep groups
//   try { ... train ... } catch (const std::exception& e) { dist->fail(e.what()); return 1; }
//
// Transports (launch.transport):
//   none   one process: the world is a SingleRankCommunicator (host memmoves)
//   mpi    MPI_Init_thread(SERIALIZED); the world is MPI_COMM_WORLD's duplicate
//   store  rank 0 serves the TCP store on MASTER_ADDR:MASTER_PORT (tcp_store.h), every rank
//          connects; the world is a Gloo full mesh set up through it. SIGPIPE is ignored from then
//          on (Gloo writes to sockets a dead peer may have closed: that must be an error, not a
//          silent death of this process).
//
// Failure behaviour (a rank that throws or dies stops every rank with a clear error, never a hang):
//   A rank that throws: its top-level catch calls fail(message), which prints ONE line
//     "error: rank R: <message>" on stderr (the caller prints nothing more), then
//       mpi:   MPI_Abort(MPI_COMM_WORLD, 1): mpirun/srun kill every rank (mpirun prints which rank
//              called MPI_Abort); fail() does not return.
//       store: closes every communicator's connections at once and returns; the caller exits 1.
//              Ranks blocked on this one fail immediately with "rank Q: <op> on <comm>: peer rank R
//              closed the connection" (printed by their own fail()); ranks not talking to it fail
//              at their next collective that involves it, or time out.
//   A rank that dies (killed, crashed): its sockets close.
//       mpi:   mpirun notices the dead process and kills the others (mpirun prints "... exited on
//              signal N"); under srun the others' MPI calls fail or time out (Work::wait).
//       store: peers waiting on it fail with "peer rank R closed the connection"; the failure
//              cascades through the ring (each failing rank closes its connections).
//   A rank that hangs (alive, not calling the collective): the others time out after
//     DIFFMOE_DIST_TIMEOUT_S (default 300 s): "rank Q: <op> on <comm>: timed out after T s ...".
//   NCCL: a watchdog thread per communicator (nccl_communicator.h) prints "error: rank R: <op> on
//     <comm> (nccl): ..." and ends the process when a collective errs or outlives the timeout.
//   If an exception leaves the scope of the DistContext without fail() (the context is destroyed
//   while unwinding), MPI is not finalised and the caller's exit status must be non-zero.
#pragma once
#include <chrono>
#include <memory>
#include <string_view>

#include "dist/communicator.h"
#include "dist/launch.h"
#include "dist/tcp_store.h"

namespace diffmoe::dist {

class GlooRuntime;
class MpiRuntime;

class DistContext {
 public:
  // Sets up the launch's transport and the world communicator. Collective. Throws Error (naming the
  // rank, the store or MPI) when the others cannot be reached within `timeout`.
  static std::unique_ptr<DistContext> init(const Launch& launch, std::chrono::milliseconds timeout = dist_timeout());
  ~DistContext();
  DistContext(const DistContext&) = delete;
  DistContext& operator=(const DistContext&) = delete;

  const Launch& launch() const { return launch_; }
  int rank() const { return launch_.rank; }
  int world_size() const { return launch_.world; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // The world on host memory (SingleRank, MPI or Gloo).
  Communicator& cpu_world() { return *world_; }
  // The rendezvous store (Transport::kStore), else null.
  TcpStore* store() { return store_.get(); }

  // The failure path (see above). `message` is printed as "error: rank R: message" (a message that
  // already starts with "rank R:" keeps it once). MPI: does not return.
  void fail(std::string_view message);

 private:
  DistContext(const Launch& launch, std::chrono::milliseconds timeout) : launch_(launch), timeout_(timeout) {}

  Launch launch_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<MpiRuntime> mpi_;
  std::shared_ptr<TcpStore> store_;
  std::shared_ptr<GlooRuntime> gloo_;
  std::unique_ptr<Communicator> world_;
};

// "rank R: message", unless message starts with "rank R:" already.
std::string rank_message(int rank, std::string_view message);

}  // namespace diffmoe::dist
