// Launch plumbing shared by the kernels: the block size, 16-byte vector loads and stores, and the chunk map that
// spreads the elements of many tensors over blocks (the multi-tensor path). The tensor tables live in device
// memory, so their size is not bounded by the 4 KB of kernel arguments.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../config.hpp"
#include "error.cuh"
#include "memory.cuh"

namespace mpopt::cuda {

// Every mpopt kernel runs 256-thread blocks (the reductions' cub::BlockReduce is sized by it).
inline constexpr int block_threads = 256;
inline constexpr std::size_t vector_bytes = 16;

// Elements per thread per access: one 16-byte access of the narrowest element type; wider streams take two or
// four 16-byte accesses for the same elements.
template <class... T>
inline constexpr int elements_per_vector = int(vector_bytes / std::min({sizeof(T)...}));

inline bool is_aligned(const void* p, std::size_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

template <class T, int W>
struct vec {
  T v[W];
};

// W elements at p. When they fill whole 16-byte words (p must then be 16-byte aligned) they move as uint4 words with
// ld/st.global.cg: the pointers come from a table in memory, so without the intrinsic the compiler emits generic
// ld/st; .cg keeps the streamed data out of L1, where nothing would reuse it. W == 1 is the scalar access of the
// tails and of unaligned tensors.
template <class T, int W>
MPOPT_DEVICE MPOPT_FORCEINLINE vec<T, W> load(const T* p) {
  vec<T, W> out;
  if constexpr (sizeof(T) * W % vector_bytes == 0) {
    constexpr int words = int(sizeof(T) * W / vector_bytes);
    uint4 raw[words];
#pragma unroll
    for (int k = 0; k < words; ++k) raw[k] = __ldcg(reinterpret_cast<const uint4*>(p) + k);
    memcpy(&out, raw, sizeof out);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) out.v[e] = p[e];
  }
  return out;
}

template <class T, int W>
MPOPT_DEVICE MPOPT_FORCEINLINE void store(T* p, const vec<T, W>& x) {
  if constexpr (sizeof(T) * W % vector_bytes == 0) {
    constexpr int words = int(sizeof(T) * W / vector_bytes);
    uint4 raw[words];
    memcpy(raw, &x, sizeof raw);
#pragma unroll
    for (int k = 0; k < words; ++k) __stcg(reinterpret_cast<uint4*>(p) + k, raw[k]);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) p[e] = x.v[e];
  }
}

// Chunk c of a table belongs to entry e when chunk_begin[e] <= c < chunk_begin[e + 1]; entry-local element offset
// (c - chunk_begin[e]) * chunk_elems. A block takes whole chunks (grid-stride over chunks), so one launch covers
// every tensor of a table whatever their number and sizes.
struct chunk_map {
  const std::uint64_t* chunk_begin = nullptr;  // device, num_entries + 1 values, chunk_begin[0] == 0
  std::uint64_t total_chunks = 0;
  std::uint32_t num_entries = 0;
  std::uint32_t chunk_elems = 0;  // a multiple of the kernel's vector width, so chunks start on vector boundaries
};

MPOPT_DEVICE MPOPT_FORCEINLINE std::uint32_t find_entry(const chunk_map& m, std::uint64_t c) {
  std::uint32_t lo = 0, hi = m.num_entries;  // invariant: chunk_begin[lo] <= c < chunk_begin[hi]
  while (hi - lo > 1) {
    const std::uint32_t mid = lo + (hi - lo) / 2;
    if (m.chunk_begin[mid] <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Visits [begin, end) of one chunk: f.template run<V>(i) on whole vectors when the entry's streams are 16-byte
// aligned, then f.template run<1>(i) on the tail (fewer than V elements, the entry's last chunk only); the scalar
// path alone when they are not. Indices are 64-bit throughout.
template <int V, class F>
MPOPT_DEVICE MPOPT_FORCEINLINE void for_each_in_chunk(std::uint64_t begin, std::uint64_t end, bool vector_ok, F& f) {
  const std::uint64_t tid = threadIdx.x;
  if (vector_ok) {
    const std::uint64_t vector_end = begin + (end - begin) / V * V;
    for (std::uint64_t i = begin + tid * V; i < vector_end; i += std::uint64_t(block_threads) * V) f.template run<V>(i);
    if (vector_end + tid < end) f.template run<1>(vector_end + tid);
  } else {
    for (std::uint64_t i = begin + tid; i < end; i += block_threads) f.template run<1>(i);
  }
}

// A table of entries (each with a member `n`, its element count) and its chunk map, both in device memory.
// Entries with n == 0 are dropped. Built once, at construction, with synchronous copies.
template <class Entry>
class device_table {
 public:
  device_table() = default;
  device_table(const std::vector<Entry>& entries, std::uint32_t chunk_elems, const std::string& what) {
    std::vector<Entry> kept;
    std::vector<std::uint64_t> begin{0};
    for (const Entry& e : entries) {
      if (e.n == 0) continue;
      kept.push_back(e);
      begin.push_back(begin.back() + (e.n + chunk_elems - 1) / chunk_elems);
    }
    if (kept.empty()) return;
    entries_ = detail::upload(kept, what + " table");
    chunk_begin_ = detail::upload(begin, what + " chunk map");
    map_.chunk_begin = chunk_begin_.get();
    map_.total_chunks = begin.back();
    map_.num_entries = std::uint32_t(kept.size());
    map_.chunk_elems = chunk_elems;
  }

  const Entry* entries() const noexcept { return entries_.get(); }
  const chunk_map& map() const noexcept { return map_; }
  bool empty() const noexcept { return map_.total_chunks == 0; }

 private:
  device_buffer<Entry> entries_;
  device_buffer<std::uint64_t> chunk_begin_;
  chunk_map map_{};
};

// Blocks of `kernel` the device holds at once: what the occupancy calculator allows per SM times the SM count.
// Queries only, no synchronisation. The first form reports a failed query; the second throws (API edge).
template <class Kernel>
cudaError_t query_resident_blocks(Kernel kernel, std::uint64_t& blocks) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block_threads, 0);
  blocks = std::uint64_t(std::max(1, sms)) * std::uint64_t(std::max(1, per_sm));
  return e;
}

template <class Kernel>
std::uint64_t resident_blocks(Kernel kernel, const std::string& what) {
  std::uint64_t blocks = 0;
  throw_if_cuda_error(query_resident_blocks(kernel, blocks), "occupancy query (" + what + ")");
  return blocks;
}

// Grid-stride launches fill the device once and never start more blocks than there are chunks.
inline std::uint32_t grid_for(std::uint64_t resident, std::uint64_t chunks) {
  return std::uint32_t(std::min(resident, chunks));
}

}  // namespace mpopt::cuda
