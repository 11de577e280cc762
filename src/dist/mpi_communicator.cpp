#include "dist/mpi_communicator.h"

#include <mpi.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/comm_util.h"

namespace diffmoe::dist {

class MpiRuntime {
 public:
  MpiRuntime(int world_rank, std::chrono::milliseconds timeout, bool owns)
      : world_rank_(world_rank), timeout_(timeout), owns_(owns) {}
  ~MpiRuntime();
  int world_rank() const { return world_rank_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  MPI_Op bf16_op(ReduceOp op) const { return op == ReduceOp::kSum ? bf16_sum_ : bf16_max_; }
  void create_ops();
  void mark_failed() { failed_ = true; }

 private:
  int world_rank_;
  std::chrono::milliseconds timeout_;
  bool owns_;  // this library called MPI_Init_thread, so it finalises
  bool failed_ = false;
  MPI_Op bf16_sum_ = MPI_OP_NULL;
  MPI_Op bf16_max_ = MPI_OP_NULL;
};

namespace {

std::string mpi_error_text(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", code);
  return std::string(buf, static_cast<size_t>(len));
}

}  // namespace

// Every MPI call is checked; the error names the call and this rank.
#define MPI_CHECK(rank, what, call)                                                                       \
  do {                                                                                                    \
    const int diffmoe_mpi_rc_ = (call);                                                                   \
    if (diffmoe_mpi_rc_ != MPI_SUCCESS)                                                                   \
      DIFFMOE_FAIL("rank {}: {}: {} failed: {}", (rank), (what), #call, mpi_error_text(diffmoe_mpi_rc_)); \
  } while (0)

namespace {

void bf16_sum_fn(void* in, void* inout, int* len, MPI_Datatype*) {
  host_reduce(inout, in, *len, DType::kBF16, ReduceOp::kSum);
}
void bf16_max_fn(void* in, void* inout, int* len, MPI_Datatype*) {
  host_reduce(inout, in, *len, DType::kBF16, ReduceOp::kMax);
}

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kF64: return MPI_DOUBLE;
    case DType::kBF16: return MPI_UINT16_T;  // reduced by the bf16 ops
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    case DType::kU8: return MPI_UINT8_T;
    case DType::kF8E4M3: break;
  }
  DIFFMOE_FAIL("[dist] MPI: dtype {} is not supported", dtype_name(t));
}

int mpi_count(int64_t n, std::string_view what) {
  DIFFMOE_CHECK(n >= 0 && n <= INT_MAX, "[dist] {}: {} elements exceed MPI's int count", what, n);
  return static_cast<int>(n);
}

class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<MpiRuntime> rt, std::string what) : rt_(std::move(rt)), what_(std::move(what)) {}
  ~MpiWork() override {
    if (done_) return;
    try {
      wait(Context{});
    } catch (const std::exception& e) {
      // A collective nobody waited for failed: the job cannot go on, and a destructor cannot throw.
      std::fprintf(stderr, "error: %s\n", e.what());
      std::fflush(stderr);
      mpi_abort(1);
    }
  }
  MPI_Request* request() { return &req_; }
  std::vector<int>& ints() { return ints_; }

