// The communicator over NCCL, on device memory: ZeRO across GPUs, one rank per GPU. Buffers are device pointers and
// every collective is enqueued on the communicator's stream and returns at once (NCCL's own model: the optimizer's
// kernels on the same stream are ordered with it, and nothing waits on the host). barrier() is the exception: it
// synchronises the stream. CI compiles this header under nvcc against the NCCL headers; it runs only on a GPU machine.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <string>
#include <utility>

#include "../cuda/error.cuh"
#include "communicator.hpp"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 10, 0)
#error "mpopt/comm/nccl.cuh needs NCCL 2.10 or newer (ncclBfloat16)"
#endif

namespace mpopt::comm {

class nccl final : public communicator {
 public:
  // Wraps the caller's communicator; the caller keeps ownership of `c` (and destroys it after this object). The
  // collectives go on `stream` (the legacy default stream if null).
  nccl(ncclComm_t c, cudaStream_t stream) : comm_(c), stream_(stream), owned_(false) { query(); }

  // Creates (and owns: ncclCommDestroy in the destructor) a communicator of `nranks` ranks with this process as
  // `rank`, on the current CUDA device. Collective: every rank constructs with the same `id` (from ncclGetUniqueId
  // on one rank, passed around by the caller).
  nccl(const ncclUniqueId& id, int nranks, int rank, cudaStream_t stream = nullptr) : stream_(stream), owned_(true) {
    check(ncclCommInitRank(&comm_, nranks, id, rank), "ncclCommInitRank");
    try {
      query();
    } catch (...) {
      ncclCommDestroy(comm_);
      throw;
    }
  }

  ~nccl() override {
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (owned_ && comm_ != nullptr) ncclCommDestroy(comm_);
  }
  nccl(const nccl&) = delete;
  nccl& operator=(const nccl&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  memory_space memory() const override { return memory_space::device; }
  std::string name() const override { return "nccl"; }
  ncclComm_t native() const noexcept { return comm_; }
  int device() const noexcept { return device_; }

  // The stream the collectives are enqueued on. Changing it orders nothing: the caller synchronises the old and the
  // new stream as its kernels need.
  cudaStream_t stream() const noexcept { return stream_; }
  void set_stream(cudaStream_t s) noexcept { stream_ = s; }
  void* device_stream() const override { return stream_; }

  void all_reduce(void* buf, std::size_t count, dtype t, reduce_op op) override {
    count_all_reduce(count, t);
    if (count == 0) return;
    check(ncclAllReduce(buf, buf, count, to_nccl(t), to_nccl(op), comm_, stream_), "ncclAllReduce");
  }

  // `recv` is disjoint from `send`, or is send at this rank's offset (in place).
  void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, reduce_op op) override {
    count_spread(counts, t);
    const auto [total, equal] = summarize(counts);
    if (total == 0) return;
    if (equal) {
      check(ncclReduceScatter(send, recv, counts[0], to_nccl(t), to_nccl(op), comm_, stream_), "ncclReduceScatter");
      return;
    }
    // Uneven shards: one reduce per rank onto that rank, fused into one launch by the group. recv is only written on
    // the root of each reduce.
    const std::size_t es = dtype_size(t);
    const auto* bytes = static_cast<const unsigned char*>(send);
    group([&]() -> group_result {
      std::size_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        if (counts[r] > 0) {
          const ncclResult_t rc =
              ncclReduce(bytes + offset * es, recv, counts[r], to_nccl(t), to_nccl(op), r, comm_, stream_);
          if (rc != ncclSuccess) return {rc, "ncclReduce"};
        }
        offset += counts[r];
      }
      return {ncclSuccess, ""};
    });
  }

