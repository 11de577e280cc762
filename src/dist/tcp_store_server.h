// The server side of the rendezvous store (tcp_store.h): one thread polling the listening socket
// and every client; requests are answered in arrival order, a get or wait whose keys are missing is
// parked until a set provides them (or its client disconnects). The server has no timeouts of its
// own: clients time out. It never throws out of its thread: a client that breaks the protocol or
// the connection is dropped.
#pragma once
#include <map>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "dist/socket_util.h"

namespace diffmoe::dist {

class StoreServer {
 public:
  // Listens on `port` (0: a free one); throws naming the port when it cannot (e.g. in use).
  StoreServer(int port, const std::string& what);
  ~StoreServer();  // stops the thread and closes every connection
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;
  int port() const { return port_; }

 private:
  struct Client {
    Socket sock;
    std::vector<char> in;  // bytes received, not yet a whole frame
  };
  struct Waiter {
    int fd;
    uint8_t command;  // get or wait
    std::vector<std::string> keys;
  };

  void run();
  void accept_client();
  bool read_client(Client& c);                         // false: drop the client
  bool handle(int fd, const char* payload, size_t n);  // false: malformed
  bool has_all(const std::vector<std::string>& keys) const;
  void reply(int fd, const std::vector<char>& payload);
  void answer_waiter(const Waiter& w);
  void wake_waiters();
  void drop(int fd);

  Socket listen_;
  int port_ = 0;
  int wake_read_ = -1;
  int wake_write_ = -1;
  std::thread thread_;
  std::map<int, Client> clients_;
  std::vector<Waiter> waiters_;
  std::vector<int> dead_;  // clients whose reply failed, dropped after the current pass
  std::unordered_map<std::string, std::vector<char>> data_;
};

}  // namespace diffmoe::dist
