// How this process was started (one process per GPU, or per CPU rank), read from the environment
// only: no MPI call is made here, so the result decides whether MPI is initialised at all
// (dist_context.h). Recognised launchers, first match wins:
//   torchrun   RANK, WORLD_SIZE, LOCAL_RANK, [LOCAL_WORLD_SIZE], MASTER_ADDR, MASTER_PORT
//              -> CPU collectives over Gloo, connected through a TCP store on MASTER_ADDR:MASTER_PORT
//   mpirun     OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK,
//              [OMPI_COMM_WORLD_LOCAL_SIZE]                         -> MPI (Open MPI's launcher)
//   srun       SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_TASKS_PER_NODE and the
//              node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST). With PMIx/PMI (srun
//              --mpi=pmix sets PMIX_RANK, --mpi=pmi2 PMI_RANK) -> MPI; without -> the TCP store on
//              MASTER_ADDR (default: the first host of the node list) : MASTER_PORT (default 29500)
//   PMI        PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS (MPICH Hydra, Intel MPI's
//              mpiexec) -> MPI; the MPI library linked must be the launcher's
//   otherwise  a single process: rank 0 of 1, no communication library
// A launcher's variables that are missing, not integers, or inconsistent (RANK >= WORLD_SIZE, a
// torchrun RANK that disagrees with mpirun's OMPI_COMM_WORLD_RANK, ...) throw Error naming the
// variable. local_rank picks the GPU (the caller sets the device); local_world is the number of
// ranks on this node.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::dist {

enum class LaunchKind : uint8_t { kSingle, kTorchrun, kOpenMpi, kSlurm, kPmi };
std::string_view launch_kind_name(LaunchKind k);  // "single", "torchrun", "mpirun", "srun", "pmi"

// How the CPU collectives connect: not at all (one process), MPI, or the TCP store + Gloo.
enum class Transport : uint8_t { kNone, kMpi, kStore };
std::string_view transport_name(Transport t);  // "none", "mpi", "store"

struct Launch {
  int rank = 0;
  int world = 1;
  int local_rank = 0;       // rank on this node: picks the GPU
  int local_world = 1;      // ranks on this node
  std::string master_addr;  // Transport::kStore only: the host serving the TCP store (rank 0's)
  int master_port = 0;
  LaunchKind kind = LaunchKind::kSingle;
  Transport transport = Transport::kNone;

  // "torchrun: rank 1 of 4 (local 1 of 4), store 127.0.0.1:29500"
  std::string describe() const;
};

// Reads one environment variable; nullopt when unset. The default reads the process environment.
using EnvReader = std::function<std::optional<std::string>(const std::string& name)>;
EnvReader process_env();

Launch detect_launch(const EnvReader& env = process_env());

// The collective timeout of the CPU and NCCL communicators: DIFFMOE_DIST_TIMEOUT_S (seconds, > 0,
// fractions allowed), default kDefaultTimeout. A bad value throws naming the variable.
inline constexpr std::chrono::milliseconds kDefaultTimeout{300'000};
std::chrono::milliseconds dist_timeout(const EnvReader& env = process_env());

// Slurm host lists (SLURM_JOB_NODELIST): comma-separated host expressions, each a name with
// bracketed numeric ranges "prefix[a-b,c]suffix" (several bracket groups allowed; zero padding is
// kept: "gpu[003-010,015],cpu1" -> gpu003 ... gpu010, gpu015, cpu1). `variable` names the source
// in errors. At most kMaxHosts hosts.
inline constexpr size_t kMaxHosts = 1'000'000;
std::vector<std::string> expand_slurm_hostlist(std::string_view list, std::string_view variable = "SLURM_JOB_NODELIST");
std::string slurm_first_host(std::string_view list, std::string_view variable = "SLURM_JOB_NODELIST");

// SLURM_TASKS_PER_NODE: "2(x3),1" -> {2, 2, 2, 1}.
std::vector<int> expand_slurm_tasks_per_node(std::string_view spec, std::string_view variable = "SLURM_TASKS_PER_NODE");

}  // namespace diffmoe::dist
