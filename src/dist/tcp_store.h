// The rendezvous store of a torchrun-style launch (launch.h, Transport::kStore): a small key-value
// store on MASTER_ADDR:MASTER_PORT, served by rank 0 from a thread, every rank (rank 0 included) a
// client. Rendezvous only (Gloo's connection addresses, the NCCL unique id, split groups), never
// bulk data, like torch's TCPStore. Its operations have the shape gloo::rendezvous::Store expects
// (gloo_communicator.cpp adapts it): set, get (waits for the key), wait (for keys), plus add (an
// atomic counter) and check (are the keys there, without waiting).
//
// Wire format (one frame per request and per reply): u32 payload length, payload; integers little
// endian. Request payload: u8 command, then
//   set: str key, bytes value -> reply empty      get: str key -> reply bytes (sent once the key is set)
//   wait: u32 n, n str keys -> reply empty (once all are set)   add: str key, i64 delta -> reply i64
//   check: u32 n, n str keys -> reply u8 (1 when all are set)
// where str and bytes are a u32 length then the bytes. add stores its counter as 8 bytes (i64).
// A malformed request closes that client's connection; keys up to kMaxKey bytes, values kMaxValue.
//
// Failures throw Error naming the store, this rank and the key: the connection could not be made
// before the timeout (rank 0 not up, wrong MASTER_ADDR/PORT), the server closed the connection
// (rank 0 exited), or get/wait timed out (a rank did not reach the rendezvous).
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dist/socket_util.h"

namespace diffmoe::dist {

class StoreServer;

struct TcpStoreOptions {
  std::string host;                            // where the server is (clients connect there)
  int port = 0;                                // its port; with serve, 0 picks a free one (port() tells which)
  bool serve = false;                          // this process serves the store (rank 0)
  std::chrono::milliseconds timeout{300'000};  // connecting, get and wait
  int rank = 0;                                // for messages
};

class TcpStore {
 public:
  static constexpr size_t kMaxKey = 4096;
  static constexpr size_t kMaxValue = 64u << 20;

  explicit TcpStore(const TcpStoreOptions& opt);
  ~TcpStore();
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  void set(const std::string& key, const std::vector<char>& value);
  std::vector<char> get(const std::string& key);  // waits for the key up to timeout()
  std::vector<char> get(const std::string& key, std::chrono::milliseconds timeout);
  void wait(const std::vector<std::string>& keys);  // up to timeout()
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  int64_t add(const std::string& key, int64_t delta);  // returns the new value
  bool check(const std::vector<std::string>& keys);

  int port() const { return port_; }
  const std::string& host() const { return host_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  std::string describe() const;  // "rendezvous store 127.0.0.1:29500"

 private:
  std::vector<char> request(const std::vector<char>& payload, std::chrono::milliseconds timeout,
                            const std::string& what);

  std::string host_;
  int port_ = 0;
  std::chrono::milliseconds timeout_;
  int rank_ = 0;
  std::unique_ptr<StoreServer> server_;  // rank 0 only; started before the client connects
  std::mutex mu_;                        // one request at a time on the connection
  Socket conn_;
  bool broken_ = false;  // a timed-out reply may still arrive: the connection is not reused
};

}  // namespace diffmoe::dist
