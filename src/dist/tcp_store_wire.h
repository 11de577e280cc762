// The rendezvous store's wire format (tcp_store.h has the grammar): building and parsing payloads.
// Shared by the client (tcp_store.cpp) and the server (tcp_store_server.cpp).
#pragma once
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace diffmoe::dist::wire {

enum Command : uint8_t { kSet = 1, kGet = 2, kWait = 3, kAdd = 4, kCheck = 5 };

inline constexpr uint32_t kMaxFrame = (64u << 20) + 8192;  // the largest value plus key and headers

class Writer {
 public:
  explicit Writer(Command c) { buf_.push_back(static_cast<char>(c)); }
  Writer() = default;
  Writer& u8(uint8_t v) {
    buf_.push_back(static_cast<char>(v));
    return *this;
  }
  Writer& u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) buf_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    return *this;
  }
  Writer& i64(int64_t v) {
    const auto u = static_cast<uint64_t>(v);
    for (int i = 0; i < 8; ++i) buf_.push_back(static_cast<char>((u >> (8 * i)) & 0xff));
    return *this;
  }
  Writer& bytes(std::string_view b) {
    u32(static_cast<uint32_t>(b.size()));
    buf_.insert(buf_.end(), b.begin(), b.end());
    return *this;
  }
  Writer& keys(const std::vector<std::string>& ks) {
    u32(static_cast<uint32_t>(ks.size()));
    for (const auto& k : ks) bytes(k);
    return *this;
  }
  const std::vector<char>& payload() const { return buf_; }
  // The payload behind its u32 length: what goes on the wire.
  std::vector<char> frame() const {
    Writer w;
    w.u32(static_cast<uint32_t>(buf_.size()));
    w.buf_.insert(w.buf_.end(), buf_.begin(), buf_.end());
    return std::move(w.buf_);
  }

 private:
  std::vector<char> buf_;
};

// Reads a payload; every getter returns nullopt once the payload runs short (a malformed request).
class Reader {
 public:
  Reader(const char* p, size_t n) : p_(p), n_(n) {}
  std::optional<uint8_t> u8() {
    if (n_ < 1) return std::nullopt;
    const auto v = static_cast<uint8_t>(*p_);
    skip(1);
    return v;
  }
  std::optional<uint32_t> u32() {
    if (n_ < 4) return std::nullopt;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(p_[i])) << (8 * i);
    skip(4);
    return v;
  }
  std::optional<int64_t> i64() {
    if (n_ < 8) return std::nullopt;
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(p_[i])) << (8 * i);
    skip(8);
    return static_cast<int64_t>(v);
  }
  std::optional<std::string> bytes(size_t max) {
    const auto len = u32();
    if (!len || *len > max || *len > n_) return std::nullopt;
    std::string s(p_, *len);
    skip(*len);
    return s;
  }
  bool done() const { return n_ == 0; }

 private:
  void skip(size_t k) {
    p_ += k;
    n_ -= k;
  }
  const char* p_;
  size_t n_;
};

}  // namespace diffmoe::dist::wire
