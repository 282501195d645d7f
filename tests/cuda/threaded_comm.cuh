// Test scaffolding, not a transport: W ranks as W host threads on ONE GPU, so that code needing a device-memory
// communicator (the CUDA optimizer's ZeRO stages) runs at world sizes 2-4 on a machine with one GPU, where NCCL
// refuses two ranks. Simple rather than fast: every collective blocks the host.
//
// Each call, on each rank:
//   1. cudaStreamSynchronize(own stream): this rank's inputs are ready;
//   2. post (pointers, counts) in the world's slot for this rank; host barrier;
//   3. read the peers' device buffers directly (same device) and write only what no peer reads: reductions land in
//      this rank's scratch (a kernel summing in rank order 0..W-1, so every rank gets the same bits), copies land in
//      the parts of this rank's output that no peer reads; cudaStreamSynchronize; host barrier (nobody reads a peer
//      any more);
//   4. copy the scratch into this rank's output (reductions only); cudaStreamSynchronize.
// 16-bit types are reduced in float and rounded once with mpopt::convert; fp32 and fp64 in their own type. max is
// fmax (a NaN loses to a number; not checked against NCCL). Traffic is counted as mpopt::comm::nccl counts it.
//
// run_ranks(W, fn) runs fn(rank, comm) on W threads and rethrows the first failure on the caller. A rank that throws
// (or returns while its peers wait in a collective) aborts the world: the waiting ranks throw instead of hanging.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "mpopt/comm/communicator.hpp"
#include "mpopt/cuda/error.cuh"
#include "mpopt/cuda/memory.cuh"
#include "mpopt/error.hpp"
#include "mpopt/numeric/convert.hpp"

namespace mpopt_test {

using mpopt::dtype;
using mpopt::comm::reduce_op;

// What a rank posts for a collective: what it calls with, and the buffer its peers read.
struct threaded_post {
  std::string call;
  const void* in = nullptr;
  std::size_t count = 0;  // elements (all_reduce, broadcast) or bytes per rank (*_bytes)
  std::vector<std::size_t> counts;
  dtype type = dtype::fp32;
  reduce_op op = reduce_op::sum;
  int root = -1;
};

// The state the W ranks share: one slot per rank and an abortable host barrier.
class threaded_world {
 public:
  static constexpr int max_ranks = 16;  // the reduction kernel takes the ranks' pointers by value

  explicit threaded_world(int world) : size_(world) {
    if (world < 1 || world > max_ranks)
      throw mpopt::error(mpopt::status::invalid("threaded_world: world " + std::to_string(world) + " outside [1, " +
                                                std::to_string(max_ranks) + "]"));
    slots_.resize(static_cast<std::size_t>(world));
  }
  threaded_world(const threaded_world&) = delete;
  threaded_world& operator=(const threaded_world&) = delete;

  int size() const noexcept { return size_; }

  // Written by its own rank before a barrier, read by every rank between that barrier and the next: the barrier's
  // mutex orders the writes before the reads.
  threaded_post& slot(int rank) { return slots_[std::size_t(rank)]; }
  const threaded_post& slot(int rank) const { return slots_[std::size_t(rank)]; }

  // Every rank waits here until all have arrived. Throws if the world was aborted before or during the wait, or if
  // a rank has already returned (the barrier could never complete).
  void wait(int rank, const std::string& call) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!failed_ && departed_ > 0)
      fail_locked(rank, std::to_string(departed_) + " rank(s) returned while rank " + std::to_string(rank) +
                            " entered " + call + ": the ranks made different collective calls");
    if (failed_) throw aborted(rank, call);
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || failed_; });
    if (generation_ == generation) throw aborted(rank, call);
  }

  // Marks the world failed (the first reason is kept) and wakes every waiter.
  void abort(int rank, const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    fail_locked(rank, why);
  }

  // Rank `rank` has finished its work: a peer still waiting in a barrier (or entering one later) cannot complete.
  void leave(int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++departed_;
    if (arrived_ > 0)
      fail_locked(rank, "rank " + std::to_string(rank) + " returned while " + std::to_string(arrived_) +
                            " rank(s) wait in a collective: the ranks made different collective calls");
  }

  // The rank that aborted the world first, or -1.
  int first_failed_rank() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return first_failed_;
  }

 private:
  void fail_locked(int rank, const std::string& why) {
    if (!failed_) {
      failed_ = true;
      first_failed_ = rank;
      why_ = why;
    }
    cv_.notify_all();
  }
  mpopt::error aborted(int rank, const std::string& call) const {
    return mpopt::error(mpopt::status{mpopt::errc::unsupported, "threaded_device_comm::" + call + " (rank " +
                                                                    std::to_string(rank) +
                                                                    "): the world was aborted by rank " +
                                                                    std::to_string(first_failed_) + ": " + why_});
  }

  int size_;
  std::vector<threaded_post> slots_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  int departed_ = 0;
  bool failed_ = false;
  int first_failed_ = -1;
  std::string why_;
};

