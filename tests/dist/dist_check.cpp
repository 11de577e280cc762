// The multi-process check of the CPU communicators (src/dist), run as real processes by ctest under
// mpirun (MPI) and under dist_launch (torchrun variables: the TCP store + Gloo), and alone (one
// process: the single-rank communicator). Every rank checks its own results against a serial
// computation of what every rank contributed (each rank can compute every other rank's inputs: they
// are a hash of (rank, element, salt)); a failed check throws, and the failure path of
// DistContext::fail stops every rank, so one wrong value makes the whole job exit non-zero.
//
// Scenarios (argv[1]):
//   collectives   every collective for every dtype and several sizes (odd ones, fewer elements
//                 than ranks), uneven all_to_all_v counts with zeros, in-place variants, guard
//                 elements around every output, bitwise-equal all_reduce results across ranks on
//                 random floats, barrier ordering, split and the ProcessGrid layouts, collectives
//                 in flight on several communicators at once, argument errors
//   throw R       rank R throws (an application error) in its fourth all_reduce's turn
//   kill R        rank R is SIGKILLed from a thread while every rank loops over large all_reduces
//   hang R        rank R sleeps (3x the timeout) instead of joining the first all_reduce
// The failure scenarios are checked from outside (exit codes and messages): tests/dist/CMakeLists.txt.
#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/dist_context.h"
#include "dist/launch.h"
#include "dist/process_grid.h"

namespace diffmoe::dist {
namespace {

const DType kDTypes[] = {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64, DType::kU8};

uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A non-zero value whose sums over up to 4 ranks are exact in every dtype (so any summation order
// gives the same bits): u8 in [1, 60]; bf16 and integers ±[1, 20] (bf16: ±[1, 15], 8 significant
// bits hold sums up to 255); f32/f64 ±[1, 20] plus a multiple of 1/4.
double value(DType t, uint64_t salt, int rank, int64_t i) {
  const uint64_t h =
      mix(salt * 1000003ull + static_cast<uint64_t>(rank) * 7919ull + static_cast<uint64_t>(i) * 104729ull);
  const double sign = (h >> 40) & 1 ? -1.0 : 1.0;
  switch (t) {
    case DType::kU8: return 1.0 + static_cast<double>(h % 60);
    case DType::kBF16: return sign * (1.0 + static_cast<double>(h % 15));
    case DType::kI32:
    case DType::kI64: return sign * (1.0 + static_cast<double>(h % 20));
    default: return sign * (1.0 + static_cast<double>(h % 20) + static_cast<double>((h >> 8) % 4) / 4.0);
  }
}

void put(DType t, void* p, int64_t i, double v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case DType::kF64: static_cast<double*>(p)[i] = v; return;
    case DType::kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(static_cast<float>(v)); return;
    case DType::kI32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); return;
    case DType::kI64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); return;
    case DType::kU8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); return;
    default: DIFFMOE_FAIL("dist_check: dtype {}", dtype_name(t));
  }
}

double get(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF64: return static_cast<const double*>(p)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kI32: return static_cast<const int32_t*>(p)[i];
    case DType::kI64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::kU8: return static_cast<const uint8_t*>(p)[i];
    default: DIFFMOE_FAIL("dist_check: dtype {}", dtype_name(t));
  }
}

constexpr int64_t kGuard = 3;          // elements on each side of every buffer
constexpr uint8_t kGuardByte = 0xA7;   // their bytes
constexpr uint8_t kPoisonByte = 0x5C;  // an output's bytes before the collective writes it

// A host buffer of n elements with guard elements before and after.
class Buf {
 public:
  Buf(DType t, int64_t n) : t_(t), n_(n), es_(static_cast<int64_t>(dtype_size(t))) {
    bytes_.assign(static_cast<size_t>((n + 2 * kGuard) * es_), kGuardByte);
    std::memset(data(), kPoisonByte, static_cast<size_t>(n * es_));
  }
  void* data() { return bytes_.data() + kGuard * es_; }
  Tensor tensor() { return Tensor{data(), t_, Device::kCPU, Shape{n_}}; }
  Tensor view(int64_t offset, int64_t count) {
    return Tensor{static_cast<char*>(data()) + offset * es_, t_, Device::kCPU, Shape{count}};
  }
  double at(int64_t i) const { return get(t_, bytes_.data() + kGuard * es_, i); }
  void set(int64_t i, double v) { put(t_, data(), i, v); }
  bool guards_intact() const {
    const auto g = static_cast<size_t>(kGuard * es_);
    for (size_t k = 0; k < g; ++k)
      if (bytes_[k] != kGuardByte || bytes_[bytes_.size() - 1 - k] != kGuardByte) return false;
    return true;
  }
  int64_t size() const { return n_; }

