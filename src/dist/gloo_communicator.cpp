#include "dist/gloo_communicator.h"

#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/attr.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/comm_util.h"

namespace diffmoe::dist {

class GlooCommunicator;

class GlooRuntime {
 public:
  std::shared_ptr<gloo::transport::Device> device;
  std::shared_ptr<TcpStore> store;
  std::chrono::milliseconds timeout{0};
  int world_rank = 0;
  int world_size = 1;
  std::mutex mu;
  std::vector<GlooCommunicator*> live;  // for abort_gloo_communicators
};

namespace {

// gloo::rendezvous::Store over the TCP store, every key under `prefix` (one per communicator).
class PrefixedStore final : public gloo::rendezvous::Store {
 public:
  PrefixedStore(TcpStore& store, std::string prefix) : store_(store), prefix_(std::move(prefix)) {}
  void set(const std::string& key, const std::vector<char>& data) override { store_.set(prefix_ + key, data); }
  std::vector<char> get(const std::string& key) override { return store_.get(prefix_ + key); }
  void wait(const std::vector<std::string>& keys) override { wait(keys, store_.timeout()); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    std::vector<std::string> full;
    for (const auto& k : keys) full.push_back(prefix_ + k);
    store_.wait(full, timeout);
  }

 private:
  TcpStore& store_;
  std::string prefix_;
};

// One collective's completion, shared by the worker (which finishes it) and the Work.
class TaskState {
 public:
  void finish(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(error);
    done_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    if (error_) std::rethrow_exception(error_);
  }
  void wait_quietly() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

class TaskWork final : public Work {
 public:
  explicit TaskWork(std::shared_ptr<TaskState> s) : state_(std::move(s)) {}
  // An error not waited for is not lost: the communicator keeps it and fails its next collective.
  ~TaskWork() override { state_->wait_quietly(); }
  void wait(Context) override { state_->wait(); }

 private:
  std::shared_ptr<TaskState> state_;
};

bool contains(const std::string& s, std::string_view what) { return s.find(what) != std::string::npos; }

bool is_loopback(const std::string& host) { return host.rfind("127.", 0) == 0 || host == "localhost" || host == "::1"; }

}  // namespace

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<GlooRuntime> rt, std::shared_ptr<gloo::Context> ctx, std::string name,
                   std::string path, std::vector<int> world_ranks)
      : Communicator(ctx->rank, ctx->size, std::move(name)),
        rt_(std::move(rt)),
        ctx_(std::move(ctx)),
        path_(std::move(path)),
        world_ranks_(std::move(world_ranks)) {
    {
      std::lock_guard<std::mutex> lock(rt_->mu);
      rt_->live.push_back(this);
    }
    worker_ = std::thread([this] { work(); });
  }