namespace threaded_detail {

struct rank_inputs {
  const void* p[threaded_world::max_ranks];
};

template <class T>
using reduce_accum_t = std::conditional_t<mpopt::is_16bit_v<T>, float, T>;

template <class A>
__device__ A reduce_max(A a, A b) {
  if constexpr (std::is_same_v<A, float>) {
    return fmaxf(a, b);
  } else {
    return fmax(a, b);
  }
}

// out[i] = op over ranks 0..world-1 of in.p[r][i], accumulated in rank order.
template <class T>
__global__ void reduce_ranks(rank_inputs in, int world, T* out, std::size_t n, bool take_max) {
  using A = reduce_accum_t<T>;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    A acc = mpopt::convert<A>(static_cast<const T*>(in.p[0])[i]);
    for (int r = 1; r < world; ++r) {
      const A x = mpopt::convert<A>(static_cast<const T*>(in.p[r])[i]);
      acc = take_max ? reduce_max(acc, x) : acc + x;
    }
    out[i] = mpopt::convert<T>(acc);
  }
}

template <class T>
struct type_tag {
  using type = T;
};

template <class F>
void dispatch_dtype(dtype t, F&& f) {
  switch (t) {
    case dtype::fp32: f(type_tag<float>{}); return;
    case dtype::fp64: f(type_tag<double>{}); return;
    case dtype::fp16: f(type_tag<mpopt::half_t>{}); return;
    case dtype::bf16: f(type_tag<mpopt::bf16_t>{}); return;
  }
  throw mpopt::error(mpopt::status::invalid("threaded_device_comm: unknown dtype " + std::to_string(int(t))));
}

}  // namespace threaded_detail

// One rank of a threaded_world, on the current device (the same device for every rank).
class threaded_device_comm final : public mpopt::comm::communicator {
 public:
  // `stream`: the stream this rank's collectives are ordered on; null creates one, destroyed with this object.
  threaded_device_comm(threaded_world& world, int rank, cudaStream_t stream = nullptr)
      : world_(world), rank_(rank), stream_(stream), owns_stream_(stream == nullptr) {
    if (rank < 0 || rank >= world.size())
      throw mpopt::error(mpopt::status::invalid("threaded_device_comm: rank " + std::to_string(rank) + " outside the " +
                                                std::to_string(world.size()) + " ranks"));
    if (owns_stream_) cuda_check(cudaStreamCreate(&stream_), "constructor", "cudaStreamCreate");
  }
  ~threaded_device_comm() override {
    if (owns_stream_) (void)cudaStreamDestroy(stream_);
  }
  threaded_device_comm(const threaded_device_comm&) = delete;
  threaded_device_comm& operator=(const threaded_device_comm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return world_.size(); }
  mpopt::comm::memory_space memory() const override { return mpopt::comm::memory_space::device; }
  std::string name() const override { return "threaded-device"; }
  cudaStream_t stream() const noexcept { return stream_; }
  void* device_stream() const override { return stream_; }

