#include "dist/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/comm_util.h"

namespace diffmoe::dist {
namespace {

// Every CUDA and NCCL call is checked; errors name the call, the rank and what it was for.
#define DIST_CUDA_CHECK(rank, what, call)                                                                       \
  do {                                                                                                          \
    const cudaError_t diffmoe_cuda_err_ = (call);                                                               \
    if (diffmoe_cuda_err_ != cudaSuccess)                                                                       \
      DIFFMOE_FAIL("rank {}: {}: {} failed: {}", (rank), (what), #call, cudaGetErrorString(diffmoe_cuda_err_)); \
  } while (0)

std::string nccl_error_text(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  if (last != nullptr && last[0] != '\0') s += fmt::format(" ({})", last);
  return s;
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::kF32: return ncclFloat32;
    case DType::kF64: return ncclFloat64;
    case DType::kBF16: return ncclBfloat16;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
    case DType::kU8: return ncclUint8;
    case DType::kF8E4M3: break;
  }
  DIFFMOE_FAIL("[dist] NCCL: dtype {} is not supported", dtype_name(t));
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

// Waits until a non-blocking NCCL communicator has finished its last call (init, split, enqueue).
// On an error or after the deadline the communicator is aborted and Error thrown.
void wait_ready(ncclComm_t comm, int rank, const std::string& what, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::microseconds(0);
  while (true) {
    ncclResult_t st = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &st);
    if (r != ncclSuccess) st = r;
    if (st == ncclSuccess) return;
    if (st != ncclInProgress) {
      const std::string text = nccl_error_text(st, comm);
      ncclCommAbort(comm);
      DIFFMOE_FAIL("rank {}: {} (nccl): {}", rank, what, text);
    }
    if (Clock::now() > deadline) {
      ncclCommAbort(comm);
      DIFFMOE_FAIL("rank {}: {} (nccl): not done after {} (a peer rank did not join, or died)", rank, what,
                   seconds_text(timeout));
    }
    if (pause.count() > 0) std::this_thread::sleep_for(pause);
    pause = std::min(pause + std::chrono::microseconds(10), std::chrono::microseconds(1000));
  }
}

// A CUDA event (no timing), shared by a Work and the watchdog.
class Event {
 public:
  explicit Event(int rank) {
    DIST_CUDA_CHECK(rank, "NCCL communicator", cudaEventCreateWithFlags(&e_, cudaEventDisableTiming));
  }
  ~Event() { cudaEventDestroy(e_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// How long a failing watchdog with exit_on_failure waits for ncclCommAbort before it ends the process anyway.
constexpr std::chrono::seconds kAbortGrace{2};

// What a communicator, its Works and its watchdog share.
struct NcclState {
  ncclComm_t comm = nullptr;
  int device = 0;
  int world_rank = 0;
  std::string name;
  std::chrono::milliseconds timeout{0};
  bool exit_on_failure = true;

  struct Pending {
    std::shared_ptr<Event> done;
    std::string what;
    Clock::time_point deadline;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Pending> pending;
  bool stop = false;
  std::atomic<bool> aborted{false};
  std::string failure;  // under mu

  std::string failure_text() {
    std::lock_guard<std::mutex> lock(mu);
    return failure;
  }

  // The watchdog's verdict: abort the communicator; then end the process or mark the failure.
  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure.empty()) return;
      failure = message;
    }
    if (exit_on_failure) {
      std::fprintf(stderr, "error: %s; aborting the NCCL communicator and this process\n", message.c_str());
      std::fflush(stderr);
    }
    if (!exit_on_failure) {
      if (!aborted.exchange(true)) ncclCommAbort(comm);
      return;
    }
    // ncclCommAbort can block behind what stalled the collective (a kernel or host function that never
    // finishes on its stream), and the process ends either way: abort on a thread of its own and exit
    // once it returns or kAbortGrace has passed, whichever is first.
    if (!aborted.exchange(true)) {
      auto done = std::make_shared<std::atomic<bool>>(false);
      std::thread([c = comm, done] {
        ncclCommAbort(c);
        done->store(true);
      }).detach();
      const auto until = Clock::now() + kAbortGrace;
      while (!done->load() && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::_Exit(1);
  }

  void watch() {
    if (cudaSetDevice(device) != cudaSuccess) {
      fail(fmt::format("rank {}: watchdog of {} (nccl): cannot select CUDA device {}", world_rank, name, device));
      return;
    }
    const auto poll = std::min<std::chrono::milliseconds>(std::chrono::milliseconds(100),
                                                          std::max(timeout / 10, std::chrono::milliseconds(1)));
    std::unique_lock<std::mutex> lock(mu);
    while (!stop) {
      cv.wait_for(lock, poll);
      if (stop || !failure.empty()) break;
      ncclResult_t st = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm, &st);
      if (r != ncclSuccess) st = r;
      if (st != ncclSuccess && st != ncclInProgress) {
        const std::string what = pending.empty() ? "a collective" : pending.front().what;
        lock.unlock();
        fail(
            fmt::format("rank {}: {} (nccl): NCCL reported an error: {}", world_rank, what, nccl_error_text(st, comm)));
        return;
      }
      while (!pending.empty()) {
        const cudaError_t q = cudaEventQuery(pending.front().done->get());
        if (q == cudaSuccess) {
          pending.pop_front();
          continue;
        }
        if (q != cudaErrorNotReady) {
          const std::string what = pending.front().what;
          lock.unlock();
          fail(fmt::format("rank {}: {} (nccl): CUDA error: {}", world_rank, what, cudaGetErrorString(q)));
          return;
        }
        if (Clock::now() > pending.front().deadline) {
          const std::string what = pending.front().what;
          lock.unlock();
          fail(
              fmt::format("rank {}: {} (nccl): not complete {} after it was issued (a peer rank died, hangs, or issued "
                          "other collectives)",
                          world_rank, what, seconds_text(timeout)));
          return;
        }
        break;  // later ones were issued later: their deadlines are later
      }
    }
  }
};

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<NcclState> st, std::shared_ptr<Event> done, std::string what)
      : st_(std::move(st)), done_(std::move(done)), what_(std::move(what)) {}
  void wait(Context ctx) override {
    const std::string failure = st_->failure_text();
    if (!failure.empty()) DIFFMOE_FAIL("{}", failure);
    DIST_CUDA_CHECK(st_->world_rank, what_,
                    cudaStreamWaitEvent(static_cast<cudaStream_t>(ctx.stream), done_->get(), 0));
  }

