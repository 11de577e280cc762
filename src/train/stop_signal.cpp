#include "train/stop_signal.h"

#include <unistd.h>

#include <atomic>
#include <cstring>

#include "core/error.h"

namespace diffmoe {

namespace {

constexpr int kSignals[3] = {SIGINT, SIGTERM, SIGUSR1};

// Written only by the handler (and cleared at install). A lock-free atomic: the signals may reach
// two threads at once (OpenMP workers, the data loader's), and exactly one of them must be first.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the stop flag must be async-signal-safe");

// Async-signal-safe: a flag, write(2), and for the second signal the default action re-raised.
extern "C" void on_stop_signal(int sig) {
  int none = 0;
  if (!g_stop_signal.compare_exchange_strong(none, sig)) {
    static const char kNow[] = "warning: second stop signal: exiting now, without a checkpoint\n";
    [[maybe_unused]] const ssize_t w = ::write(STDERR_FILENO, kNow, sizeof kNow - 1);
    ::signal(sig, SIG_DFL);
    ::raise(sig);
    return;
  }
  static const char kFirst[] =
      "warning: stop requested: finishing this step, then writing a checkpoint (a second signal exits at once)\n";
  [[maybe_unused]] const ssize_t w = ::write(STDERR_FILENO, kFirst, sizeof kFirst - 1);
}

}  // namespace

StopSignalHandlers::StopSignalHandlers() {
  g_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  for (int s : kSignals) sigaddset(&sa.sa_mask, s);  // one handler at a time per thread
  sa.sa_flags = SA_RESTART;                          // interrupted reads and writes resume: the step and the save go on
  for (int i = 0; i < 3; ++i)
    DIFFMOE_CHECK(::sigaction(kSignals[i], &sa, &previous_[i]) == 0, "[signals] cannot install the {} handler ({})",
                  stop_signal_name(kSignals[i]), std::strerror(errno));
}

StopSignalHandlers::~StopSignalHandlers() {
  for (int i = 0; i < 3; ++i) ::sigaction(kSignals[i], &previous_[i], nullptr);
}

bool stop_requested() { return g_stop_signal.load() != 0; }

int stop_signal() { return g_stop_signal.load(); }

const char* stop_signal_name(int sig) {
  switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    default: return "a signal";
  }
}

}  // namespace diffmoe
