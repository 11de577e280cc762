// CPU collectives over MPI, for mpirun / srun-with-PMI / PMI launches (launch.h, Transport::kMpi).
// Made by dist_context.cpp; the header has no MPI types.
//
// MPI is initialised with MPI_Init_thread(MPI_THREAD_SERIALIZED): MPI is called from one thread at
// a time (the caller's; no thread of this library calls MPI). Communicators are duplicates/splits
// of MPI_COMM_WORLD with MPI_ERRORS_RETURN, so every MPI error becomes an Error naming the call.
// Collectives are MPI's nonblocking ones (MPI_Iallreduce, MPI_Ireduce_scatter_block,
// MPI_Iallgather, MPI_Ialltoallv, MPI_Ibcast, MPI_Ibarrier); bf16 reduces through user-defined
// ops (host_reduce). Work::wait polls MPI_Test until done or until the timeout
// (DIFFMOE_DIST_TIMEOUT_S) since the wait began: then Error "rank R: <op> on <comm>: timed out
// after T s (a peer rank did not reach it)". Counts and offsets must fit MPI's int.
// MPI_Finalize runs when the runtime and every communicator are gone, unless the runtime was
// marked failed (an exception is unwinding through the context): a process that skips it exits
// non-zero and mpirun ends the job.
#pragma once
#include <chrono>
#include <memory>

#include "dist/communicator.h"
#include "dist/launch.h"

namespace diffmoe::dist {

class MpiRuntime;

// MPI_Init_thread (unless MPI is initialised already), then checks that MPI's rank and size are
// the launch's (else the MPI library linked is not the launcher's).
std::shared_ptr<MpiRuntime> mpi_init(const Launch& launch, std::chrono::milliseconds timeout);
std::unique_ptr<Communicator> make_mpi_world(const std::shared_ptr<MpiRuntime>& rt);
// MPI_Finalize will be skipped (the failure path without MPI_Abort).
void mpi_mark_failed(MpiRuntime& rt);
// MPI_Abort(MPI_COMM_WORLD, code): the launcher ends every rank.
[[noreturn]] void mpi_abort(int code);

}  // namespace diffmoe::dist
