// device_buffer<T>: an owning cudaMalloc allocation of n elements (none when n == 0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

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

}  // namespace mpopt::cuda
