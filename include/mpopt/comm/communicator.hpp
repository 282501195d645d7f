// The communicator concept: the collectives ZeRO needs, over a real transport (MPI on host memory, NCCL on device
// memory, or one rank). It is a runtime interface, like NCCL's and MPI's own: the cost of a collective dwarfs a
// virtual call, and one optimizer instantiation then serves every transport and world size.
//
// Every call is collective: all ranks make the same calls in the same order with the same counts.
//   all_reduce(buf, count, type, op)          buf[0, count) <- op over ranks, in place
//   reduce_scatter(send, recv, counts, ...)   send holds sum(counts) elements in rank order; rank r receives the
//                                             reduction of its counts[r] elements in recv
//   all_gather(buf, counts, type)             in place: rank r's counts[r] elements sit at offset
//                                             counts[0] + ... + counts[r-1] of buf; afterwards every rank has all
//   broadcast(buf, count, type, root), barrier()
//   all_to_all_bytes(send, recv, b)           send holds size() blocks of b bytes in rank order; rank r's block j
//                                             goes to rank j, which stores it as block r of recv (send and recv do
//                                             not overlap)
//   all_gather_bytes(buf, b)                  in place: rank r's b bytes at buf + r·b; afterwards every rank has all
// Counts may differ per rank and may be zero (the *_bytes blocks are equal). The *_bytes collectives move bytes
// verbatim, so they take no dtype (the 1-bit compressed allreduce sends packed sign words with their scales).
// Host communicators complete before returning; device communicators (NCCL) are ordered on their stream and return
// at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "../error.hpp"
#include "../numeric/traits.hpp"

namespace mpopt::comm {

enum class memory_space : std::uint8_t { host, device };
enum class reduce_op : std::uint8_t { sum, max };

constexpr std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::fp32: return 4;
    case dtype::fp16: return 2;
    case dtype::bf16: return 2;
    case dtype::fp64: return 8;
  }
  return 0;
}

// Per-rank traffic under the usual ring accounting (as nccl-tests' "bus bytes"): an all-reduce of n elements moves
// 2(W-1)/W·n per rank, a reduce-scatter or all-gather of n elements in total (W-1)/W·n, a broadcast of n (W-1)/W·n,
// an all_to_all_bytes or all_gather_bytes of b bytes per rank (W-1)/W·W·b (a byte counting as an element).
// ZeRO's 2Ψ / 3Ψ figures are in these units with (W-1)/W taken as 1.
struct traffic {
  double elements = 0;  // bus elements, per rank
  double bytes = 0;     // bus bytes, per rank
  std::int64_t calls = 0;
};

class communicator {
 public:
  virtual ~communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual memory_space memory() const = 0;
  virtual std::string name() const = 0;
  // A device communicator's stream (a cudaStream_t; null is the legacy default stream), on which its collectives are
  // ordered: a CUDA optimizer enqueues its kernels there too. Null for host communicators.
  virtual void* device_stream() const { return nullptr; }

