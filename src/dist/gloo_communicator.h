// CPU collectives over Gloo's TCP transport, for torchrun-style launches (launch.h,
// Transport::kStore). Made by dist_context.cpp; the header has no Gloo types.
//
// Connections: every communicator is a full mesh of TCP pairs, set up through the rendezvous store
// (tcp_store.h; gloo::rendezvous::connectFullMesh under a key prefix per communicator). A split
// exchanges (color, key) over the parent, then each new group meets in the store under its own
// prefix.
// Algorithms (on Gloo's point-to-point unbound buffers, so that every wait knows its peer):
//   all_reduce      ring reduce-scatter then ring all-gather over size() balanced chunks (each
//                   chunk is reduced on one rank and copied to the others: every rank ends with
//                   the same bits)
//   reduce_scatter  ring; rank r's chunk finishes on rank r
//   all_gather      ring
//   all_to_all_v    every receive and send posted at once, then waited for
//   broadcast       the root sends to every rank
//   barrier         dissemination (log2 size rounds of one byte)
// Asynchrony: one worker thread per communicator runs its collectives in issue order; Work::wait
// blocks until the worker finished that one.
// Failures: each wait on a peer has the timeout (DIFFMOE_DIST_TIMEOUT_S); a broken connection or a
// timeout ends the collective with Error "rank R: <op> on <comm>: peer rank P closed the
// connection" or "...: timed out after T s waiting for peer rank P" (P a world rank), closes all of
// this communicator's connections (so that its peers fail at once rather than after their
// timeout), and fails every later collective on it.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "dist/launch.h"
#include "dist/tcp_store.h"

namespace diffmoe::dist {

class GlooRuntime;  // the transport device, the store, the timeout, the live communicators

// Creates the transport device: its address is GLOO_SOCKET_IFNAME's interface when set, else
// DIFFMOE_GLOO_HOSTNAME, else 127.0.0.1 when MASTER_ADDR is a loopback address (one machine), else
// this host's name as it resolves.
std::shared_ptr<GlooRuntime> make_gloo_runtime(const Launch& launch, std::shared_ptr<TcpStore> store,
                                               std::chrono::milliseconds timeout);
// The world communicator ("world"): collective over every rank.
std::unique_ptr<Communicator> make_gloo_world(const std::shared_ptr<GlooRuntime>& rt);
// Fails every live communicator with `why` and closes their connections (the failure path).
void abort_gloo_communicators(GlooRuntime& rt, const std::string& why);

}  // namespace diffmoe::dist
