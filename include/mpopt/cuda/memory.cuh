// device_buffer<T>, pinned_buffer<T> and stream_ordered_buffer<T>: owning device, page-locked host and stream-ordered
// device allocations; unique_handle (ordering_event, owned_stream); checks of device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../numeric/traits.hpp"
#include "error.cuh"

namespace mpopt::cuda {

// Where a buffer lives: how it is allocated and freed, and the call named in an allocation error.
struct device_space {
  static constexpr const char* allocator = "cudaMalloc";
  static cudaError_t allocate(void** p, std::size_t bytes) { return cudaMalloc(p, bytes); }
  // cudaFree fails only when the context is already gone.
  static void release(void* p) noexcept { (void)cudaFree(p); }
};
struct pinned_space {  // page-locked host memory: device copies from and to it run asynchronously at full bus speed
  static constexpr const char* allocator = "cudaHostAlloc";
  static cudaError_t allocate(void** p, std::size_t bytes) { return cudaHostAlloc(p, bytes, cudaHostAllocDefault); }
  static void release(void* p) noexcept { (void)cudaFreeHost(p); }  // waits for copies still using it
};

// An owning allocation of n elements in Space (none when n == 0).
template <class T, class Space>
class owning_buffer {
  static_assert(std::is_trivially_copyable_v<T>, "mpopt::cuda buffers hold trivially copyable elements only");

