#include "dist/dist_context.h"

#include <csignal>
#include <cstdio>
#include <exception>

#include "core/error.h"
#include "dist/gloo_communicator.h"
#include "dist/mpi_communicator.h"
#include "dist/single_rank_communicator.h"

namespace diffmoe::dist {

std::string rank_message(int rank, std::string_view message) {
  const std::string prefix = fmt::format("rank {}:", rank);
  if (message.substr(0, prefix.size()) == prefix) return std::string(message);
  return fmt::format("rank {}: {}", rank, message);
}

std::unique_ptr<DistContext> DistContext::init(const Launch& launch, std::chrono::milliseconds timeout) {
  DIFFMOE_CHECK(timeout.count() > 0, "[dist] the collective timeout must be positive");
  std::unique_ptr<DistContext> dc(new DistContext(launch, timeout));
  switch (launch.transport) {
    case Transport::kNone:
      DIFFMOE_CHECK(launch.world == 1, "[dist] {}: {} ranks but no transport", launch.describe(), launch.world);
      dc->world_ = std::make_unique<SingleRankCommunicator>("world");
      break;
    case Transport::kMpi:
      dc->mpi_ = mpi_init(launch, timeout);
      dc->world_ = make_mpi_world(dc->mpi_);
      break;
    case Transport::kStore: {
      std::signal(SIGPIPE, SIG_IGN);
      dc->store_ = std::make_shared<TcpStore>(TcpStoreOptions{.host = launch.master_addr,
                                                              .port = launch.master_port,
                                                              .serve = launch.rank == 0,
                                                              .timeout = timeout,
                                                              .rank = launch.rank});
      dc->gloo_ = make_gloo_runtime(launch, dc->store_, timeout);
      dc->world_ = make_gloo_world(dc->gloo_);
      break;
    }
  }
  return dc;
}

DistContext::~DistContext() {
  if (std::uncaught_exceptions() > 0 && mpi_) mpi_mark_failed(*mpi_);
  world_.reset();
}

void DistContext::fail(std::string_view message) {
  std::fprintf(stderr, "error: %s\n", rank_message(launch_.rank, message).c_str());
  std::fflush(stderr);
  if (mpi_) {
    mpi_mark_failed(*mpi_);
    mpi_abort(1);
  }
  if (gloo_) abort_gloo_communicators(*gloo_, fmt::format("rank {} failed", launch_.rank));
}

}  // namespace diffmoe::dist