 private:
  DType t_;
  int64_t n_;
  int64_t es_;
  std::vector<uint8_t> bytes_;
};

class Checker {
 public:
  explicit Checker(int world_rank) : rank_(world_rank) {}
  template <class... Args>
  void expect(bool ok, fmt::format_string<Args...> f, Args&&... args) {
    ++count_;
    if (!ok) DIFFMOE_FAIL("rank {}: check failed: {}", rank_, fmt::format(f, std::forward<Args>(args)...));
  }
  // Every element of `got` equals want(i) exactly, and the guards are intact.
  template <class F>
  void values(const Buf& got, F want, const std::string& what) {
    for (int64_t i = 0; i < got.size(); ++i) {
      const double w = want(i);
      if (got.at(i) != w) expect(false, "{}: element {} is {}, expected {}", what, i, got.at(i), w);
    }
    expect(got.guards_intact(), "{}: guard elements were overwritten", what);
  }
  int count() const { return count_; }

 private:
  int rank_;
  int count_ = 0;
};

const Context kCtx{};

void check_all_reduce(Communicator& c, Checker& ck, DType t, int64_t n, ReduceOp op, bool in_place, uint64_t salt) {
  const std::string what = fmt::format("all_reduce {} {} n={}{} on {}", reduce_op_name(op), dtype_name(t), n,
                                       in_place ? " in place" : "", c.name());
  Buf in(t, n), out(t, n);
  for (int64_t i = 0; i < n; ++i) in.set(i, value(t, salt, c.rank(), i));
  if (in_place) {
    c.all_reduce(kCtx, in.tensor(), in.tensor(), op)->wait(kCtx);
  } else {
    c.all_reduce(kCtx, in.tensor(), out.tensor(), op)->wait(kCtx);
  }
  ck.values(
      in_place ? in : out,
      [&](int64_t i) {
        double acc = value(t, salt, 0, i);
        for (int r = 1; r < c.size(); ++r)
          acc = op == ReduceOp::kSum ? acc + value(t, salt, r, i) : std::max(acc, value(t, salt, r, i));
        return acc;
      },
      what);
}

void check_reduce_scatter(Communicator& c, Checker& ck, DType t, int64_t chunk, uint64_t salt) {
  const int64_t n = chunk * c.size();
  Buf in(t, n), out(t, chunk);
  for (int64_t i = 0; i < n; ++i) in.set(i, value(t, salt, c.rank(), i));
  c.reduce_scatter(kCtx, in.tensor(), out.tensor())->wait(kCtx);
  ck.values(
      out,
      [&](int64_t i) {
        double acc = 0;
        for (int r = 0; r < c.size(); ++r) acc += value(t, salt, r, c.rank() * chunk + i);
        return acc;
      },
      fmt::format("reduce_scatter {} chunk={} on {}", dtype_name(t), chunk, c.name()));
  for (int64_t i = 0; i < n; ++i)
    ck.expect(in.at(i) == value(t, salt, c.rank(), i), "reduce_scatter changed its input at {}", i);
}

void check_all_gather(Communicator& c, Checker& ck, DType t, int64_t chunk, bool in_place, uint64_t salt) {
  const int64_t n = chunk * c.size();
  Buf in(t, chunk), out(t, n);
  for (int64_t i = 0; i < chunk; ++i) in.set(i, value(t, salt, c.rank(), i));
  if (in_place) {
    for (int64_t i = 0; i < chunk; ++i) out.set(c.rank() * chunk + i, value(t, salt, c.rank(), i));
    c.all_gather(kCtx, out.view(c.rank() * chunk, chunk), out.tensor())->wait(kCtx);
  } else {
    c.all_gather(kCtx, in.tensor(), out.tensor())->wait(kCtx);
  }
  ck.values(
      out, [&](int64_t i) { return value(t, salt, static_cast<int>(i / chunk), i % chunk); },
      fmt::format("all_gather {} chunk={}{} on {}", dtype_name(t), chunk, in_place ? " in place" : "", c.name()));
}

