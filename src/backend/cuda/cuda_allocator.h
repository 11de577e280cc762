// Device memory for the CUDA backend: the arena allocator (core/arena.h interface, Device::kCUDA)
// and a small RAII buffer for the backend's own workspaces. Both use plain cudaMalloc/cudaFree
// (device/README.md: no managed memory).
#pragma once
#include <cstddef>

#include "core/arena.h"

namespace diffmoe {

// cudaMalloc'ed, zero-filled (cudaMemset, synchronous) like the CPU arenas; 256-byte aligned by
// cudaMalloc's guarantee. deallocate() never throws (it runs in destructors): a failing cudaFree
// at process exit, after the runtime is torn down, is ignored.
class CudaAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override;
  void deallocate(void* p) override;
  Device device() const override { return Device::kCUDA; }
};

// The process-wide CUDA allocator (a function-local static, so arenas may outlive a backend).
Allocator& cuda_allocator();

// An owned device allocation that can grow; moving transfers ownership.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { reserve(bytes); }
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;

  // Ensures at least `bytes`; a larger request frees the old block (cudaFree waits for the device,
  // so no kernel still uses it) and allocates anew. Contents are not kept.
  void reserve(size_t bytes);
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace diffmoe
