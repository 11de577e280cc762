// The NCCL communicator (src/dist/nccl_communicator.h) with a world of one GPU: every collective
// degenerates to a copy but must run through NCCL and be exact, for every dtype, odd sizes, in
// place, all_to_all_v with offsets and spare elements; the stream ordering (the collective waits
// for the caller's stream, wait() orders another stream after it, the host is never blocked); split;
// argument errors; the watchdog (a collective stuck behind a blocked stream ends the process with a
// clear message, or with exit_on_failure off fails the next wait()). Skipped without a CUDA
// device. Not registered with ctest (CI has no GPU): run build/tests/dist/test_cuda_dist.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/dist_context.h"
#include "dist/nccl_communicator.h"

namespace diffmoe::dist {
namespace {

#define CHECK_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

const DType kDTypes[] = {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64, DType::kU8};
constexpr uint8_t kPoison = 0x5C;
constexpr int64_t kGuard = 16;  // elements after every device buffer, checked untouched

// Device memory of n elements (+ guard), poisoned.
class DevBuf {
 public:
  DevBuf(DType t, int64_t n) : t_(t), n_(n), es_(static_cast<int64_t>(dtype_size(t))) {
    EXPECT_EQ(cudaMalloc(&p_, static_cast<size_t>((n + kGuard) * es_)), cudaSuccess);
    EXPECT_EQ(cudaMemset(p_, kPoison, static_cast<size_t>((n + kGuard) * es_)), cudaSuccess);
  }
  ~DevBuf() { cudaFree(p_); }
  Tensor tensor() const { return view(0, n_); }
  Tensor view(int64_t off, int64_t count) const {
    return Tensor{static_cast<char*>(p_) + off * es_, t_, Device::kCUDA, Shape{count}};
  }
  void upload(const std::vector<uint8_t>& host) const {
    EXPECT_EQ(cudaMemcpy(p_, host.data(), static_cast<size_t>(n_ * es_), cudaMemcpyHostToDevice), cudaSuccess);
  }
  // All bytes, guard included.
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> h(static_cast<size_t>((n_ + kGuard) * es_));
    EXPECT_EQ(cudaMemcpy(h.data(), p_, h.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  int64_t bytes() const { return n_ * es_; }

 private:
  DType t_;
  int64_t n_;
  int64_t es_;
  void* p_ = nullptr;
};

// Random non-zero bytes (every byte pattern is a value of some dtype; none is the poison).
std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : v) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<uint8_t>(x >> 24);
    if (b == 0 || b == kPoison) b = 0x11;
  }
  return v;
}

class NcclWorld1 : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
    dist_ = DistContext::init(Launch{});
    comm_ = make_nccl_world(*dist_, 0);
    CHECK_CUDA(cudaStreamCreateWithFlags(&s1_, cudaStreamNonBlocking));
    CHECK_CUDA(cudaStreamCreateWithFlags(&s2_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    comm_.reset();
    if (s1_) cudaStreamDestroy(s1_);
    if (s2_) cudaStreamDestroy(s2_);
  }
  // Expects out's first `want.size()` bytes to be want, the rest (guard) poison.
  static void expect_bytes(const DevBuf& out, const std::vector<uint8_t>& want, const std::string& what) {
    const std::vector<uint8_t> got = out.download();
    ASSERT_GE(got.size(), want.size());
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size())) << what;
    for (size_t i = want.size(); i < got.size(); ++i)
      ASSERT_EQ(got[i], kPoison) << what << ": byte " << i << " past the output was written";
  }

  std::unique_ptr<DistContext> dist_;
  std::unique_ptr<Communicator> comm_;
  cudaStream_t s1_ = nullptr, s2_ = nullptr;
};