// Rank `from` sends count(from, to) elements to rank `to`: zeros included, uneven.
int64_t a2a_count(int from, int to, int64_t scale, uint64_t salt) {
  return static_cast<int64_t>((mix(salt + static_cast<uint64_t>(from * 31 + to * 7)) % 4)) * scale +
         (from == to ? 1 : 0) * (scale % 2);
}

void check_all_to_all_v(Communicator& c, Checker& ck, DType t, int64_t scale, uint64_t salt) {
  const int w = c.size(), me = c.rank();
  std::vector<int64_t> sc(static_cast<size_t>(w)), so(static_cast<size_t>(w)), rc(static_cast<size_t>(w)),
      ro(static_cast<size_t>(w));
  // Send blocks in reverse peer order with one spare element between them; receive blocks in peer
  // order with two spare elements between them (the spares must stay untouched).
  int64_t pos = 0;
  for (int p = w - 1; p >= 0; --p) {
    so[static_cast<size_t>(p)] = pos;
    sc[static_cast<size_t>(p)] = a2a_count(me, p, scale, salt);
    pos += sc[static_cast<size_t>(p)] + 1;
  }
  Buf in(t, pos);
  pos = 0;
  for (int p = 0; p < w; ++p) {
    ro[static_cast<size_t>(p)] = pos;
    rc[static_cast<size_t>(p)] = a2a_count(p, me, scale, salt);
    pos += rc[static_cast<size_t>(p)] + 2;
  }
  Buf out(t, pos);
  auto sent = [&](int from, int to, int64_t j) { return value(t, salt, from * 64 + to, j); };
  for (int p = 0; p < w; ++p)
    for (int64_t j = 0; j < sc[static_cast<size_t>(p)]; ++j) in.set(so[static_cast<size_t>(p)] + j, sent(me, p, j));
  c.all_to_all_v(kCtx, AllToAllVArgs{.in = in.tensor(),
                                     .out = out.tensor(),
                                     .send_counts = sc,
                                     .send_offsets = so,
                                     .recv_counts = rc,
                                     .recv_offsets = ro})
      ->wait(kCtx);
  std::vector<uint8_t> poison(8, kPoisonByte);
  const double poison_value = get(t, poison.data(), 0);
  ck.values(
      out,
      [&](int64_t i) {
        for (int p = 0; p < w; ++p) {
          const int64_t j = i - ro[static_cast<size_t>(p)];
          if (j >= 0 && j < rc[static_cast<size_t>(p)]) return sent(p, me, j);
        }
        return poison_value;  // a spare element
      },
      fmt::format("all_to_all_v {} scale={} on {}", dtype_name(t), scale, c.name()));
}

void check_broadcast(Communicator& c, Checker& ck, DType t, int64_t n, uint64_t salt) {
  for (int root = 0; root < c.size(); ++root) {
    Buf b(t, n);
    for (int64_t i = 0; i < n; ++i) b.set(i, value(t, salt, c.rank(), i));
    c.broadcast(kCtx, b.tensor(), root)->wait(kCtx);
    ck.values(
        b, [&](int64_t i) { return value(t, salt, root, i); },
        fmt::format("broadcast {} n={} root={} on {}", dtype_name(t), n, root, c.name()));
  }
}

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Rank r arrives r·30 ms late; nobody may leave the barrier before the last one arrived. The
// steady clock is CLOCK_MONOTONIC, shared by the processes of one machine.
void check_barrier(Communicator& c, Checker& ck) {
  std::this_thread::sleep_for(std::chrono::milliseconds(30 * c.rank()));
  int64_t times[2] = {now_us(), 0};
  c.barrier(kCtx)->wait(kCtx);
  times[1] = now_us();
  std::vector<int64_t> all(static_cast<size_t>(2 * c.size()));
  c.all_gather(kCtx, Tensor{times, DType::kI64, Device::kCPU, Shape{2}},
               Tensor{all.data(), DType::kI64, Device::kCPU, Shape{2 * c.size()}})
      ->wait(kCtx);
  int64_t last_arrival = 0;
  for (int r = 0; r < c.size(); ++r) last_arrival = std::max(last_arrival, all[static_cast<size_t>(2 * r)]);
  ck.expect(times[1] >= last_arrival, "barrier on {}: left at {} us before the last rank arrived at {} us", c.name(),
            times[1], last_arrival);
}

