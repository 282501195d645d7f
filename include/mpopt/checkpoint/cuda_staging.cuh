// What the checkpoints of the CUDA optimizers (checkpoint/cuda.cuh, checkpoint/cuda_onebit.cuh) share: host copies of
// device buffers, and a host-memory communicator over a device one, so that a host optimizer mirroring a CUDA one on
// every rank can run checkpoint.hpp's collective save and load.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <numeric>
#include <string>
#include <vector>

#include "../comm/communicator.hpp"
#include "../cuda/error.cuh"
#include "../cuda/memory.cuh"

namespace mpopt::checkpoint::detail {

// n elements of device memory, copied on `stream` (waited for).
template <class T>
std::vector<T> device_to_host(const T* device, std::size_t n, const char* what, cudaStream_t stream) {
  std::vector<T> v(n);
  if (n > 0)
    cuda::detail::copy_from_device(v.data(), device, n * sizeof(T), (std::string("checkpoint: ") + what).c_str(),
                                   stream);
  return v;
}

// n elements to device memory on `stream` (waited for).
template <class T>
void host_to_device(T* device, const T* host, std::size_t n, const char* what, cudaStream_t stream) {
  if (n > 0)
    cuda::detail::copy_to_device(device, host, n * sizeof(T), (std::string("checkpoint: ") + what).c_str(), stream);
}

// A host-memory communicator over a device one: every collective copies its host buffers to device scratch, runs
// there on the device communicator's stream, copies back and waits. For the few small or one-off collectives of a
// checkpoint, not for a training step.
class staged_host_comm final : public comm::communicator {
 public:
  explicit staged_host_comm(comm::communicator& device) : device_(device) {}
  int rank() const override { return device_.rank(); }
  int size() const override { return device_.size(); }
  comm::memory_space memory() const override { return comm::memory_space::host; }
  std::string name() const override { return "host staging over " + device_.name(); }

  void all_reduce(void* buf, std::size_t count, dtype t, comm::reduce_op op) override {
    scratch d(count * comm::dtype_size(t), buf, stream());
    device_.all_reduce(d.get(), count, t, op);
    d.back(buf);
  }
  void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, comm::reduce_op op) override {
    const std::size_t es = comm::dtype_size(t), total = std::accumulate(counts, counts + size(), std::size_t(0));
    scratch in(total * es, send, stream()), out(counts[rank()] * es, nullptr, stream());
    device_.reduce_scatter(in.get(), out.get(), counts, t, op);
    out.back(recv);
  }
  void all_gather(void* buf, const std::size_t* counts, dtype t) override {
    scratch d(std::accumulate(counts, counts + size(), std::size_t(0)) * comm::dtype_size(t), buf, stream());
    device_.all_gather(d.get(), counts, t);
    d.back(buf);
  }
  void broadcast(void* buf, std::size_t count, dtype t, int root) override {
    scratch d(count * comm::dtype_size(t), buf, stream());
    device_.broadcast(d.get(), count, t, root);
    d.back(buf);
  }
  void barrier() override { device_.barrier(); }
  void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) override {
    check_all_to_all(send, recv, bytes_per_rank);
    const std::size_t total = bytes_per_rank * std::size_t(size());
    scratch in(total, send, stream()), out(total, nullptr, stream());
    device_.all_to_all_bytes(in.get(), out.get(), bytes_per_rank);
    out.back(recv);
  }
  void all_gather_bytes(void* buf, std::size_t bytes_per_rank) override {
    scratch d(bytes_per_rank * std::size_t(size()), buf, stream());
    device_.all_gather_bytes(d.get(), bytes_per_rank);
    d.back(buf);
  }
  using communicator::all_gather;
  using communicator::all_reduce;
  using communicator::broadcast;
  using communicator::reduce_scatter;

 private:
  cudaStream_t stream() const { return static_cast<cudaStream_t>(device_.device_stream()); }

  // `bytes` of device memory holding a copy of `from` (unless null), in the device communicator's stream order.
  class scratch {
   public:
    scratch(std::size_t bytes, const void* from, cudaStream_t stream)
        : data_(bytes, "checkpoint collective scratch"), stream_(stream) {
      if (from != nullptr && bytes > 0)
        cuda::throw_if_cuda_error(cudaMemcpyAsync(data_.get(), from, bytes, cudaMemcpyHostToDevice, stream_),
                                  "checkpoint: cudaMemcpyAsync(collective input, host to device)");
    }
    void* get() const noexcept { return data_.get(); }
    // Copies the result to `to` and waits for it.
    void back(void* to) const {
      if (data_.size() > 0)
        cuda::throw_if_cuda_error(cudaMemcpyAsync(to, data_.get(), data_.size(), cudaMemcpyDeviceToHost, stream_),
                                  "checkpoint: cudaMemcpyAsync(collective result, device to host)");
      cuda::throw_if_cuda_error(cudaStreamSynchronize(stream_), "checkpoint: cudaStreamSynchronize (collective)");
    }

   private:
    cuda::device_buffer<unsigned char> data_;
    cudaStream_t stream_;
  };

  comm::communicator& device_;
};

}  // namespace mpopt::checkpoint::detail