  void wait(Context) override {
    if (done_) return;
    const auto start = Clock::now();
    const auto deadline = start + rt_->timeout();
    auto pause = std::chrono::microseconds(0);
    while (true) {
      int flag = 0;
      MPI_CHECK(rt_->world_rank(), what_, MPI_Test(&req_, &flag, MPI_STATUS_IGNORE));
      if (flag) break;
      if (Clock::now() > deadline)
        DIFFMOE_FAIL("rank {}: {}: timed out after {} (a peer rank did not reach it)", rt_->world_rank(), what_,
                     seconds_text(rt_->timeout()));
      // Spin briefly (small collectives finish in microseconds), then back off to at most 1 ms so an
      // oversubscribed machine's other ranks get the cores.
      if (pause.count() == 0) {
        if (Clock::now() - start > std::chrono::microseconds(200)) pause = std::chrono::microseconds(20);
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(1000));
      }
    }
    done_ = true;
  }

 private:
  std::shared_ptr<MpiRuntime> rt_;
  std::string what_;
  MPI_Request req_ = MPI_REQUEST_NULL;
  std::vector<int> ints_;  // counts and displacements of all_to_all_v: MPI reads them until completion
  bool done_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::shared_ptr<MpiRuntime> rt, MPI_Comm comm, int rank, int size, std::string name)
      : Communicator(rank, size, std::move(name)), rt_(std::move(rt)), comm_(comm) {}
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  std::string_view kind() const override { return "mpi"; }
  Device device() const override { return Device::kCPU; }

 protected:
  WorkPtr do_all_reduce(Context, const Tensor& in, const Tensor& out, ReduceOp op) override {
    auto w = make_work("all_reduce");
    const MPI_Op mop = out.dtype == DType::kBF16 ? rt_->bf16_op(op) : (op == ReduceOp::kSum ? MPI_SUM : MPI_MAX);
    const void* src = in.data == out.data ? MPI_IN_PLACE : in.data;
    MPI_CHECK(rt_->world_rank(), what("all_reduce"),
              MPI_Iallreduce(src, out.data, mpi_count(out.numel(), what("all_reduce")), mpi_type(out.dtype), mop, comm_,
                             w->request()));
    return w;
  }
  WorkPtr do_reduce_scatter(Context, const Tensor& in, const Tensor& out) override {
    auto w = make_work("reduce_scatter");
    const MPI_Op mop = out.dtype == DType::kBF16 ? rt_->bf16_op(ReduceOp::kSum) : MPI_SUM;
    MPI_CHECK(rt_->world_rank(), what("reduce_scatter"),
              MPI_Ireduce_scatter_block(in.data, out.data, mpi_count(out.numel(), what("reduce_scatter")),
                                        mpi_type(out.dtype), mop, comm_, w->request()));
    return w;
  }
  WorkPtr do_all_gather(Context, const Tensor& in, const Tensor& out) override {
    auto w = make_work("all_gather");
    const int n = mpi_count(in.numel(), what("all_gather"));
    mpi_count(out.numel(), what("all_gather"));
    const bool in_place = in.data == byte_ptr(out, static_cast<int64_t>(rank()) * in.numel());
    MPI_CHECK(rt_->world_rank(), what("all_gather"),
              MPI_Iallgather(in_place ? MPI_IN_PLACE : in.data, n, mpi_type(in.dtype), out.data, n, mpi_type(out.dtype),
                             comm_, w->request()));
    return w;
  }
  WorkPtr do_all_to_all_v(Context, const AllToAllVArgs& a) override {
    auto w = make_work("all_to_all_v");
    const auto n = static_cast<size_t>(size());
    std::vector<int>& v = w->ints();
    v.resize(4 * n);
    const std::string wh = what("all_to_all_v");
    for (size_t p = 0; p < n; ++p) {
      v[p] = mpi_count(a.send_counts[p], wh);
      v[n + p] = mpi_count(a.send_offsets[p], wh);
      v[2 * n + p] = mpi_count(a.recv_counts[p], wh);
      v[3 * n + p] = mpi_count(a.recv_offsets[p], wh);
    }
    MPI_CHECK(rt_->world_rank(), wh,
              MPI_Ialltoallv(a.in.data, v.data(), v.data() + n, mpi_type(a.in.dtype), a.out.data, v.data() + 2 * n,
                             v.data() + 3 * n, mpi_type(a.out.dtype), comm_, w->request()));
    return w;
  }
  WorkPtr do_broadcast(Context, const Tensor& t, int root) override {
    auto w = make_work("broadcast");
    MPI_CHECK(
        rt_->world_rank(), what("broadcast"),
        MPI_Ibcast(t.data, mpi_count(t.numel(), what("broadcast")), mpi_type(t.dtype), root, comm_, w->request()));
    return w;
  }
  WorkPtr do_barrier(Context) override {
    auto w = make_work("barrier");
    MPI_CHECK(rt_->world_rank(), what("barrier"), MPI_Ibarrier(comm_, w->request()));
    return w;
  }
  std::unique_ptr<Communicator> do_split(int color, int key, const std::string& name) override {
    const std::string wh = fmt::format("split of {} into '{}'", this->name(), name);
    MPI_Comm sub = MPI_COMM_NULL;
    MPI_CHECK(rt_->world_rank(), wh, MPI_Comm_split(comm_, color, key, &sub));
    int r = 0, s = 0;
    MPI_CHECK(rt_->world_rank(), wh, MPI_Comm_rank(sub, &r));
    MPI_CHECK(rt_->world_rank(), wh, MPI_Comm_size(sub, &s));
    return std::make_unique<MpiCommunicator>(rt_, sub, r, s, name);
  }

 private:
  std::string what(std::string_view op) const { return fmt::format("{} on {}", op, name()); }
  std::unique_ptr<MpiWork> make_work(std::string_view op) { return std::make_unique<MpiWork>(rt_, what(op)); }

  std::shared_ptr<MpiRuntime> rt_;
  MPI_Comm comm_;
};

}  // namespace