// Random f32 (not exactly summable): every rank gets the same bits, close to the f64 sum.
void check_all_reduce_bitwise(Communicator& c, Checker& ck, int64_t n) {
  std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
  auto gen = [&](int r, int64_t i) {
    const uint64_t h = mix(static_cast<uint64_t>(r) * 1315423911ull + static_cast<uint64_t>(i));
    return static_cast<float>(static_cast<double>(h >> 11) / 9007199254740992.0 * 2.0 - 1.0) * 3.7f;
  };
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = gen(c.rank(), i);
  c.all_reduce(kCtx, Tensor{x.data(), DType::kF32, Device::kCPU, Shape{n}},
               Tensor{y.data(), DType::kF32, Device::kCPU, Shape{n}})
      ->wait(kCtx);
  std::vector<float> all(static_cast<size_t>(n * c.size()));
  c.all_gather(kCtx, Tensor{y.data(), DType::kF32, Device::kCPU, Shape{n}},
               Tensor{all.data(), DType::kF32, Device::kCPU, Shape{n * c.size()}})
      ->wait(kCtx);
  for (int r = 0; r < c.size(); ++r)
    ck.expect(std::memcmp(all.data() + r * n, y.data(), static_cast<size_t>(n) * 4) == 0,
              "all_reduce f32 on {}: rank {}'s result differs bitwise from this rank's", c.name(), r);
  // Tolerance: each of the size()-1 f32 additions rounds once, by at most 2^-24 of a partial sum
  // whose magnitude is at most Σ_r |x_r|.
  for (int64_t i = 0; i < n; ++i) {
    double exact = 0, mag = 0;
    for (int r = 0; r < c.size(); ++r) {
      exact += gen(r, i);
      mag += std::fabs(gen(r, i));
    }
    const double err = std::fabs(y[static_cast<size_t>(i)] - exact);
    if (err > c.size() * std::ldexp(mag, -24))
      ck.expect(false, "all_reduce f32 on {}: element {} is {}, exact {}", c.name(), i, y[static_cast<size_t>(i)],
                exact);
  }
}

// Every collective on one communicator.
void check_communicator(Communicator& c, Checker& ck, uint64_t salt) {
  const int64_t sizes[] = {1, 2, 3, 7, 64, 1001};
  for (DType t : kDTypes) {
    for (int64_t n : sizes) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) check_all_reduce(c, ck, t, n, op, false, salt + 1);
      check_all_reduce(c, ck, t, n, ReduceOp::kSum, true, salt + 2);
    }
    for (int64_t chunk : {1, 5, 333}) {
      check_reduce_scatter(c, ck, t, chunk, salt + 3);
      check_all_gather(c, ck, t, chunk, false, salt + 4);
      check_all_gather(c, ck, t, chunk, true, salt + 5);
    }
    for (int64_t scale : {1, 3, 50}) check_all_to_all_v(c, ck, t, scale, salt + 6);
    check_broadcast(c, ck, t, 9, salt + 7);
  }
  check_all_reduce(c, ck, DType::kF32, 300007, ReduceOp::kSum, false,
                   salt + 8);  // larger than Gloo's and MPI's segments
  check_all_reduce_bitwise(c, ck, 4099);
  check_barrier(c, ck);
}

// The world ranks of c's members in c's rank order (all_gather of each member's world rank).
std::vector<int64_t> members(Communicator& c, int world_rank) {
  int64_t me = world_rank;
  std::vector<int64_t> all(static_cast<size_t>(c.size()));
  c.all_gather(kCtx, Tensor{&me, DType::kI64, Device::kCPU, Shape{1}},
               Tensor{all.data(), DType::kI64, Device::kCPU, Shape{c.size()}})
      ->wait(kCtx);
  return all;
}