 private:
  std::shared_ptr<NcclState> st_;
  std::shared_ptr<Event> done_;
  std::string what_;
};

ncclConfig_t make_config(const std::string& name) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = name.c_str();  // read during the init/split call only
  return config;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int device, int world_rank, const std::string& name, const NcclOptions& opt)
      : Communicator(comm_rank(comm, world_rank, name), comm_size(comm, world_rank, name), name), opt_(opt) {
    st_ = std::make_shared<NcclState>();
    st_->comm = comm;
    st_->device = device;
    st_->world_rank = world_rank;
    st_->name = name;
    st_->timeout = opt.timeout;
    st_->exit_on_failure = opt.exit_on_failure;
    const std::string what = fmt::format("NCCL communicator {}", name);
    int least = 0, greatest = 0;
    DIST_CUDA_CHECK(world_rank, what, cudaDeviceGetStreamPriorityRange(&least, &greatest));
    // High priority: communication kernels get SMs as soon as they are queued, beside the backward.
    DIST_CUDA_CHECK(world_rank, what, cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
    DIST_CUDA_CHECK(world_rank, what, cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    DIST_CUDA_CHECK(world_rank, what, cudaMalloc(&scratch_, sizeof(float)));
    watchdog_ = std::thread([st = st_] { st->watch(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(st_->mu);
      st_->stop = true;
      st_->cv.notify_all();
    }
    watchdog_.join();
    if (!st_->aborted.exchange(true)) {
      const bool failed = !st_->failure_text().empty() || std::uncaught_exceptions() > 0;
      bool finalized = false;
      if (!failed) {
        try {
          const ncclResult_t r = ncclCommFinalize(st_->comm);
          if (r == ncclSuccess || r == ncclInProgress) {
            wait_ready(st_->comm, st_->world_rank, fmt::format("finalizing {}", name()), opt_.timeout);
            finalized = true;
          }
        } catch (const std::exception& e) {
          std::fprintf(stderr, "warning: %s\n", e.what());  // wait_ready aborted the communicator
          st_->aborted = true;
        }
      }
      if (!st_->aborted) {
        if (finalized) {
          ncclCommDestroy(st_->comm);
        } else {
          ncclCommAbort(st_->comm);
        }
      }
    }
    cudaFree(scratch_);
    cudaEventDestroy(ready_);
    cudaStreamDestroy(stream_);
  }

  std::string_view kind() const override { return "nccl"; }
  Device device() const override { return Device::kCUDA; }

 protected:
  WorkPtr do_all_reduce(Context ctx, const Tensor& in, const Tensor& out, ReduceOp op) override {
    return run(ctx, "all_reduce", [&] {
      return ncclAllReduce(in.data, out.data, static_cast<size_t>(out.numel()), nccl_type(out.dtype), nccl_op(op),
                           st_->comm, stream_);
    });
  }
  WorkPtr do_reduce_scatter(Context ctx, const Tensor& in, const Tensor& out) override {
    return run(ctx, "reduce_scatter", [&] {
      return ncclReduceScatter(in.data, out.data, static_cast<size_t>(out.numel()), nccl_type(out.dtype), ncclSum,
                               st_->comm, stream_);
    });
  }
  WorkPtr do_all_gather(Context ctx, const Tensor& in, const Tensor& out) override {
    return run(ctx, "all_gather", [&] {
      return ncclAllGather(in.data, out.data, static_cast<size_t>(in.numel()), nccl_type(in.dtype), st_->comm, stream_);
    });
  }
  WorkPtr do_all_to_all_v(Context ctx, const AllToAllVArgs& a) override {
    return run(ctx, "all_to_all_v", [&] {
      const ncclDataType_t t = nccl_type(a.in.dtype);
      ncclResult_t r = ncclGroupStart();
      if (r != ncclSuccess) return r;
      for (int p = 0; p < size() && (r == ncclSuccess || r == ncclInProgress); ++p) {
        const auto q = static_cast<size_t>(p);
        if (a.send_counts[q] > 0)
          r = ncclSend(byte_ptr(a.in, a.send_offsets[q]), static_cast<size_t>(a.send_counts[q]), t, p, st_->comm,
                       stream_);
        if ((r == ncclSuccess || r == ncclInProgress) && a.recv_counts[q] > 0)
          r = ncclRecv(byte_ptr(a.out, a.recv_offsets[q]), static_cast<size_t>(a.recv_counts[q]), t, p, st_->comm,
                       stream_);
      }
      const ncclResult_t end = ncclGroupEnd();
      return r == ncclSuccess || r == ncclInProgress ? end : r;
    });
  }
  WorkPtr do_broadcast(Context ctx, const Tensor& t, int root) override {
    return run(ctx, "broadcast", [&] {
      return ncclBroadcast(t.data, t.data, static_cast<size_t>(t.numel()), nccl_type(t.dtype), root, st_->comm,
                           stream_);
    });
  }
  WorkPtr do_barrier(Context ctx) override {
    return run(ctx, "barrier",
               [&] { return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, st_->comm, stream_); });
  }
  std::unique_ptr<Communicator> do_split(int color, int key, const std::string& name) override {
    const std::string what = fmt::format("split of {} into '{}'", this->name(), name);
    check_usable(what);
    ncclConfig_t config = make_config(name);
    ncclComm_t sub = nullptr;
    const ncclResult_t r = ncclCommSplit(st_->comm, color, key, &sub, &config);
    if (r != ncclSuccess && r != ncclInProgress)
      DIFFMOE_FAIL("rank {}: {} (nccl): ncclCommSplit failed: {}", st_->world_rank, what,
                   nccl_error_text(r, st_->comm));
    wait_ready(st_->comm, st_->world_rank, what, opt_.timeout);
    DIFFMOE_CHECK(sub != nullptr, "rank {}: {} (nccl): no communicator was made", st_->world_rank, what);
    wait_ready(sub, st_->world_rank, what, opt_.timeout);
    return std::make_unique<NcclCommunicator>(sub, st_->device, st_->world_rank, name, opt_);
  }

 private:
  static int comm_rank(ncclComm_t c, int world_rank, const std::string& name) {
    int r = 0;
    const ncclResult_t res = ncclCommUserRank(c, &r);
    DIFFMOE_CHECK(res == ncclSuccess, "rank {}: NCCL communicator {}: ncclCommUserRank: {}", world_rank, name,
                  nccl_error_text(res, c));
    return r;
  }
  static int comm_size(ncclComm_t c, int world_rank, const std::string& name) {
    int n = 0;
    const ncclResult_t res = ncclCommCount(c, &n);
    DIFFMOE_CHECK(res == ncclSuccess, "rank {}: NCCL communicator {}: ncclCommCount: {}", world_rank, name,
                  nccl_error_text(res, c));
    return n;
  }

  void check_usable(const std::string& what) {
    const std::string failure = st_->failure_text();
    if (!failure.empty())
      DIFFMOE_FAIL("rank {}: {}: not run: the NCCL communicator failed earlier ({})", st_->world_rank, what, failure);
    int current = -1;
    DIST_CUDA_CHECK(st_->world_rank, what, cudaGetDevice(&current));
    DIFFMOE_CHECK(current == st_->device, "rank {}: {} (nccl): the current CUDA device is {}, the communicator's is {}",
                  st_->world_rank, what, current, st_->device);
  }

  template <class Enqueue>
  WorkPtr run(Context ctx, std::string_view op, Enqueue enqueue) {
    const std::string what = fmt::format("{} on {}", op, name());
    check_usable(what);
    // Ordered after the work queued on the caller's stream so far.
    DIST_CUDA_CHECK(st_->world_rank, what, cudaEventRecord(ready_, static_cast<cudaStream_t>(ctx.stream)));
    DIST_CUDA_CHECK(st_->world_rank, what, cudaStreamWaitEvent(stream_, ready_, 0));
    const ncclResult_t r = enqueue();
    if (r != ncclSuccess && r != ncclInProgress)
      DIFFMOE_FAIL("rank {}: {} (nccl): {}", st_->world_rank, what, nccl_error_text(r, st_->comm));
    if (r == ncclInProgress) wait_ready(st_->comm, st_->world_rank, what, opt_.timeout);
    auto done = std::make_shared<Event>(st_->world_rank);
    DIST_CUDA_CHECK(st_->world_rank, what, cudaEventRecord(done->get(), stream_));
    {
      std::lock_guard<std::mutex> lock(st_->mu);
      st_->pending.push_back(NcclState::Pending{done, what, Clock::now() + opt_.timeout});
    }
    return std::make_unique<NcclWork>(st_, std::move(done), what);
  }

  NcclOptions opt_;
  std::shared_ptr<NcclState> st_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  void* scratch_ = nullptr;  // the barrier's one float
  std::thread watchdog_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_world(DistContext& dist, int device, const NcclOptions& options) {
  const int rank = dist.rank();
  const int world = dist.world_size();
  const std::string what = "creating the NCCL world";
  DIST_CUDA_CHECK(rank, what, cudaSetDevice(device));
  // The same sequence number on every rank: make_nccl_world is collective.
  static std::atomic<int> made{0};
  const int seq = made++;
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    DIFFMOE_CHECK(r == ncclSuccess, "rank 0: {}: ncclGetUniqueId: {}", what, nccl_error_text(r, nullptr));
  }
  if (world > 1) {
    if (TcpStore* store = dist.store()) {
      const std::string key = fmt::format("diffmoe/nccl/world{}/unique_id", seq);
      if (rank == 0) {
        store->set(key, std::vector<char>(reinterpret_cast<const char*>(&id),
                                          reinterpret_cast<const char*>(&id) + sizeof(id)));
      } else {
        const std::vector<char> v = store->get(key);
        DIFFMOE_CHECK(v.size() == sizeof(id), "rank {}: {}: the unique id in the store has {} bytes, not {}", rank,
                      what, v.size(), sizeof(id));
        std::memcpy(&id, v.data(), sizeof(id));
      }
    } else {
      Tensor t{&id, DType::kU8, Device::kCPU, Shape{static_cast<int64_t>(sizeof(id))}};
      dist.cpu_world().broadcast(Context{}, t, 0)->wait(Context{});
    }
  }
  const std::string name = "world";
  ncclConfig_t config = make_config(name);
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, world, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress)
    DIFFMOE_FAIL("rank {}: {}: ncclCommInitRankConfig: {}", rank, what, nccl_error_text(r, comm));
  wait_ready(comm, rank, what, options.timeout);
  return std::make_unique<NcclCommunicator>(comm, device, rank, name, options);
}

}  // namespace diffmoe::dist
