// device_buffer<T> and pinned_buffer<T>: owning device and page-locked host allocations; checks of device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "../error.hpp"
#include "error.cuh"

namespace mpopt::cuda {

template <class T>
class device_buffer {
  static_assert(std::is_trivially_copyable_v<T>, "device_buffer holds trivially copyable elements only");

 public:
  device_buffer() = default;
  // Throws mpopt::error naming `what` and the byte count when the allocation fails. cudaMalloc aligns to at least
  // 256 bytes, so every buffer suits 16-byte vector access.
  device_buffer(std::size_t n, const std::string& what) : size_(n) {
    if (n == 0) return;
    void* p = nullptr;
    throw_if_cuda_error(cudaMalloc(&p, n * sizeof(T)),
                        "cudaMalloc(" + what + ", " + std::to_string(n * sizeof(T)) + " bytes)");
    data_ = static_cast<T*>(p);
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~device_buffer() { release(); }

  T* get() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t bytes() const noexcept { return size_ * sizeof(T); }

 private:
  void release() noexcept {
    // A destructor cannot report; cudaFree fails only when the context is already gone.
    if (data_ != nullptr) (void)cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// pinned_buffer<T>: an owning cudaHostAlloc allocation of n elements (page-locked host memory, so device copies
// from and to it run asynchronously at full bus speed); none when n == 0.
template <class T>
class pinned_buffer {
  static_assert(std::is_trivially_copyable_v<T>, "pinned_buffer holds trivially copyable elements only");

 public:
  pinned_buffer() = default;
  pinned_buffer(std::size_t n, const std::string& what) : size_(n) {
    if (n == 0) return;
    void* p = nullptr;
    throw_if_cuda_error(cudaHostAlloc(&p, n * sizeof(T), cudaHostAllocDefault),
                        "cudaHostAlloc(" + what + ", " + std::to_string(n * sizeof(T)) + " bytes)");
    data_ = static_cast<T*>(p);
  }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;
  pinned_buffer(pinned_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~pinned_buffer() { release(); }

  T* get() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t bytes() const noexcept { return size_ * sizeof(T); }

 private:
  void release() noexcept {
    if (data_ != nullptr) (void)cudaFreeHost(data_);  // waits for copies still using it
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

namespace detail {

inline std::string pointer_text(const void* p) {
  std::ostringstream os;
  os << p;
  return os.str();
}

// Rejects memory the current device cannot use: plain host memory, or another device's memory.
inline status check_device_pointer(const void* p, const char* name, std::size_t g, int device) {
  const std::string what = "group " + std::to_string(g) + ": " + name + " " + pointer_text(p);
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return status::invalid(what + " is not memory CUDA knows (cudaPointerGetAttributes: " + cudaGetErrorName(err) +
                           ")");
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      if (attr.device != device)
        return status::invalid(what + " is memory of device " + std::to_string(attr.device) +
                               ", but the optimizer is built on device " + std::to_string(device));
      return status::success();
    case cudaMemoryTypeManaged: return status::success();
    case cudaMemoryTypeHost:
      if (attr.devicePointer != p)
        return status::invalid(what + " is pinned host memory that the device sees at another address (" +
                               pointer_text(attr.devicePointer) + "); pass that address");
      return status::success();
    default:
      return status::invalid(what +
                             " is host memory, not device memory: pass device pointers (cudaMalloc, "
                             "cudaMallocManaged, or mapped pinned memory)");
  }
}

}  // namespace detail

}  // namespace mpopt::cuda