void check_splits(Communicator& world, Checker& ck) {
  // Parity groups ranked by descending world rank (key = -rank).
  auto sub = world.split(world.rank() % 2, -world.rank(), "parity");
  std::vector<int64_t> want;
  for (int r = world.size() - 1; r >= 0; --r)
    if (r % 2 == world.rank() % 2) want.push_back(r);
  ck.expect(members(*sub, world.rank()) == want, "split: parity group members differ");
  ck.expect(sub->size() == static_cast<int>(want.size()), "split: size {} != {}", sub->size(), want.size());
  check_all_reduce(*sub, ck, DType::kF32, 7, ReduceOp::kSum, false, 77);
  check_all_to_all_v(*sub, ck, DType::kI32, 3, 78);

  for (int ep = 1; ep <= world.size(); ++ep) {
    if (world.size() % ep != 0) continue;
    ProcessGrid grid(world, ep);
    // Expected layout computed here, independently of the class: EP innermost.
    std::vector<int64_t> ep_want, dp_want;
    for (int e = 0; e < ep; ++e) ep_want.push_back(world.rank() / ep * ep + e);
    for (int d = 0; d < world.size() / ep; ++d) dp_want.push_back(world.rank() % ep + d * ep);
    ck.expect(members(grid.ep(), world.rank()) == ep_want, "grid ep={}: ep group members differ", ep);
    ck.expect(members(grid.dp(), world.rank()) == dp_want, "grid ep={}: dp group members differ", ep);
    const std::vector<int> ep_group = grid.ep_group(), dp_group = grid.dp_group();
    ck.expect(std::vector<int64_t>(ep_group.begin(), ep_group.end()) == ep_want, "grid ep={}: ep_group()", ep);
    ck.expect(std::vector<int64_t>(dp_group.begin(), dp_group.end()) == dp_want, "grid ep={}: dp_group()", ep);
    ck.expect(grid.ep_rank() == world.rank() % ep && grid.dp_rank() == world.rank() / ep, "grid ep={}: coordinates",
              ep);
    ck.expect(ProcessGrid::rank_of(grid.dp_rank(), grid.ep_rank(), ep) == world.rank(), "grid ep={}: rank_of", ep);
    check_all_reduce(grid.dp(), ck, DType::kBF16, 5, ReduceOp::kSum, false, 90 + static_cast<uint64_t>(ep));
    check_all_reduce(grid.ep(), ck, DType::kF32, 5, ReduceOp::kMax, false, 91 + static_cast<uint64_t>(ep));

    // Collectives in flight on three communicators at once (ZeRO-1's reduce-scatter on dp while the
    // EP exchange and a world reduction run), waited for in reverse order.
    const int64_t chunk = 17;
    Buf rs_in(DType::kF32, chunk * grid.dp().size()), rs_out(DType::kF32, chunk);
    for (int64_t i = 0; i < rs_in.size(); ++i) rs_in.set(i, value(DType::kF32, 5, grid.dp().rank(), i));
    std::vector<int64_t> cnt(static_cast<size_t>(ep), 2), off(static_cast<size_t>(ep));
    for (int e = 0; e < ep; ++e) off[static_cast<size_t>(e)] = 2 * e;
    Buf a_in(DType::kI64, 2 * ep), a_out(DType::kI64, 2 * ep);
    for (int e = 0; e < ep; ++e)
      for (int j = 0; j < 2; ++j) a_in.set(2 * e + j, 1000 * world.rank() + 10 * e + j + 1);
    Buf w_in(DType::kI32, 3), w_out(DType::kI32, 3);
    for (int i = 0; i < 3; ++i) w_in.set(i, world.rank() + i + 1);
    WorkPtr w1 = grid.dp().reduce_scatter(kCtx, rs_in.tensor(), rs_out.tensor());
    WorkPtr w2 = grid.ep().all_to_all_v(kCtx, AllToAllVArgs{.in = a_in.tensor(),
                                                            .out = a_out.tensor(),
                                                            .send_counts = cnt,
                                                            .send_offsets = off,
                                                            .recv_counts = cnt,
                                                            .recv_offsets = off});
    WorkPtr w3 = world.all_reduce(kCtx, w_in.tensor(), w_out.tensor());
    w3->wait(kCtx);
    w2->wait(kCtx);
    w1->wait(kCtx);
    ck.values(
        rs_out,
        [&](int64_t i) {
          double acc = 0;
          for (int d = 0; d < grid.dp().size(); ++d) acc += value(DType::kF32, 5, d, grid.dp().rank() * chunk + i);
          return acc;
        },
        "concurrent reduce_scatter on dp");
    ck.values(
        a_out,
        [&](int64_t i) {
          const int e = static_cast<int>(i / 2);
          return 1000.0 * static_cast<double>(ep_want[static_cast<size_t>(e)]) + 10 * grid.ep_rank() +
                 static_cast<double>(i % 2) + 1;
        },
        "concurrent all_to_all_v on ep");
    ck.values(
        w_out,
        [&](int64_t i) {
          return world.size() * (world.size() - 1) / 2.0 + world.size() * (static_cast<double>(i) + 1);
        },
        "concurrent all_reduce on world");
  }
}