  void all_reduce(void* buf, std::size_t count, dtype t, reduce_op op) override {
    require(count == 0 || buf != nullptr, "all_reduce", "buf is null with count " + std::to_string(count));
    count_all_reduce(count, t);
    if (count == 0) return;
    const std::size_t bytes = count * mpopt::comm::dtype_size(t);
    threaded_post p;
    p.call = "all_reduce";
    p.in = buf;
    p.count = count;
    p.type = t;
    p.op = op;
    collective(
        p, [&] { reduce_into_scratch(p, 0, count); },
        [&] { copy(buf, scratch_.get(), bytes, p.call, "scratch to buf"); });
  }

  // `recv` is disjoint from `send`, or is send at this rank's offset (in place).
  void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, reduce_op op) override {
    require(counts != nullptr, "reduce_scatter", "counts is null");
    const std::size_t es = mpopt::comm::dtype_size(t);
    const std::size_t total = sum(counts), offset = offset_of(counts, rank_), mine = counts[rank_];
    require(total == 0 || send != nullptr, "reduce_scatter",
            "send is null with " + std::to_string(total) + " elements");
    require(mine == 0 || recv != nullptr, "reduce_scatter", "recv is null with " + std::to_string(mine) + " elements");
    if (mine > 0) {
      const auto s = reinterpret_cast<std::uintptr_t>(send), r = reinterpret_cast<std::uintptr_t>(recv);
      const bool overlap = r < s + total * es && s < r + mine * es;
      require(!overlap || r == s + offset * es, "reduce_scatter",
              "recv overlaps send but is not send at this rank's offset (" + std::to_string(offset) + " elements)");
    }
    count_spread(counts, t);
    if (total == 0) return;
    threaded_post p;
    p.call = "reduce_scatter";
    p.in = send;
    p.counts.assign(counts, counts + size());
    p.type = t;
    p.op = op;
    collective(
        p, [&] { reduce_into_scratch(p, offset, mine); },
        [&] { copy(recv, scratch_.get(), mine * es, p.call, "scratch to recv"); });
  }

  void all_gather(void* buf, const std::size_t* counts, dtype t) override {
    require(counts != nullptr, "all_gather", "counts is null");
    const std::size_t total = sum(counts);
    require(total == 0 || buf != nullptr, "all_gather", "buf is null with " + std::to_string(total) + " elements");
    count_spread(counts, t);
    if (total == 0) return;
    const std::size_t es = mpopt::comm::dtype_size(t);
    threaded_post p;
    p.call = "all_gather";
    p.in = buf;
    p.counts.assign(counts, counts + size());
    p.type = t;
    // Peers read only this rank's own part of buf; this rank writes only the others' parts.
    collective(
        p,
        [&] {
          for (int r = 0; r < size(); ++r) {
            if (r == rank_ || counts[r] == 0) continue;
            const std::size_t at = offset_of(counts, r) * es;
            copy(static_cast<unsigned char*>(buf) + at, static_cast<const unsigned char*>(world_.slot(r).in) + at,
                 counts[r] * es, p.call, "part of rank " + std::to_string(r));
          }
        },
        [] {});
  }

  void broadcast(void* buf, std::size_t count, dtype t, int root) override {
    if (root < 0 || root >= size())
      throw mpopt::error(mpopt::status::invalid("broadcast: root " + std::to_string(root) + " outside the " +
                                                std::to_string(size()) + " ranks"));
    require(count == 0 || buf != nullptr, "broadcast", "buf is null with count " + std::to_string(count));
    count_broadcast(count, t);
    if (count == 0) return;
    threaded_post p;
    p.call = "broadcast";
    p.in = buf;
    p.count = count;
    p.type = t;
    p.root = root;
    // The root's buf is only read.
    collective(
        p,
        [&] {
          if (rank_ != root)
            copy(buf, world_.slot(root).in, count * mpopt::comm::dtype_size(t), p.call,
                 "from root " + std::to_string(root));
        },
        [] {});
  }

  // Every rank has reached the barrier and this rank's stream has drained.
  void barrier() override {
    threaded_post p;
    p.call = "barrier";
    collective(
        p, [] {}, [] {});
  }

  void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) override {
    check_all_to_all(send, recv, bytes_per_rank);
    require(bytes_per_rank == 0 || (send != nullptr && recv != nullptr), "all_to_all_bytes",
            "send or recv is null with " + std::to_string(bytes_per_rank) + " bytes per rank");
    count_bytes_spread(bytes_per_rank);
    if (bytes_per_rank == 0) return;
    threaded_post p;
    p.call = "all_to_all_bytes";
    p.in = send;
    p.count = bytes_per_rank;
    // Sends are only read; recv is written only by its own rank.
    collective(
        p,
        [&] {
          const std::size_t mine = std::size_t(rank_) * bytes_per_rank;
          for (int r = 0; r < size(); ++r)
            copy(static_cast<unsigned char*>(recv) + std::size_t(r) * bytes_per_rank,
                 static_cast<const unsigned char*>(world_.slot(r).in) + mine, bytes_per_rank, p.call,
                 "block from rank " + std::to_string(r));
        },
        [] {});
  }

  void all_gather_bytes(void* buf, std::size_t bytes_per_rank) override {
    require(bytes_per_rank == 0 || buf != nullptr, "all_gather_bytes",
            "buf is null with " + std::to_string(bytes_per_rank) + " bytes per rank");
    count_bytes_spread(bytes_per_rank);
    if (bytes_per_rank == 0) return;
    threaded_post p;
    p.call = "all_gather_bytes";
    p.in = buf;
    p.count = bytes_per_rank;
    // As all_gather: peers read only this rank's own block.
    collective(
        p,
        [&] {
          for (int r = 0; r < size(); ++r) {
            if (r == rank_) continue;
            const std::size_t at = std::size_t(r) * bytes_per_rank;
            copy(static_cast<unsigned char*>(buf) + at, static_cast<const unsigned char*>(world_.slot(r).in) + at,
                 bytes_per_rank, p.call, "block of rank " + std::to_string(r));
          }
        },
        [] {});
  }

  using communicator::all_gather;
  using communicator::all_reduce;
  using communicator::broadcast;
  using communicator::reduce_scatter;

 private:
  // Steps 1-4 of the header comment. `read_peers` may read every rank's posted buffer and write only what no peer
  // reads; `write_own` runs after every rank has finished reading.
  template <class Read, class Write>
  void collective(const threaded_post& post, Read&& read_peers, Write&& write_own) {
    const std::string& call = post.call;
    cuda_check(cudaStreamSynchronize(stream_), call, "cudaStreamSynchronize(inputs)");
    world_.slot(rank_) = post;
    world_.wait(rank_, call);
    try {
      check_agreement(call);
      read_peers();
      cuda_check(cudaStreamSynchronize(stream_), call, "cudaStreamSynchronize(reads)");
      world_.wait(rank_, call);
      write_own();
      cuda_check(cudaStreamSynchronize(stream_), call, "cudaStreamSynchronize(writes)");
    } catch (const std::exception& e) {
      (void)cudaStreamSynchronize(stream_);  // no copy of ours may still read a peer that unwinds
      world_.abort(rank_, e.what());
      throw;
    }
  }

  // Every rank compares every post with its own, so all ranks see the same disagreement.
  void check_agreement(const std::string& call) const {
    const threaded_post& mine = world_.slot(rank_);
    for (int r = 0; r < size(); ++r) {
      const threaded_post& peer = world_.slot(r);
      const bool same = peer.call == mine.call && peer.count == mine.count && peer.counts == mine.counts &&
                        peer.type == mine.type && peer.op == mine.op && peer.root == mine.root;
      if (!same)
        throw mpopt::error(mpopt::status::invalid(
            "threaded_device_comm::" + call + " (rank " + std::to_string(rank_) + "): rank " + std::to_string(r) +
            " called " + peer.call + " with different arguments (count " + std::to_string(peer.count) + " vs " +
            std::to_string(mine.count) + ", dtype " + mpopt::dtype_name(peer.type) + " vs " +
            mpopt::dtype_name(mine.type) + ", root " + std::to_string(peer.root) + " vs " + std::to_string(mine.root) +
            ", or the counts or op differ)"));
    }
  }

  // scratch[0, n) <- op over ranks of (posted input + offset)[0, n), in the posted dtype.
  void reduce_into_scratch(const threaded_post& p, std::size_t offset, std::size_t n) {
    if (n == 0) return;
    const std::size_t es = mpopt::comm::dtype_size(p.type);
    if (scratch_.bytes() < n * es)
      scratch_ = mpopt::cuda::device_buffer<unsigned char>(n * es, "threaded_device_comm scratch");
    threaded_detail::rank_inputs in{};
    for (int r = 0; r < size(); ++r) in.p[r] = static_cast<const unsigned char*>(world_.slot(r).in) + offset * es;
    const unsigned blocks = unsigned(std::min<std::size_t>((n + 255) / 256, 1024));
    threaded_detail::dispatch_dtype(p.type, [&](auto tag) {
      using T = typename decltype(tag)::type;
      threaded_detail::reduce_ranks<T>
          <<<blocks, 256, 0, stream_>>>(in, size(), reinterpret_cast<T*>(scratch_.get()), n, p.op == reduce_op::max);
    });
    cuda_check(cudaGetLastError(), p.call, "reduce_ranks launch");
  }

  void copy(void* to, const void* from, std::size_t bytes, const std::string& call, const std::string& what) {
    if (bytes == 0) return;
    cuda_check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, stream_), call,
               "cudaMemcpyAsync(" + what + ", " + std::to_string(bytes) + " bytes)");
  }

  void cuda_check(cudaError_t err, const std::string& call, const std::string& what) const {
    mpopt::cuda::throw_if_cuda_error(
        err, "threaded_device_comm::" + call + " (rank " + std::to_string(rank_) + "): " + what);
  }
  static void require(bool ok, const char* call, const std::string& why) {
    if (!ok) throw mpopt::error(mpopt::status::invalid(std::string(call) + ": " + why));
  }

  std::size_t sum(const std::size_t* counts) const { return offset_of(counts, size()); }
  static std::size_t offset_of(const std::size_t* counts, int rank) {
    std::size_t offset = 0;
    for (int r = 0; r < rank; ++r) offset += counts[r];
    return offset;
  }

  threaded_world& world_;
  int rank_;
  cudaStream_t stream_;
  bool owns_stream_;
  mpopt::cuda::device_buffer<unsigned char> scratch_;
};