  virtual void all_reduce(void* buf, std::size_t count, dtype t, reduce_op op) = 0;
  virtual void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, reduce_op op) = 0;
  virtual void all_gather(void* buf, const std::size_t* counts, dtype t) = 0;
  virtual void broadcast(void* buf, std::size_t count, dtype t, int root) = 0;
  virtual void barrier() = 0;
  virtual void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) = 0;
  virtual void all_gather_bytes(void* buf, std::size_t bytes_per_rank) = 0;

  // What this communicator has moved so far (see `traffic`), for benchmarks and tests of the ZeRO volumes.
  const traffic& traffic_so_far() const noexcept { return traffic_; }
  void reset_traffic() noexcept { traffic_ = {}; }

  // Typed conveniences.
  template <class T>
  void all_reduce(T* buf, std::size_t count, reduce_op op) {
    all_reduce(static_cast<void*>(buf), count, dtype_of<T>::value, op);
  }
  template <class T>
  void reduce_scatter(const T* send, T* recv, const std::vector<std::size_t>& counts, reduce_op op) {
    check_counts(counts, "reduce_scatter");
    reduce_scatter(static_cast<const void*>(send), static_cast<void*>(recv), counts.data(), dtype_of<T>::value, op);
  }
  template <class T>
  void all_gather(T* buf, const std::vector<std::size_t>& counts) {
    check_counts(counts, "all_gather");
    all_gather(static_cast<void*>(buf), counts.data(), dtype_of<T>::value);
  }
  template <class T>
  void broadcast(T* buf, std::size_t count, int root) {
    broadcast(static_cast<void*>(buf), count, dtype_of<T>::value, root);
  }

 protected:
  // Implementations call these once per collective.
  void count_all_reduce(std::size_t n, dtype t) { add_traffic(2.0 * double(n), t); }
  void count_spread(const std::size_t* counts, dtype t) {  // reduce-scatter and all-gather
    add_traffic(double(std::accumulate(counts, counts + size(), std::size_t(0))), t);
  }
  void count_broadcast(std::size_t n, dtype t) { add_traffic(double(n), t); }
  // all_to_all_bytes and all_gather_bytes: size() blocks in total, each rank keeps one; a byte counts as an element.
  void count_bytes_spread(std::size_t bytes_per_rank) { add_traffic(double(bytes_per_rank) * double(size()), 1.0); }
  // Refuses an all-to-all whose total size overflows, or whose send and recv overlap (a block would be overwritten
  // before it is sent). Before anything is counted or moved.
  void check_all_to_all(const void* send, const void* recv, std::size_t bytes_per_rank) const {
    const std::size_t w = std::size_t(size());
    if (bytes_per_rank > SIZE_MAX / w)
      throw error(status::invalid("all_to_all_bytes: bytes_per_rank " + std::to_string(bytes_per_rank) + " times " +
                                  std::to_string(w) + " ranks overflows size_t"));
    const std::uintptr_t s = reinterpret_cast<std::uintptr_t>(send), r = reinterpret_cast<std::uintptr_t>(recv);
    const std::size_t total = bytes_per_rank * w;
    if (total > 0 && s < r + total && r < s + total)
      throw error(status::invalid("all_to_all_bytes: send and recv overlap (" + std::to_string(total) +
                                  " bytes each, " + std::to_string(s > r ? s - r : r - s) + " bytes apart)"));
  }

 private:
  void add_traffic(double n, dtype t) { add_traffic(n, double(dtype_size(t))); }
  void add_traffic(double n, double element_bytes) {
    const int w = size();
    const double share = w > 1 ? double(w - 1) / double(w) : 0.0;
    traffic_.elements += n * share;
    traffic_.bytes += n * share * element_bytes;
    ++traffic_.calls;
  }
  void check_counts(const std::vector<std::size_t>& counts, const char* what) const {
    if (counts.size() != std::size_t(size()))
      throw error(status::invalid(std::string(what) + ": counts has " + std::to_string(counts.size()) +
                                  " entries but the communicator has " + std::to_string(size()) + " ranks"));
  }

  traffic traffic_;
};

// World size 1 on host memory: every collective is a copy or nothing. What the optimizer uses when given no
// communicator.
class single_rank final : public communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  memory_space memory() const override { return memory_space::host; }
  std::string name() const override { return "single-rank"; }

  void all_reduce(void*, std::size_t, dtype, reduce_op) override {}
  void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, reduce_op) override {
    if (counts[0] > 0 && send != recv) std::memmove(recv, send, counts[0] * dtype_size(t));
  }
  void all_gather(void*, const std::size_t*, dtype) override {}
  void broadcast(void*, std::size_t, dtype, int root) override {
    if (root != 0) throw error(status::invalid("broadcast: root " + std::to_string(root) + " on a single rank"));
  }
  void barrier() override {}
  void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) override {
    check_all_to_all(send, recv, bytes_per_rank);
    if (bytes_per_rank > 0) std::memmove(recv, send, bytes_per_rank);
  }
  void all_gather_bytes(void*, std::size_t) override {}
  using communicator::all_gather;
  using communicator::all_reduce;
  using communicator::broadcast;
  using communicator::reduce_scatter;
};

}  // namespace mpopt::comm