TEST_F(NcclWorld1, EveryCollectiveIsExactForEveryDtype) {
  EXPECT_EQ(comm_->kind(), "nccl");
  EXPECT_EQ(comm_->size(), 1);
  EXPECT_EQ(comm_->rank(), 0);
  const Context ctx{s1_};
  uint32_t seed = 1;
  for (DType t : kDTypes) {
    for (int64_t n : {1, 7, 1001, 65537}) {
      const std::string what = fmt::format("{} n={}", dtype_name(t), n);
      DevBuf in(t, n);
      const std::vector<uint8_t> vals = random_bytes(static_cast<size_t>(in.bytes()), seed++);
      in.upload(vals);
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
        DevBuf out(t, n);
        comm_->all_reduce(ctx, in.tensor(), out.tensor(), op)->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        expect_bytes(out, vals, "all_reduce " + what);
      }
      {
        DevBuf io(t, n);
        io.upload(vals);
        comm_->all_reduce(ctx, io.tensor(), io.tensor())->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        expect_bytes(io, vals, "all_reduce in place " + what);
      }
      {
        DevBuf out(t, n);
        comm_->reduce_scatter(ctx, in.tensor(), out.tensor())->wait(ctx);
        comm_->barrier(ctx)->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        expect_bytes(out, vals, "reduce_scatter " + what);
      }
      {
        DevBuf out(t, n);
        comm_->all_gather(ctx, in.tensor(), out.tensor())->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        expect_bytes(out, vals, "all_gather " + what);
        DevBuf io(t, n);
        io.upload(vals);
        comm_->all_gather(ctx, io.tensor(), io.tensor())->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        expect_bytes(io, vals, "all_gather in place " + what);
      }
      {
        DevBuf b(t, n);
        b.upload(vals);
        comm_->broadcast(ctx, b.tensor(), 0)->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        expect_bytes(b, vals, "broadcast " + what);
      }
      {
        // The block to itself: elements [2, 2+k) of in land at [3, 3+k) of out (k = n-4, or an
        // empty block for small n); out's other elements stay poison.
        const int64_t k = n >= 5 ? n - 4 : 0;
        DevBuf out(t, n);
        const std::vector<int64_t> cnt{k}, so{k > 0 ? 2 : 0}, ro{k > 0 ? 3 : 0};
        comm_
            ->all_to_all_v(ctx, {.in = in.tensor(),
                                 .out = out.tensor(),
                                 .send_counts = cnt,
                                 .send_offsets = so,
                                 .recv_counts = cnt,
                                 .recv_offsets = ro})
            ->wait(ctx);
        CHECK_CUDA(cudaStreamSynchronize(s1_));
        const auto es = static_cast<int64_t>(dtype_size(t));
        std::vector<uint8_t> want(static_cast<size_t>(out.bytes()), kPoison);
        if (k > 0) std::memcpy(want.data() + 3 * es, vals.data() + 2 * es, static_cast<size_t>(k * es));
        expect_bytes(out, want, "all_to_all_v " + what);
      }
    }
  }
}

// The collective must wait for the caller's stream (blocked by a host function, then writing the
// input), a wait() on a second stream must order that stream after the collective, and the host
// must not block meanwhile.
void sleep_ms(void* ms) { std::this_thread::sleep_for(std::chrono::milliseconds(*static_cast<int*>(ms))); }

TEST_F(NcclWorld1, StreamOrdering) {
  const int64_t n = 1 << 20;
  DevBuf in(DType::kF32, n), out(DType::kF32, n);
  const std::vector<uint8_t> vals = random_bytes(static_cast<size_t>(in.bytes()), 99);
  void* pinned = nullptr;
  CHECK_CUDA(cudaMallocHost(&pinned, vals.size()));
  std::memcpy(pinned, vals.data(), vals.size());
  static int delay = 300;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_CUDA(cudaLaunchHostFunc(s1_, sleep_ms, &delay));
  CHECK_CUDA(cudaMemcpyAsync(in.tensor().data, pinned, vals.size(), cudaMemcpyHostToDevice, s1_));
  WorkPtr w = comm_->all_reduce(Context{s1_}, in.tensor(), out.tensor());
  w->wait(Context{s2_});
  std::vector<uint8_t> got(vals.size());
  void* pinned_out = nullptr;
  CHECK_CUDA(cudaMallocHost(&pinned_out, vals.size()));
  std::memset(pinned_out, 0, vals.size());
  CHECK_CUDA(cudaMemcpyAsync(pinned_out, out.tensor().data, vals.size(), cudaMemcpyDeviceToHost, s2_));
  const double issued_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(issued_ms, 150.0) << "issuing the collective and the wait blocked the host";
  CHECK_CUDA(cudaStreamSynchronize(s2_));
  const double done_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(done_ms, 290.0) << "stream 2 did not wait for the collective, which did not wait for stream 1";
  EXPECT_EQ(0, std::memcmp(pinned_out, vals.data(), vals.size()))
      << "the collective read its input before stream 1 wrote it, "
         "or stream 2 read the output before the collective wrote it";
  cudaFreeHost(pinned);
  cudaFreeHost(pinned_out);
}