// Bad arguments throw before anything is sent (every rank takes the same path).
void check_argument_errors(Communicator& c, Checker& ck) {
  Buf a(DType::kF32, 4), b(DType::kF32, 5), e(DType::kF8E4M3, 4);
  auto expect_error = [&](auto f, const std::string& needle) {
    try {
      f();
    } catch (const Error& err) {
      ck.expect(std::string(err.what()).find(needle) != std::string::npos, "error '{}' lacks '{}'", err.what(), needle);
      return;
    }
    ck.expect(false, "no error; expected one with '{}'", needle);
  };
  expect_error([&] { c.all_reduce(kCtx, a.tensor(), b.tensor()); },
               "all_reduce on world: in f32[4]@cpu and out f32[5]@cpu");
  expect_error([&] { c.all_reduce(kCtx, e.tensor(), e.tensor()); }, "has dtype f8e4m3");
  expect_error([&] { c.broadcast(kCtx, a.tensor(), c.size()); }, "broadcast on world: root");
  expect_error([&] { c.reduce_scatter(kCtx, a.tensor(), a.tensor()); }, "reduce_scatter on world");
  std::vector<int64_t> z(static_cast<size_t>(c.size()), 0), big(static_cast<size_t>(c.size()), 9);
  expect_error(
      [&] {
        c.all_to_all_v(kCtx, {.in = a.tensor(),
                              .out = b.tensor(),
                              .send_counts = big,
                              .send_offsets = z,
                              .recv_counts = z,
                              .recv_offsets = z});
      },
      "is outside in");
  expect_error([&] { c.split(-1, 0, "x"); }, "color -1");
}

int run_collectives(DistContext& dist) {
  Communicator& world = dist.cpu_world();
  Checker ck(dist.rank());
  check_argument_errors(world, ck);
  check_communicator(world, ck, 100);
  check_splits(world, ck);
  world.barrier(kCtx)->wait(kCtx);
  fmt::print("dist_check: rank {} of {} ({}): {} checks passed\n", dist.rank(), dist.world_size(), world.kind(),
             ck.count());
  return 0;
}

int run_failure(DistContext& dist, const std::string& scenario, int victim) {
  Communicator& world = dist.cpu_world();
  DIFFMOE_CHECK(victim >= 0 && victim < world.size(), "dist_check: victim rank {} is not in the world of {}", victim,
                world.size());
  const int64_t n = scenario == "kill" ? (1 << 20) : 16;
  std::vector<float> x(static_cast<size_t>(n), 1.0f);
  const Tensor t{x.data(), DType::kF32, Device::kCPU, Shape{n}};
  if (scenario == "kill" && dist.rank() == victim) {
    std::thread([] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      ::kill(::getpid(), SIGKILL);
    }).detach();
  }
  if (scenario == "hang" && dist.rank() == victim) std::this_thread::sleep_for(3 * dist.timeout());
  for (int i = 0; i < 2000; ++i) {
    if (scenario == "throw" && dist.rank() == victim && i == 3)
      DIFFMOE_FAIL("injected failure on rank {} before all_reduce {}", victim, i);
    world.all_reduce(kCtx, t, t)->wait(kCtx);
  }
  fmt::print("dist_check: rank {}: the failure scenario '{}' did not fail\n", dist.rank(), scenario);
  return 0;
}

}  // namespace
}  // namespace diffmoe::dist

int main(int argc, char** argv) {
  using namespace diffmoe::dist;
  const std::string scenario = argc > 1 ? argv[1] : "collectives";
  std::unique_ptr<DistContext> dist;
  try {
    dist = DistContext::init(detect_launch());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  try {
    if (scenario == "collectives") return run_collectives(*dist);
    if ((scenario == "throw" || scenario == "kill" || scenario == "hang") && argc > 2)
      return run_failure(*dist, scenario, std::atoi(argv[2]));
    DIFFMOE_FAIL("usage: dist_check collectives | throw R | kill R | hang R");
  } catch (const std::exception& e) {
    dist->fail(e.what());
    return 1;
  }
}