  ~GlooCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(rt_->mu);
      rt_->live.erase(std::remove(rt_->live.begin(), rt_->live.end(), this), rt_->live.end());
    }
    bool busy = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      busy = running_ || !queue_.empty();
      cv_.notify_all();
    }
    if (busy) abort("the communicator was destroyed with collectives in flight");
    worker_.join();
  }

  std::string_view kind() const override { return "gloo"; }
  Device device() const override { return Device::kCPU; }

  // Fails the collective in flight and every later one with `why`; closes the connections.
  void abort(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failure_.empty()) failure_ = why;
      for (auto* b : inflight_) {
        b->abortWaitRecv();
        b->abortWaitSend();
      }
    }
    close_connections();
  }

  // One collective's transfers: posts sends and receives, waits for them naming the peer on error.
  class Exchange {
   public:
    Exchange(GlooCommunicator& c, std::string_view op, uint64_t slot) : c_(c), op_(op), slot_(slot) {}
    ~Exchange() { c_.untrack(posted_); }
    void send(int peer, const void* p, size_t bytes) { post(peer, const_cast<void*>(p), bytes, true); }
    void recv(int peer, void* p, size_t bytes) { post(peer, p, bytes, false); }
    void wait() {
      for (auto& t : posted_) {
        bool ok = false;
        try {
          ok = t.send ? t.buf->waitSend(nullptr, c_.rt_->timeout) : t.buf->waitRecv(nullptr, c_.rt_->timeout);
        } catch (const std::exception& e) {
          throw Error(c_.peer_failure(op_, t.peer, e.what()));
        }
        if (!ok) throw Error(c_.aborted_message(op_));
      }
      c_.untrack(posted_);
      posted_.clear();
    }

   private:
    struct Transfer {
      std::unique_ptr<gloo::transport::UnboundBuffer> buf;
      int peer;
      bool send;
    };
    void post(int peer, void* p, size_t bytes, bool send) {
      if (bytes == 0) return;  // both sides skip empty blocks: their sizes agree by construction or contract
      Transfer t{c_.ctx_->createUnboundBuffer(p, bytes), peer, send};
      c_.track(t.buf.get(), op_);
      posted_.push_back(std::move(t));
      try {
        if (send) {
          posted_.back().buf->send(peer, slot_);
        } else {
          posted_.back().buf->recv(peer, slot_);
        }
      } catch (const std::exception& e) {
        throw Error(c_.peer_failure(op_, peer, e.what()));
      }
    }
    GlooCommunicator& c_;
    std::string_view op_;
    uint64_t slot_;
    std::vector<Transfer> posted_;
  };

 protected:
  WorkPtr do_all_reduce(Context, const Tensor& in, const Tensor& out, ReduceOp op) override {
    return submit("all_reduce", [this, in, out, op](Exchange& ex) { ring_all_reduce(ex, in, out, op); });
  }
  WorkPtr do_reduce_scatter(Context, const Tensor& in, const Tensor& out) override {
    return submit("reduce_scatter", [this, in, out](Exchange& ex) { ring_reduce_scatter(ex, in, out); });
  }
  WorkPtr do_all_gather(Context, const Tensor& in, const Tensor& out) override {
    return submit("all_gather", [this, in, out](Exchange& ex) { ring_all_gather(ex, in, out); });
  }
  WorkPtr do_all_to_all_v(Context, const AllToAllVArgs& a) override {
    struct Blocks {
      std::vector<int64_t> sc, so, rc, ro;
    };
    Blocks b{{a.send_counts.begin(), a.send_counts.end()},
             {a.send_offsets.begin(), a.send_offsets.end()},
             {a.recv_counts.begin(), a.recv_counts.end()},
             {a.recv_offsets.begin(), a.recv_offsets.end()}};
    return submit("all_to_all_v", [this, in = a.in, out = a.out, b = std::move(b)](Exchange& ex) {
      const size_t es = dtype_size(in.dtype);
      const auto me = static_cast<size_t>(rank());
      if (b.sc[me] > 0)
        std::memcpy(byte_ptr(out, b.ro[me]), byte_ptr(in, b.so[me]), static_cast<size_t>(b.sc[me]) * es);
      for (int p = 0; p < size(); ++p) {
        if (p == rank()) continue;
        const auto q = static_cast<size_t>(p);
        ex.recv(p, byte_ptr(out, b.ro[q]), static_cast<size_t>(b.rc[q]) * es);
      }
      for (int p = 0; p < size(); ++p) {
        if (p == rank()) continue;
        const auto q = static_cast<size_t>(p);
        ex.send(p, byte_ptr(in, b.so[q]), static_cast<size_t>(b.sc[q]) * es);
      }
      ex.wait();
    });
  }
  WorkPtr do_broadcast(Context, const Tensor& t, int root) override {
    return submit("broadcast", [this, t, root](Exchange& ex) {
      if (rank() == root) {
        for (int p = 0; p < size(); ++p)
          if (p != root) ex.send(p, t.data, t.nbytes());
      } else {
        ex.recv(root, t.data, t.nbytes());
      }
      ex.wait();
    });
  }
  WorkPtr do_barrier(Context) override {
    return submit("barrier", [this](Exchange& ex) {
      // Dissemination: after round k every rank has heard (transitively) from 2^(k+1) ranks.
      const int w = size(), r = rank();
      for (int k = 1; k < w; k *= 2) {
        char in = 0;
        const char out = 1;
        ex.recv((r - k + w) % w, &in, 1);
        ex.send((r + k) % w, &out, 1);
        ex.wait();
      }
    });
  }
  std::unique_ptr<Communicator> do_split(int color, int key, const std::string& name) override;

 private:
  using Body = std::function<void(Exchange&)>;
  struct Task {
    std::string op;
    Body body;
    std::shared_ptr<TaskState> state;
  };

  WorkPtr submit(std::string op, Body body) {
    auto state = std::make_shared<TaskState>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(Task{std::move(op), std::move(body), state});
      cv_.notify_all();
    }
    return std::make_unique<TaskWork>(state);
  }

  void work() {
    while (true) {
      Task task;
      std::string failed;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
        failed = failure_;
        running_ = failed.empty();
      }
      if (!failed.empty()) {
        task.state->finish(std::make_exception_ptr(
            Error(fmt::format("rank {}: {} on {}: not run: this communicator failed earlier ({})", rt_->world_rank,
                              task.op, name(), failed))));
        continue;
      }
      try {
        Exchange ex(*this, task.op, ctx_->nextSlot());
        task.body(ex);
        finish_running();
        task.state->finish(nullptr);
      } catch (const std::exception& e) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (failure_.empty()) failure_ = e.what();
        }
        close_connections();  // peers blocked on this rank fail now, not after their timeout
        finish_running();
        task.state->finish(std::current_exception());
      }
    }
  }

  void finish_running() {
    std::lock_guard<std::mutex> lock(mu_);
    running_ = false;
  }

  void close_connections() {
    try {
      ctx_->closeConnections();
    } catch (const std::exception&) {
      // Already closed by the failure being reported.
    }
  }

  void track(gloo::transport::UnboundBuffer* b, std::string_view op) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failure_.empty()) throw Error(aborted_message(op, failure_));
    inflight_.push_back(b);
  }
  template <class Transfers>
  void untrack(const Transfers& ts) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& t : ts)
      inflight_.erase(std::remove(inflight_.begin(), inflight_.end(), t.buf.get()), inflight_.end());
  }

  std::string describe_peer(int peer) const {
    const int w = world_ranks_[static_cast<size_t>(peer)];
    return w == peer && name() == "world" ? fmt::format("peer rank {}", w)
                                          : fmt::format("peer rank {} (rank {} of {})", w, peer, name());
  }

  std::string peer_failure(std::string_view op, int peer, const std::string& what) const {
    std::string cause;
    if (contains(what, "Timed out")) {
      cause = fmt::format("timed out after {} waiting for {}", seconds_text(rt_->timeout), describe_peer(peer));
    } else if (contains(what, "Application timeout")) {
      cause = fmt::format("gave up on {}: another wait of this rank timed out", describe_peer(peer));
    } else if (contains(what, "closed") || contains(what, "reset") || contains(what, "Broken pipe") ||
               contains(what, "EOF")) {
      cause = fmt::format("{} closed the connection", describe_peer(peer));
    } else {
      cause = fmt::format("the connection to {} failed", describe_peer(peer));
    }
    return fmt::format("rank {}: {} on {}: {} [gloo: {}]", rt_->world_rank, op, name(), cause, what);
  }

  std::string aborted_message(std::string_view op, const std::string& why = {}) const {
    std::string reason = why;
    if (reason.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      reason = failure_;
    }
    return fmt::format("rank {}: {} on {}: aborted ({})", rt_->world_rank, op, name(), reason);
  }

  // Balanced chunk i of n elements over size() ranks: [n·i/W, n·(i+1)/W).
  int64_t chunk_begin(int64_t n, int i) const { return n * i / size(); }
  int64_t chunk_len(int64_t n, int i) const { return chunk_begin(n, i + 1) - chunk_begin(n, i); }

  void ring_all_reduce(Exchange& ex, const Tensor& in, const Tensor& out, ReduceOp op) {
    const int64_t n = out.numel();
    const size_t es = dtype_size(out.dtype);
    if (in.data != out.data && n > 0) std::memcpy(out.data, in.data, out.nbytes());
    const int w = size(), r = rank();
    if (w == 1 || n == 0) return;
    const int next = (r + 1) % w, prev = (r + w - 1) % w;
    std::vector<char> tmp(static_cast<size_t>(chunk_len(n, w - 1) + 1) * es);
    // Reduce-scatter: step s sends chunk r-s (reduced over s+1 ranks) and adds chunk r-s-1 from prev;
    // after w-1 steps chunk r+1 holds the reduction over every rank.
    for (int s = 0; s < w - 1; ++s) {
      const int send_i = (r - s + 2 * w) % w, recv_i = (r - s - 1 + 2 * w) % w;
      ex.recv(prev, tmp.data(), static_cast<size_t>(chunk_len(n, recv_i)) * es);
      ex.send(next, byte_ptr(out, chunk_begin(n, send_i)), static_cast<size_t>(chunk_len(n, send_i)) * es);
      ex.wait();
      host_reduce(byte_ptr(out, chunk_begin(n, recv_i)), tmp.data(), chunk_len(n, recv_i), out.dtype, op);
    }
    // All-gather: step s forwards chunk r+1-s and receives chunk r-s, each a copy of its owner's.
    for (int s = 0; s < w - 1; ++s) {
      const int send_i = (r + 1 - s + 2 * w) % w, recv_i = (r - s + 2 * w) % w;
      ex.recv(prev, byte_ptr(out, chunk_begin(n, recv_i)), static_cast<size_t>(chunk_len(n, recv_i)) * es);
      ex.send(next, byte_ptr(out, chunk_begin(n, send_i)), static_cast<size_t>(chunk_len(n, send_i)) * es);
      ex.wait();
    }
  }

  void ring_reduce_scatter(Exchange& ex, const Tensor& in, const Tensor& out) {
    const int64_t c = out.numel();
    const size_t bytes = out.nbytes();
    const int w = size(), r = rank();
    if (w == 1 || c == 0) {
      if (c > 0) std::memcpy(out.data, in.data, bytes);
      return;
    }
    const int next = (r + 1) % w, prev = (r + w - 1) % w;
    // Step s sends the partial sum of chunk r-s-1 (at s = 0: this rank's own input) and receives
    // that of chunk r-s-2, adding this rank's input; the last step (s = w-2) receives chunk r.
    std::vector<char> send_buf(bytes), recv_buf(bytes);
    std::memcpy(send_buf.data(), byte_ptr(in, c * ((r - 1 + w) % w)), bytes);
    for (int s = 0; s < w - 1; ++s) {
      const int recv_i = (r - s - 2 + 2 * w) % w;
      const bool last = s == w - 2;
      void* dst = last ? out.data : recv_buf.data();
      ex.recv(prev, dst, bytes);
      ex.send(next, send_buf.data(), bytes);
      ex.wait();
      host_reduce(dst, byte_ptr(in, c * recv_i), c, out.dtype, ReduceOp::kSum);
      if (!last) std::swap(send_buf, recv_buf);
    }
  }

  void ring_all_gather(Exchange& ex, const Tensor& in, const Tensor& out) {
    const int64_t c = in.numel();
    const size_t bytes = in.nbytes();
    const int w = size(), r = rank();
    char* mine = byte_ptr(out, c * r);
    if (c > 0 && in.data != mine) std::memcpy(mine, in.data, bytes);
    if (w == 1 || c == 0) return;
    const int next = (r + 1) % w, prev = (r + w - 1) % w;
    for (int s = 0; s < w - 1; ++s) {
      const int send_i = (r - s + 2 * w) % w, recv_i = (r - s - 1 + 2 * w) % w;
      ex.recv(prev, byte_ptr(out, c * recv_i), bytes);
      ex.send(next, byte_ptr(out, c * send_i), bytes);
      ex.wait();
    }
  }

  std::shared_ptr<GlooRuntime> rt_;
  std::shared_ptr<gloo::Context> ctx_;
  std::string path_;              // unique store prefix of this communicator
  std::vector<int> world_ranks_;  // world rank of each rank here
  int splits_ = 0;                // splits made from this communicator (main thread)

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stop_ = false;
  bool running_ = false;
  std::string failure_;  // the first failure; later collectives fail at once
  std::vector<gloo::transport::UnboundBuffer*> inflight_;
  std::thread worker_;
};