TEST_F(NcclWorld1, SplitMakesAWorkingCommunicator) {
  auto sub = comm_->split(0, 5, "sub");
  EXPECT_EQ(sub->size(), 1);
  EXPECT_EQ(sub->name(), "sub");
  DevBuf a(DType::kI64, 9), b(DType::kI64, 9);
  const std::vector<uint8_t> vals = random_bytes(static_cast<size_t>(a.bytes()), 7);
  a.upload(vals);
  sub->all_reduce(Context{s1_}, a.tensor(), b.tensor())->wait(Context{s1_});
  CHECK_CUDA(cudaStreamSynchronize(s1_));
  expect_bytes(b, vals, "all_reduce on the split");
}

TEST_F(NcclWorld1, ArgumentErrors) {
  std::vector<float> host(4, 1.0f);
  const Tensor h{host.data(), DType::kF32, Device::kCPU, Shape{4}};
  try {
    comm_->all_reduce(Context{s1_}, h, h);
    ADD_FAILURE() << "no error for host tensors";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "all_reduce on world: in is f32[4]@cpu, but this nccl communicator takes cuda tensors"),
              std::string::npos)
        << e.what();
  }
}

// A collective stuck behind a blocked caller stream (a host function sleeping longer than the
// timeout): run in a child process by the death tests below. The timeout also bounds the NCCL world's
// creation, which took over 0.5 s in a death test's child on an H100: 3 s leaves it room.
[[noreturn]] void stuck_collective(bool exit_on_failure) {
  auto dist = DistContext::init(Launch{});
  NcclOptions opt;
  opt.timeout = std::chrono::milliseconds(3000);
  opt.exit_on_failure = exit_on_failure;
  auto comm = make_nccl_world(*dist, 0, opt);
  cudaStream_t s = nullptr;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  static int block = 0;
  block = exit_on_failure ? 12000 : 6000;
  cudaLaunchHostFunc(s, sleep_ms, &block);
  void* p = nullptr;
  cudaMalloc(&p, 64);
  const Tensor t{p, DType::kF32, Device::kCUDA, Shape{16}};
  WorkPtr w = comm->all_reduce(Context{s}, t, t);
  if (exit_on_failure) {
    std::this_thread::sleep_for(std::chrono::seconds(9));
    std::_Exit(0);  // not reached: the watchdog exits 3 s after the issue, 5 s at most with the abort's grace
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(4500));
  int code = 3;
  try {
    w->wait(Context{s});
  } catch (const Error& e) {
    const bool named =
        std::string(e.what()).find("rank 0: all_reduce on world (nccl): not complete 3 s") != std::string::npos;
    code = 4;
    try {
      comm->barrier(Context{s});
    } catch (const Error& e2) {
      if (named && std::string(e2.what()).find("not run: the NCCL communicator failed earlier") != std::string::npos)
        code = 0;
    }
  }
  std::_Exit(code);  // skip destructors: the aborted communicator's kernels may still be queued
}

// The watchdog ends the process after the timeout, naming the rank, the collective and the
// communicator.
TEST(NcclWatchdog, TimeoutEndsTheProcessWithAClearMessage) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(stuck_collective(true), ::testing::ExitedWithCode(1),
              "error: rank 0: all_reduce on world \\(nccl\\): not complete 3 s after it was issued.*aborting the NCCL "
              "communicator and this process");
}

// Without exit_on_failure the watchdog marks the communicator failed; wait() and later calls throw
// (the child exits 0 when both errors came with the expected text, 3 or 4 otherwise).
TEST(NcclWatchdog, TimeoutWithoutExitFailsTheNextWait) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(stuck_collective(false), ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace diffmoe::dist
