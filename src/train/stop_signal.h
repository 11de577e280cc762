// Stopping a run on request: SIGINT (Ctrl-C), SIGTERM (kill, a scheduler's end of job) and SIGUSR1
// (Slurm's warning before pre-emption: sbatch --signal=USR1@120). The first such signal only sets
// a flag; the trainer reads it between optimizer steps through stop_requested(), finishes the
// step, writes a checkpoint, says so and returns, and `diffmoe train` exits with kExitStopped.
// A second signal (any of the three) ends the process at once, by that signal's default action.
#pragma once
#include <csignal>

namespace diffmoe {

// The exit status of `diffmoe train` stopped by a signal after writing its checkpoint: EX_TEMPFAIL
// of sysexits.h ("try again later"), distinct from 0 (done) and 1 (an error). Resume with --resume.
inline constexpr int kExitStopped = 75;

// Installs the handlers for the object's lifetime (the previous actions come back after) and
// clears any earlier request. One at a time per process.
class StopSignalHandlers {
 public:
  StopSignalHandlers();
  ~StopSignalHandlers();
  StopSignalHandlers(const StopSignalHandlers&) = delete;
  StopSignalHandlers& operator=(const StopSignalHandlers&) = delete;

 private:
  struct sigaction previous_[3];
};

// Whether a stop was requested. The trainer's one hook: a run over several ranks must agree on it
// (every rank stops after the same step), which is the place for an all-reduce of this flag.
bool stop_requested();
// The signal that requested the stop (SIGINT, SIGTERM or SIGUSR1), 0 when none did.
int stop_signal();
// "SIGINT", "SIGTERM", "SIGUSR1" (or "a signal").
const char* stop_signal_name(int sig);

}  // namespace diffmoe
