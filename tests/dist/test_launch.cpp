// Launch detection (src/dist/launch.h) on fabricated environments: each launcher's variables, the
// precedence between launchers, malformed and inconsistent values (the error names the variable),
// Slurm host list and tasks-per-node expansion, the timeout variable.
#include <gtest/gtest.h>

#include <map>

#include "core/error.h"
#include "dist/launch.h"

namespace diffmoe::dist {
namespace {

using Env = std::map<std::string, std::string>;

EnvReader reader(const Env& env) {
  return [env](const std::string& name) -> std::optional<std::string> {
    const auto it = env.find(name);
    if (it == env.end()) return std::nullopt;
    return it->second;
  };
}

Launch detect(const Env& env) { return detect_launch(reader(env)); }

// The Error detect() throws; fails the test when there is none or it lacks `needle`.
void expect_error(const Env& env, const std::string& needle) {
  try {
    const Launch l = detect(env);
    ADD_FAILURE() << "no error for " << needle << "; got " << l.describe();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "error: " << e.what() << "\nexpected to contain: " << needle;
  }
}

const Env kTorchrun = {{"RANK", "3"},
                       {"WORLD_SIZE", "8"},
                       {"LOCAL_RANK", "1"},
                       {"LOCAL_WORLD_SIZE", "2"},
                       {"MASTER_ADDR", "node7"},
                       {"MASTER_PORT", "29411"}};

Env with(Env e, const std::string& k, const std::string& v) {
  e[k] = v;
  return e;
}
Env without(Env e, const std::string& k) {
  e.erase(k);
  return e;
}

TEST(Launch, SingleProcessWhenNothingIsSet) {
  const Launch l = detect({{"PATH", "/bin"}});
  EXPECT_EQ(l.kind, LaunchKind::kSingle);
  EXPECT_EQ(l.transport, Transport::kNone);
  EXPECT_EQ(l.rank, 0);
  EXPECT_EQ(l.world, 1);
  EXPECT_EQ(l.local_rank, 0);
  EXPECT_EQ(l.local_world, 1);
}

TEST(Launch, Torchrun) {
  const Launch l = detect(kTorchrun);
  EXPECT_EQ(l.kind, LaunchKind::kTorchrun);
  EXPECT_EQ(l.transport, Transport::kStore);
  EXPECT_EQ(l.rank, 3);
  EXPECT_EQ(l.world, 8);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.local_world, 2);
  EXPECT_EQ(l.master_addr, "node7");
  EXPECT_EQ(l.master_port, 29411);
  EXPECT_EQ(l.describe(), "torchrun: rank 3 of 8 (local 1 of 2), store node7:29411");
  // LOCAL_WORLD_SIZE is optional (older launchers): the whole world is taken as local.
  EXPECT_EQ(detect(without(kTorchrun, "LOCAL_WORLD_SIZE")).local_world, 8);
  // One process needs no store.
  const Launch one = detect({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCAL_RANK", "0"}});
  EXPECT_EQ(one.transport, Transport::kNone);
}

TEST(Launch, TorchrunBadValuesNameTheVariable) {
  expect_error(without(kTorchrun, "WORLD_SIZE"), "WORLD_SIZE is not set");
  expect_error(without(kTorchrun, "RANK"), "RANK is not set");
  expect_error(without(kTorchrun, "LOCAL_RANK"), "LOCAL_RANK is not set");
  expect_error(without(kTorchrun, "MASTER_ADDR"), "MASTER_ADDR is not set");
  expect_error(without(kTorchrun, "MASTER_PORT"), "MASTER_PORT is not set");
  expect_error(with(kTorchrun, "RANK", "three"), "RANK='three' is not an integer");
  expect_error(with(kTorchrun, "RANK", "3x"), "RANK='3x' is not an integer");
  expect_error(with(kTorchrun, "RANK", ""), "RANK='' is not an integer");
  expect_error(with(kTorchrun, "RANK", "-1"), "RANK=-1 is out of range");
  expect_error(with(kTorchrun, "RANK", "8"), "RANK=8 must be less than WORLD_SIZE=8");
  expect_error(with(kTorchrun, "WORLD_SIZE", "0"), "WORLD_SIZE=0 is out of range");
  expect_error(with(kTorchrun, "LOCAL_RANK", "2"), "LOCAL_RANK=2 must be less than LOCAL_WORLD_SIZE=2");
  expect_error(with(kTorchrun, "LOCAL_WORLD_SIZE", "9"), "LOCAL_WORLD_SIZE=9 exceeds WORLD_SIZE=8");
  expect_error(with(with(kTorchrun, "RANK", "0"), "LOCAL_RANK", "1"), "LOCAL_RANK=1 exceeds RANK=0");
  expect_error(with(kTorchrun, "MASTER_PORT", "70000"), "MASTER_PORT=70000 is out of range");
  expect_error(with(kTorchrun, "MASTER_PORT", "http"), "MASTER_PORT='http' is not an integer");
  expect_error(with(kTorchrun, "MASTER_ADDR", ""), "MASTER_ADDR is empty");
}

TEST(Launch, TorchrunVariablesMustAgreeWithAnotherLauncher) {
  // RANK left in the environment of an mpirun job would give two processes the same rank.
  expect_error(with(kTorchrun, "OMPI_COMM_WORLD_RANK", "5"), "RANK=3 disagrees with OMPI_COMM_WORLD_RANK=5");
  expect_error(with(kTorchrun, "SLURM_PROCID", "0"), "RANK=3 disagrees with SLURM_PROCID=0");
  // Agreeing ones are fine (torchrun inside srun with one task per rank).
  EXPECT_EQ(detect(with(kTorchrun, "SLURM_PROCID", "3")).kind, LaunchKind::kTorchrun);
}

const Env kOmpi = {{"OMPI_COMM_WORLD_RANK", "2"},
                   {"OMPI_COMM_WORLD_SIZE", "4"},
                   {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                   {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}};

TEST(Launch, OpenMpi) {
  const Launch l = detect(kOmpi);
  EXPECT_EQ(l.kind, LaunchKind::kOpenMpi);
  EXPECT_EQ(l.transport, Transport::kMpi);
  EXPECT_EQ(l.rank, 2);
  EXPECT_EQ(l.world, 4);
  EXPECT_EQ(l.local_rank, 0);
  EXPECT_EQ(l.local_world, 2);
  EXPECT_EQ(l.describe(), "mpirun: rank 2 of 4 (local 0 of 2), MPI");
  expect_error(without(kOmpi, "OMPI_COMM_WORLD_LOCAL_RANK"), "OMPI_COMM_WORLD_LOCAL_RANK is not set");
  expect_error(without(kOmpi, "OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE is not set");
  expect_error(with(kOmpi, "OMPI_COMM_WORLD_RANK", "4"),
               "OMPI_COMM_WORLD_RANK=4 must be less than OMPI_COMM_WORLD_SIZE=4");
  // Slurm variables around an mpirun (mpirun inside an allocation) do not change the launcher.
  EXPECT_EQ(detect(with(with(kOmpi, "SLURM_PROCID", "0"), "SLURM_NTASKS", "1")).kind, LaunchKind::kOpenMpi);
}

const Env kSlurm = {{"SLURM_PROCID", "5"},
                    {"SLURM_NTASKS", "6"},
                    {"SLURM_LOCALID", "1"},
                    {"SLURM_NODEID", "2"},
                    {"SLURM_TASKS_PER_NODE", "2(x3)"},
                    {"SLURM_JOB_NODELIST", "gpu[003-010,015],cpu1"}};

TEST(Launch, SlurmWithoutMpiUsesTheStoreOnTheFirstNode) {
  const Launch l = detect(kSlurm);
  EXPECT_EQ(l.kind, LaunchKind::kSlurm);
  EXPECT_EQ(l.transport, Transport::kStore);
  EXPECT_EQ(l.rank, 5);
  EXPECT_EQ(l.world, 6);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.local_world, 2);
  EXPECT_EQ(l.master_addr, "gpu003");
  EXPECT_EQ(l.master_port, 29500);
  // MASTER_ADDR/PORT override; the step's node list is preferred over the job's.
  const Launch o = detect(with(with(kSlurm, "MASTER_ADDR", "10.0.0.9"), "MASTER_PORT", "1234"));
  EXPECT_EQ(o.master_addr, "10.0.0.9");
  EXPECT_EQ(o.master_port, 1234);
  EXPECT_EQ(detect(with(kSlurm, "SLURM_STEP_NODELIST", "gpu[010-011]")).master_addr, "gpu010");
}

TEST(Launch, SlurmWithPmiUsesMpi) {
  const Launch l = detect(with(kSlurm, "PMIX_RANK", "5"));
  EXPECT_EQ(l.transport, Transport::kMpi);
  EXPECT_EQ(l.master_addr, "");
  EXPECT_EQ(detect(with(kSlurm, "PMI_RANK", "5")).transport, Transport::kMpi);
  expect_error(with(kSlurm, "PMIX_RANK", "4"), "SLURM_PROCID=5 disagrees with PMIX_RANK=4");
}

TEST(Launch, SlurmBadValuesNameTheVariable) {
  expect_error(without(kSlurm, "SLURM_NTASKS"), "SLURM_NTASKS is not set");
  expect_error(without(kSlurm, "SLURM_LOCALID"), "SLURM_LOCALID is not set");
  expect_error(without(kSlurm, "SLURM_TASKS_PER_NODE"), "SLURM_TASKS_PER_NODE is not set");
  expect_error(with(kSlurm, "SLURM_NODEID", "3"), "SLURM_NODEID=3 but SLURM_TASKS_PER_NODE lists 3 nodes");
  expect_error(with(kSlurm, "SLURM_TASKS_PER_NODE", "2(x)"), "SLURM_TASKS_PER_NODE='2(x)': bad repeat");
  expect_error(with(kSlurm, "SLURM_JOB_NODELIST", "gpu[003-010"), "SLURM_JOB_NODELIST='gpu[003-010': unbalanced '['");
  expect_error(without(kSlurm, "SLURM_JOB_NODELIST"), "neither MASTER_ADDR nor SLURM_JOB_NODELIST");
  expect_error(with(kSlurm, "SLURM_PROCID", "6"), "SLURM_PROCID=6 must be less than SLURM_NTASKS=6");
}

TEST(Launch, Pmi) {
  const Env pmi = {{"PMI_RANK", "1"}, {"PMI_SIZE", "3"}, {"MPI_LOCALRANKID", "1"}, {"MPI_LOCALNRANKS", "3"}};
  const Launch l = detect(pmi);
  EXPECT_EQ(l.kind, LaunchKind::kPmi);
  EXPECT_EQ(l.transport, Transport::kMpi);
  EXPECT_EQ(l.rank, 1);
  EXPECT_EQ(l.world, 3);
  expect_error(without(pmi, "MPI_LOCALRANKID"), "MPI_LOCALRANKID is not set");
}

TEST(Launch, SlurmHostlistExpansion) {
  EXPECT_EQ(expand_slurm_hostlist("gpu[003-005,015],cpu1"),
            (std::vector<std::string>{"gpu003", "gpu004", "gpu005", "gpu015", "cpu1"}));
  EXPECT_EQ(slurm_first_host("gpu[003-010,015],cpu1"), "gpu003");
  EXPECT_EQ(slurm_first_host("node1"), "node1");
  EXPECT_EQ(slurm_first_host("a-b.c,d"), "a-b.c");
  EXPECT_EQ(expand_slurm_hostlist("n[8-11]"), (std::vector<std::string>{"n8", "n9", "n10", "n11"}));
  EXPECT_EQ(expand_slurm_hostlist("n[098-101]"), (std::vector<std::string>{"n098", "n099", "n100", "n101"}));
  EXPECT_EQ(expand_slurm_hostlist("rack[1-2]-n[01-02]"),
            (std::vector<std::string>{"rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"}));
  EXPECT_EQ(expand_slurm_hostlist("x[7]y,z[1,3]"), (std::vector<std::string>{"x7y", "z1", "z3"}));
  for (const char* bad :
       {"", "gpu[", "gpu]", "gpu[]", "gpu[a-b]", "gpu[5-3]", "gpu[1-2", "a,,b", "[1-2]", "gp u1", "g[1[2]]", "a,"}) {
    EXPECT_THROW(expand_slurm_hostlist(bad), Error) << "'" << bad << "'";
  }
  try {
    expand_slurm_hostlist("gpu[5-3]", "SLURM_STEP_NODELIST");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SLURM_STEP_NODELIST='gpu[5-3]': range '5-3' runs backwards"),
              std::string::npos)
        << e.what();
  }
}

TEST(Launch, SlurmTasksPerNode) {
  EXPECT_EQ(expand_slurm_tasks_per_node("2(x3),1"), (std::vector<int>{2, 2, 2, 1}));
  EXPECT_EQ(expand_slurm_tasks_per_node("4"), (std::vector<int>{4}));
  EXPECT_EQ(expand_slurm_tasks_per_node("1,3(x2)"), (std::vector<int>{1, 3, 3}));
  for (const char* bad : {"", "x", "2(x0)", "2(3)", "2(x3", "0", ","})
    EXPECT_THROW(expand_slurm_tasks_per_node(bad), Error) << bad;
}

TEST(Launch, Timeout) {
  EXPECT_EQ(dist_timeout(reader({})), kDefaultTimeout);
  EXPECT_EQ(dist_timeout(reader({{"DIFFMOE_DIST_TIMEOUT_S", "2"}})), std::chrono::milliseconds(2000));
  EXPECT_EQ(dist_timeout(reader({{"DIFFMOE_DIST_TIMEOUT_S", "0.25"}})), std::chrono::milliseconds(250));
  for (const char* bad : {"0", "-3", "abc", "", "1e99", "nan", "5s"}) {
    try {
      dist_timeout(reader({{"DIFFMOE_DIST_TIMEOUT_S", bad}}));
      ADD_FAILURE() << "no error for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("DIFFMOE_DIST_TIMEOUT_S"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace diffmoe::dist