namespace threaded_detail {

// One rank's thread: its communicator, fn, and the hand-back of its failure (which also aborts the world).
template <class F>
void run_rank(threaded_world& world, int rank, F& fn, std::exception_ptr& failure) {
  try {
    mpopt::cuda::throw_if_cuda_error(cudaSetDevice(0), "run_ranks: cudaSetDevice(0) on rank " + std::to_string(rank));
    threaded_device_comm comm(world, rank);
    fn(rank, comm);
    world.leave(rank);
  } catch (const std::exception& e) {
    failure = std::current_exception();
    world.abort(rank, e.what());
  } catch (...) {
    failure = std::current_exception();
    world.abort(rank, "a non-standard exception");
  }
}

}  // namespace threaded_detail

// Runs fn(rank, comm) for rank 0..world-1, each on its own thread with its own threaded_device_comm (and stream) on
// device 0, and joins them. fn is called concurrently: it should write only rank r's results, and leave doctest
// CHECKs to the calling thread. The first exception (the one that aborted the world) is rethrown here.
template <class F>
void run_ranks(int world, F fn) {
  threaded_world w(world);
  std::vector<std::exception_ptr> failures(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  try {
    for (int r = 0; r < world; ++r)
      threads.emplace_back(threaded_detail::run_rank<F>, std::ref(w), r, std::ref(fn),
                           std::ref(failures[std::size_t(r)]));
  } catch (...) {  // a thread could not start: the started ones must not wait for it
    w.abort(int(threads.size()), "run_ranks could not start a thread");
    for (auto& t : threads) t.join();
    throw;
  }
  for (auto& t : threads) t.join();
  const int first = w.first_failed_rank();
  if (first >= 0 && failures[std::size_t(first)]) std::rethrow_exception(failures[std::size_t(first)]);
  for (const auto& f : failures)
    if (f) std::rethrow_exception(f);
}

}  // namespace mpopt_test