namespace {

std::shared_ptr<gloo::Context> connect_mesh(GlooRuntime& rt, int rank, int size, const std::string& prefix) {
  auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
  ctx->setTimeout(rt.timeout);
  PrefixedStore store(*rt.store, prefix);
  ctx->connectFullMesh(store, rt.device);
  return ctx;
}

}  // namespace

std::unique_ptr<Communicator> GlooCommunicator::do_split(int color, int key, const std::string& name) {
  const int w = size();
  std::vector<int64_t> mine = {color, key}, all(static_cast<size_t>(2 * w));
  Tensor in{mine.data(), DType::kI64, Device::kCPU, Shape{2}};
  Tensor out{all.data(), DType::kI64, Device::kCPU, Shape{2 * w}};
  all_gather(Context{}, in, out)->wait(Context{});
  std::vector<int> members;
  for (int r = 0; r < w; ++r)
    if (all[static_cast<size_t>(2 * r)] == color) members.push_back(r);
  std::stable_sort(members.begin(), members.end(), [&](int a, int b) {
    return all[static_cast<size_t>(2 * a + 1)] < all[static_cast<size_t>(2 * b + 1)];
  });
  const int new_rank = static_cast<int>(std::find(members.begin(), members.end(), rank()) - members.begin());
  std::vector<int> new_world;
  for (int m : members) new_world.push_back(world_ranks_[static_cast<size_t>(m)]);
  const std::string prefix = fmt::format("{}split{}/color{}/", path_, splits_++, color);
  try {
    auto ctx = connect_mesh(*rt_, new_rank, static_cast<int>(members.size()), prefix);
    return std::make_unique<GlooCommunicator>(rt_, std::move(ctx), name, prefix, std::move(new_world));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    DIFFMOE_FAIL("rank {}: split of {} into '{}': connecting the group failed: {}", rt_->world_rank, this->name(), name,
                 e.what());
  }
}

