#include "core/arena.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace diffmoe {

namespace {
class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    const size_t rounded = (bytes + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign;
    void* p = std::aligned_alloc(Arena::kAlign, rounded == 0 ? Arena::kAlign : rounded);
    if (p == nullptr)
      throw OutOfMemory(fmt::format("[arena] out of host memory allocating {} bytes", bytes), bytes,
                        fmt::format("{}:{}", __FILE__, __LINE__));
    std::memset(p, 0, rounded);
    return p;
  }
  void deallocate(void* p) override { std::free(p); }
  Device device() const override { return Device::kCPU; }
};
}  // namespace

Allocator& cpu_allocator() {
  static CpuAllocator a;
  return a;
}

Arena::~Arena() {
  if (base_ && alloc_) alloc_->deallocate(base_);
}

Arena::Arena(Arena&& o) noexcept { *this = std::move(o); }

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    if (base_ && alloc_) alloc_->deallocate(base_);
    entries_ = std::move(o.entries_);
    aliases_ = std::move(o.aliases_);
    index_ = std::move(o.index_);
    bytes_ = std::exchange(o.bytes_, 0);
    base_ = std::exchange(o.base_, nullptr);
    alloc_ = std::exchange(o.alloc_, nullptr);
  }
  return *this;
}

size_t Arena::view_bytes(const Shape& shape, DType dtype) {
  const size_t n = static_cast<size_t>(shape.numel()) * dtype_size(dtype);
  return (n + kAlign - 1) / kAlign * kAlign;
}

void Arena::add(std::string name, Shape shape, DType dtype) {
  DIFFMOE_CHECK(base_ == nullptr, "[arena] add('{}') after allocate()", name);
  DIFFMOE_CHECK(!index_.contains(name), "[arena] duplicate view '{}'", name);
  const size_t offset = bytes_;
  size_t n = 0, total = 0;
  // Sizes past the address space are out of memory, however they were asked for.
  if (__builtin_mul_overflow(static_cast<size_t>(shape.numel()), dtype_size(dtype), &n) || n > SIZE_MAX - kAlign ||
      __builtin_add_overflow(bytes_, (n + kAlign - 1) / kAlign * kAlign, &total))
    throw OutOfMemory(fmt::format("[arena] view '{}' of shape {} does not fit in the address space", name, shape.str()),
                      SIZE_MAX);
  bytes_ = total;
  index_.emplace(name, entries_.size());
  entries_.push_back(Entry{std::move(name), shape, dtype, offset});
}

void Arena::pad_to(size_t offset) {
  DIFFMOE_CHECK(base_ == nullptr, "[arena] pad_to() after allocate()");
  DIFFMOE_CHECK(offset >= bytes_ && offset % kAlign == 0,
                "[arena] pad_to({}): below the planned {} bytes or not {}-aligned", offset, bytes_, kAlign);
  bytes_ = offset;
}

void Arena::alias(std::string name, Shape shape, DType dtype, std::string_view of, size_t offset) {
  DIFFMOE_CHECK(base_ == nullptr, "[arena] alias('{}') after allocate()", name);
  DIFFMOE_CHECK(!index_.contains(name), "[arena] duplicate view '{}'", name);
  const auto it = index_.find(std::string(of));
  DIFFMOE_CHECK(it != index_.end() && (it->second & kAliasBit) == 0, "[arena] alias('{}'): no planned view named '{}'",
                name, of);
  const Entry& host = entries_[it->second];
  const size_t room = view_bytes(host.shape, host.dtype);
  DIFFMOE_CHECK(offset % kAlign == 0 && offset <= room && view_bytes(shape, dtype) <= room - offset,
                "[arena] alias('{}') of {} bytes at byte {} does not fit in '{}' ({} bytes)", name,
                view_bytes(shape, dtype), offset, of, room);
  index_.emplace(name, kAliasBit | aliases_.size());
  aliases_.push_back(Entry{std::move(name), shape, dtype, host.offset + offset});
}

void Arena::allocate(Allocator& alloc) {
  DIFFMOE_CHECK(base_ == nullptr, "[arena] allocate() called twice");
  alloc_ = &alloc;
  if (bytes_ > 0) base_ = alloc.allocate(bytes_);
}

bool Arena::has(std::string_view name) const { return index_.contains(std::string(name)); }

Tensor Arena::view(const Entry& e) const {
  DIFFMOE_CHECK(allocated(), "[arena] view '{}' before allocate()", e.name);
  Tensor t;
  t.data = static_cast<char*>(base_) + e.offset;
  t.dtype = e.dtype;
  t.device = device();
  t.shape = e.shape;
  return t;
}

Tensor Arena::flat(size_t first, size_t end) const {
  DIFFMOE_CHECK(allocated(), "[arena] flat() before allocate()");
  DIFFMOE_CHECK(first < end && end <= entries_.size(), "[arena] flat({}, {}) of an arena with {} views", first, end,
                entries_.size());
  const DType dtype = entries_[first].dtype;
  for (size_t i = first; i < end; ++i)
    DIFFMOE_CHECK(entries_[i].dtype == dtype, "[arena] flat(): view '{}' is {}, '{}' is {}", entries_[i].name,
                  dtype_name(entries_[i].dtype), entries_[first].name, dtype_name(dtype));
  // Offsets and sizes are multiples of kAlign: the range ends where the next view starts.
  const size_t begin = entries_[first].offset, stop = end == entries_.size() ? bytes_ : entries_[end].offset;
  Tensor t;
  t.data = static_cast<char*>(base_) + begin;
  t.dtype = dtype;
  t.device = device();
  t.shape = Shape{static_cast<int64_t>((stop - begin) / dtype_size(dtype))};
  return t;
}

Tensor Arena::get(std::string_view name) const {
  auto it = index_.find(std::string(name));
  DIFFMOE_CHECK(it != index_.end(), "[arena] no view named '{}'", name);
  return (it->second & kAliasBit) == 0 ? view(entries_[it->second]) : view(aliases_[it->second & ~kAliasBit]);
}

Device Arena::device() const { return alloc_ ? alloc_->device() : Device::kCPU; }

}  // namespace diffmoe