void MpiRuntime::create_ops() {
  MPI_CHECK(world_rank_, "MPI setup", MPI_Op_create(&bf16_sum_fn, 1, &bf16_sum_));
  MPI_CHECK(world_rank_, "MPI setup", MPI_Op_create(&bf16_max_fn, 1, &bf16_max_));
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (bf16_sum_ != MPI_OP_NULL) MPI_Op_free(&bf16_sum_);
  if (bf16_max_ != MPI_OP_NULL) MPI_Op_free(&bf16_max_);
  if (owns_ && !failed_) MPI_Finalize();
}

std::shared_ptr<MpiRuntime> mpi_init(const Launch& launch, std::chrono::milliseconds timeout) {
  int initialized = 0;
  MPI_CHECK(launch.rank, "MPI setup", MPI_Initialized(&initialized));
  if (!initialized) {
    int provided = 0;
    MPI_CHECK(launch.rank, "MPI setup", MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
    DIFFMOE_CHECK(provided >= MPI_THREAD_SERIALIZED,
                  "rank {}: MPI provides thread level {} but MPI_THREAD_SERIALIZED is needed", launch.rank, provided);
  }
  auto rt = std::make_shared<MpiRuntime>(launch.rank, timeout, !initialized);
  MPI_CHECK(launch.rank, "MPI setup", MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  int rank = 0, size = 0;
  MPI_CHECK(launch.rank, "MPI setup", MPI_Comm_rank(MPI_COMM_WORLD, &rank));
  MPI_CHECK(launch.rank, "MPI setup", MPI_Comm_size(MPI_COMM_WORLD, &size));
  DIFFMOE_CHECK(
      rank == launch.rank && size == launch.world,
      "rank {}: MPI says rank {} of {}, but the launcher's variables say rank {} of {} ({}): the MPI library this "
      "program uses is not the launcher's",
      launch.rank, rank, size, launch.rank, launch.world, launch.describe());
  rt->create_ops();
  return rt;
}

std::unique_ptr<Communicator> make_mpi_world(const std::shared_ptr<MpiRuntime>& rt) {
  MPI_Comm world = MPI_COMM_NULL;
  MPI_CHECK(rt->world_rank(), "MPI setup", MPI_Comm_dup(MPI_COMM_WORLD, &world));
  int rank = 0, size = 0;
  MPI_CHECK(rt->world_rank(), "MPI setup", MPI_Comm_rank(world, &rank));
  MPI_CHECK(rt->world_rank(), "MPI setup", MPI_Comm_size(world, &size));
  return std::make_unique<MpiCommunicator>(rt, world, rank, size, "world");
}

void mpi_mark_failed(MpiRuntime& rt) { rt.mark_failed(); }

void mpi_abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] honest if it ever does
}

}  // namespace diffmoe::dist