  void all_gather(void* buf, const std::size_t* counts, dtype t) override {
    count_spread(counts, t);
    const auto [total, equal] = summarize(counts);
    if (total == 0) return;
    const std::size_t es = dtype_size(t);
    auto* bytes = static_cast<unsigned char*>(buf);
    if (equal) {
      // In place as NCCL defines it: this rank's part at buf + rank * count.
      check(ncclAllGather(bytes + std::size_t(rank_) * counts[0] * es, buf, counts[0], to_nccl(t), comm_, stream_),
            "ncclAllGather");
      return;
    }
    // Uneven shards: each rank broadcasts its part, in place at its offset.
    group([&]() -> group_result {
      std::size_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        if (counts[r] > 0) {
          unsigned char* part = bytes + offset * es;
          const ncclResult_t rc = ncclBroadcast(part, part, counts[r], to_nccl(t), r, comm_, stream_);
          if (rc != ncclSuccess) return {rc, "ncclBroadcast"};
        }
        offset += counts[r];
      }
      return {ncclSuccess, ""};
    });
  }

  void broadcast(void* buf, std::size_t count, dtype t, int root) override {
    if (root < 0 || root >= size_)
      throw error(status::invalid("broadcast: root " + std::to_string(root) + " outside the " + std::to_string(size_) +
                                  " ranks"));
    count_broadcast(count, t);
    if (count == 0) return;
    check(ncclBroadcast(buf, buf, count, to_nccl(t), root, comm_, stream_), "ncclBroadcast");
  }

  // Grouped point-to-point (one ncclSend and one ncclRecv per peer, fused into one launch); this rank's own block is a
  // device copy on the stream.
  void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) override {
    check_all_to_all(send, recv, bytes_per_rank);
    count_bytes_spread(bytes_per_rank);
    if (bytes_per_rank == 0) return;
    const auto* from = static_cast<const unsigned char*>(send);
    auto* to = static_cast<unsigned char*>(recv);
    const std::size_t own = std::size_t(rank_) * bytes_per_rank;
    cuda::throw_if_cuda_error(cudaMemcpyAsync(to + own, from + own, bytes_per_rank, cudaMemcpyDeviceToDevice, stream_),
                              "cudaMemcpyAsync(all_to_all_bytes, own block)");
    group([&]() -> group_result {
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        const std::size_t at = std::size_t(r) * bytes_per_rank;
        ncclResult_t rc = ncclSend(from + at, bytes_per_rank, ncclUint8, r, comm_, stream_);
        if (rc != ncclSuccess) return {rc, "ncclSend"};
        rc = ncclRecv(to + at, bytes_per_rank, ncclUint8, r, comm_, stream_);
        if (rc != ncclSuccess) return {rc, "ncclRecv"};
      }
      return {ncclSuccess, ""};
    });
  }

  void all_gather_bytes(void* buf, std::size_t bytes_per_rank) override {
    count_bytes_spread(bytes_per_rank);
    if (bytes_per_rank == 0) return;
    auto* bytes = static_cast<unsigned char*>(buf);
    check(ncclAllGather(bytes + std::size_t(rank_) * bytes_per_rank, buf, bytes_per_rank, ncclUint8, comm_, stream_),
          "ncclAllGather");
  }

  // An all-reduce of one int, then cudaStreamSynchronize: on return every rank has reached the barrier and this
  // rank's stream has drained (the only call here that blocks the host).
  void barrier() override {
    if (scratch_ == nullptr) {
      int current = 0;
      cuda::throw_if_cuda_error(cudaGetDevice(&current), "cudaGetDevice");
      if (current != device_) cuda::throw_if_cuda_error(cudaSetDevice(device_), "cudaSetDevice");
      const cudaError_t err = cudaMalloc(&scratch_, sizeof(int));
      if (current != device_) (void)cudaSetDevice(current);
      if (err != cudaSuccess) scratch_ = nullptr;
      cuda::throw_if_cuda_error(err, "cudaMalloc(nccl barrier scratch, 4 bytes)");
      cuda::throw_if_cuda_error(cudaMemsetAsync(scratch_, 0, sizeof(int), stream_), "cudaMemsetAsync");
    }
    check(ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_), "ncclAllReduce(barrier)");
    cuda::throw_if_cuda_error(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(nccl barrier)");
  }

  using communicator::all_gather;
  using communicator::all_reduce;
  using communicator::broadcast;
  using communicator::reduce_scatter;

 private:
  // The total of the per-rank counts, and whether they are all equal (then one native collective does it).
  std::pair<std::size_t, bool> summarize(const std::size_t* counts) const {
    std::size_t total = 0;
    bool equal = true;
    for (int r = 0; r < size_; ++r) {
      total += counts[r];
      equal = equal && counts[r] == counts[0];
    }
    return {total, equal};
  }
  static void check(ncclResult_t rc, const char* what) {
    if (rc == ncclSuccess) return;
    throw error(status{errc::unsupported, std::string(what) + " failed: " + ncclGetErrorString(rc)});
  }

  // Runs `enqueue` (which returns {result, call name} of its first failure) between ncclGroupStart and ncclGroupEnd;
  // the group is closed even when an enqueue failed.
  using group_result = std::pair<ncclResult_t, const char*>;
  template <class F>
  static void group(F&& enqueue) {
    check(ncclGroupStart(), "ncclGroupStart");
    const group_result first = enqueue();
    const ncclResult_t end = ncclGroupEnd();
    check(first.first, first.second);
    check(end, "ncclGroupEnd");
  }

  void query() {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
    check(ncclCommCuDevice(comm_, &device_), "ncclCommCuDevice");
  }

  // NCCL reduces in all four types, 16-bit ones included.
  static ncclDataType_t to_nccl(dtype t) {
    switch (t) {
      case dtype::fp32: return ncclFloat32;
      case dtype::fp16: return ncclFloat16;
      case dtype::bf16: return ncclBfloat16;
      case dtype::fp64: return ncclFloat64;
    }
    throw error(status{errc::unsupported, "nccl: unknown dtype"});
  }
  static ncclRedOp_t to_nccl(reduce_op op) { return op == reduce_op::sum ? ncclSum : ncclMax; }

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owned_ = false;
  int rank_ = 0, size_ = 1, device_ = 0;
  int* scratch_ = nullptr;  // barrier's device int, allocated on first use
};

}  // namespace mpopt::comm