std::shared_ptr<GlooRuntime> make_gloo_runtime(const Launch& launch, std::shared_ptr<TcpStore> store,
                                               std::chrono::milliseconds timeout) {
  auto rt = std::make_shared<GlooRuntime>();
  rt->store = std::move(store);
  rt->timeout = timeout;
  rt->world_rank = launch.rank;
  rt->world_size = launch.world;
  gloo::transport::tcp::attr attr;
  const EnvReader env = process_env();
  if (const auto iface = env("GLOO_SOCKET_IFNAME")) {
    attr.iface = *iface;
  } else if (const auto host = env("DIFFMOE_GLOO_HOSTNAME")) {
    attr.hostname = *host;
  } else if (is_loopback(launch.master_addr)) {
    attr.hostname = "127.0.0.1";
  }
  try {
    rt->device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    DIFFMOE_FAIL("rank {}: cannot create Gloo's TCP device (set GLOO_SOCKET_IFNAME or DIFFMOE_GLOO_HOSTNAME): {}",
                 launch.rank, e.what());
  }
  return rt;
}

std::unique_ptr<Communicator> make_gloo_world(const std::shared_ptr<GlooRuntime>& rt) {
  std::vector<int> ranks(static_cast<size_t>(rt->world_size));
  for (int r = 0; r < rt->world_size; ++r) ranks[static_cast<size_t>(r)] = r;
  try {
    auto ctx = connect_mesh(*rt, rt->world_rank, rt->world_size, "world/");
    return std::make_unique<GlooCommunicator>(rt, std::move(ctx), "world", "world/", std::move(ranks));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    DIFFMOE_FAIL("rank {}: connecting the world over Gloo failed: {}", rt->world_rank, e.what());
  }
}

void abort_gloo_communicators(GlooRuntime& rt, const std::string& why) {
  std::lock_guard<std::mutex> lock(rt.mu);  // a communicator unregisters under it before it goes away
  for (auto* c : rt.live) c->abort(why);
}

}  // namespace diffmoe::dist
