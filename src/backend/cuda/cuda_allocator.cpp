#include "backend/cuda/cuda_allocator.h"

#include "backend/cuda/cuda_check.h"

namespace diffmoe {

void* CudaAllocator::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes));
  const cudaError_t err = cudaMemset(p, 0, bytes);  // zero-filled like the CPU arenas
  if (err != cudaSuccess) {
    cudaFree(p);
    cuda_fail("cudaMemset(p, 0, bytes)", __FILE__, __LINE__, err);
  }
  return p;
}

void CudaAllocator::deallocate(void* p) {
  if (p != nullptr) (void)cudaFree(p);  // never throws: runs in destructors (see the header)
}

Allocator& cuda_allocator() {
  static CudaAllocator alloc;
  return alloc;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) (void)cudaFree(ptr_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::reserve(size_t bytes) {
  if (bytes <= bytes_) return;
  if (ptr_ != nullptr) {
    CUDA_CHECK(cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
  }
  // Round up to 1 MiB so that slowly growing requests do not reallocate every call.
  constexpr size_t kGranule = size_t{1} << 20;
  const size_t rounded = (bytes + kGranule - 1) / kGranule * kGranule;
  CUDA_CHECK(cudaMalloc(&ptr_, rounded));
  bytes_ = rounded;
}

}  // namespace diffmoe