 public:
  owning_buffer() = default;
  // Throws mpopt::error naming `what` and the byte count when the allocation fails. cudaMalloc aligns to at least
  // 256 bytes, so every device buffer suits 16-byte vector access.
  owning_buffer(std::size_t n, const std::string& what) : size_(n) {
    if (n == 0) return;
    void* p = nullptr;
    throw_if_cuda_error(Space::allocate(&p, n * sizeof(T)),
                        std::string(Space::allocator) + "(" + what + ", " + std::to_string(n * sizeof(T)) + " bytes)");
    data_ = static_cast<T*>(p);
  }
  owning_buffer(const owning_buffer&) = delete;
  owning_buffer& operator=(const owning_buffer&) = delete;
  owning_buffer(owning_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  owning_buffer& operator=(owning_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~owning_buffer() { release(); }  // a destructor cannot report a failed free

  T* get() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t bytes() const noexcept { return size_ * sizeof(T); }

 private:
  void release() noexcept {
    if (data_ != nullptr) Space::release(data_);
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

template <class T>
using device_buffer = owning_buffer<T, device_space>;
template <class T>
using pinned_buffer = owning_buffer<T, pinned_space>;

// An owning stream-ordered device allocation (cudaMallocAsync, cudaFreeAsync on one stream): allocating and freeing
// are ordered on that stream like its kernels, and neither waits for the device as cudaMalloc and cudaFree do.
template <class T>
class stream_ordered_buffer {
  static_assert(std::is_trivially_copyable_v<T>, "mpopt::cuda buffers hold trivially copyable elements only");

 public:
  stream_ordered_buffer() = default;
  // Throws mpopt::error naming `what` and the byte count when the allocation cannot be enqueued.
  stream_ordered_buffer(std::size_t n, cudaStream_t stream, const std::string& what) : size_(n), stream_(stream) {
    if (n == 0) return;
    void* p = nullptr;
    throw_if_cuda_error(cudaMallocAsync(&p, n * sizeof(T), stream),
                        "cudaMallocAsync(" + what + ", " + std::to_string(n * sizeof(T)) + " bytes)");
    data_ = static_cast<T*>(p);
  }
  stream_ordered_buffer(const stream_ordered_buffer&) = delete;
  stream_ordered_buffer& operator=(const stream_ordered_buffer&) = delete;
  stream_ordered_buffer(stream_ordered_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), stream_(o.stream_) {}
  stream_ordered_buffer& operator=(stream_ordered_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~stream_ordered_buffer() { release(); }

  T* get() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  // The stream that allocated it and will free it.
  cudaStream_t stream() const noexcept { return stream_; }

 private:
  void release() noexcept {
    if (data_ != nullptr) (void)cudaFreeAsync(data_, stream_);  // fails only when the context is gone
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  cudaStream_t stream_ = nullptr;
};

// The deleter of unique_handle: Destroy is the object's destroy call. Its status is dropped: a destructor cannot
// report it, and these calls fail only when the context is gone.
template <auto Destroy>
struct destroy_with {
  template <class Object>
  void operator()(Object* handle) const noexcept {
    (void)Destroy(handle);
  }
};
// An owning handle of a CUDA runtime or library object. Handle is the library's pointer type (cudaEvent_t,
// cudaStream_t, cublasHandle_t), so get() returns what the library's calls take.
template <class Handle, auto Destroy>
using unique_handle = std::unique_ptr<std::remove_pointer_t<Handle>, destroy_with<Destroy>>;

// An owning CUDA event without timing: it orders work between streams (record on one, wait on another).
using ordering_event = unique_handle<cudaEvent_t, cudaEventDestroy>;
// Throws mpopt::error naming `what` when the event cannot be created.
inline ordering_event make_ordering_event(const std::string& what) {
  cudaEvent_t event = nullptr;
  throw_if_cuda_error(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate (" + what + ")");
  return ordering_event(event);
}

// Destroys a stream after waiting for its work, which may still use buffers freed after the stream.
inline cudaError_t synchronize_and_destroy(cudaStream_t stream) noexcept {
  (void)cudaStreamSynchronize(stream);
  return cudaStreamDestroy(stream);
}
// An owning stream that does not synchronise with the legacy default stream; its destruction waits for its work.
using owned_stream = unique_handle<cudaStream_t, synchronize_and_destroy>;
// Throws mpopt::error naming `what` when the stream cannot be created.
inline owned_stream make_nonblocking_stream(const std::string& what) {
  cudaStream_t stream = nullptr;
  throw_if_cuda_error(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                      "cudaStreamCreateWithFlags (" + what + ")");
  return owned_stream(stream);
}

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

// A group's params and grads (any struct with size, params and grads: mpopt::param_group) are memory `device` can use.
template <class Group>
status check_group_memory(const Group& spec, std::size_t g, int device) {
  if (spec.size == 0) return status::success();
  status s = check_device_pointer(spec.params, "params", g, device);
  if (s.ok() && spec.grads != nullptr) s = check_device_pointer(spec.grads, "grads", g, device);
  return s;
}

// ... and aligned to their element size (the kernels load whole elements).
template <class T>
status check_element_alignment(const T* p, const char* name, std::size_t g) {
  if (p == nullptr || (reinterpret_cast<std::uintptr_t>(p) % sizeof(T)) == 0) return status::success();
  return status::invalid("group " + std::to_string(g) + ": " + name + " " + pointer_text(p) +
                         " is not aligned to its element size (" + std::to_string(sizeof(T)) + " bytes, " +
                         dtype_name<T>() + ")");
}
template <class Group>
status check_group_buffers(const Group& spec, std::size_t g) {
  if (spec.size == 0) return status::success();
  status s = check_element_alignment(spec.params, "params", g);
  if (s.ok()) s = check_element_alignment(spec.grads, "grads", g);
  return s;
}

// Host to device on `stream`, then waits for the stream: from pageable memory the copy may still read `src` after
// cudaMemcpyAsync returns (CUDA promises no staging), and callers free their source next.
inline void copy_to_device(void* dst, const void* src, std::size_t bytes, const char* what, cudaStream_t stream) {
  throw_if_cuda_error(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream),
                      std::string("cudaMemcpyAsync(") + what + ", host to device)");
  throw_if_cuda_error(cudaStreamSynchronize(stream), std::string("cudaStreamSynchronize (writing the ") + what + ")");
}

// A device copy of `v`, landed on return (tables built outside the step), so that a kernel on any stream sees it.
template <class T>
device_buffer<T> upload(const std::vector<T>& v, const std::string& what) {
  device_buffer<T> d(v.size(), what);
  if (!v.empty()) copy_to_device(d.get(), v.data(), d.bytes(), what.c_str(), nullptr);
  return d;
}

// Device to host on `stream`, then waits for the stream.
inline void copy_from_device(void* dst, const void* src, std::size_t bytes, const char* what, cudaStream_t stream) {
  throw_if_cuda_error(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream),
                      std::string("cudaMemcpyAsync(") + what + ", device to host)");
  throw_if_cuda_error(cudaStreamSynchronize(stream), std::string("cudaStreamSynchronize (reading the ") + what + ")");
}

}  // namespace detail

}  // namespace mpopt::cuda
