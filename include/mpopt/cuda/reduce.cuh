// The read-only statistics pass over the gradients: the global sum of squares and the non-finite flag, fused.
// Deterministic: a grid fixed by the sizes alone (never by the device), per-block partials in device memory, and one
// single-block reduction in a fixed order (done by the step-scalars kernel, scalars.cuh), so the same gradients give
// the same bits on every run and every GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "../config.hpp"
#include "../numeric/convert.hpp"
#include "launch.cuh"

namespace mpopt::cuda {

// One flat gradient buffer (a parameter group) of the statistics pass.
template <class G>
struct grad_entry {
  const G* grad;
  std::uint64_t n;
  std::uint32_t vector_ok;  // grad is 16-byte aligned
};

// Partials of the statistics pass: at most this many blocks, whatever the device.
inline constexpr std::uint32_t stats_max_blocks = 1024;

// Chunk size of the statistics pass: one vector per thread, so that 1M bf16 gradients still make 512 blocks.
template <class G>
inline constexpr std::uint32_t stats_chunk_elems = std::uint32_t(block_threads) * elements_per_vector<G>;

inline std::uint32_t stats_grid(std::uint64_t chunks) {
  return std::uint32_t(chunks < stats_max_blocks ? chunks : stats_max_blocks);
}

namespace detail {

// Each element widened as host::reduce_grad_stats does (to float, then double) and squared in double, where the
// square of a float is exact (so a fused multiply-add changes nothing): the sum differs from the host's only by the
// order of double additions, which moves its last bits, not by float rounding of the squares, which would move the
// norm by about 1e-8 and with it the float clip coefficient that the tests compare with the host's bit for bit.
// The pass stays memory-bound: one double multiply-add per element is a few percent of an H100's fp64 rate.
template <class G>
struct grad_squares {
  const G* grad;
  double sum = 0.0;
  int nonfinite = 0;

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) {
    const vec<G, W> x = load<G, W>(grad + i);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const double d = double(convert<float>(x.v[e]));
      sum += d * d;
      nonfinite |= int(!isfinite(d));
    }
  }
};

}  // namespace detail

// Block b writes partial_sum[b] and partial_flag[b]. Does nothing (writes nothing) when the step needs no statistics:
// `check` is false and *max_grad_norm <= 0, the same test the step-scalars kernel makes before reading the partials.
template <class G>
__global__ void __launch_bounds__(block_threads)
    grad_stats_kernel(const grad_entry<G>* entries, chunk_map map, bool check, const double* max_grad_norm,
                      double* partial_sum, int* partial_flag) {
  if (!check && !(*max_grad_norm > 0)) return;
  constexpr int V = elements_per_vector<G>;
  detail::grad_squares<G> acc{nullptr};
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    const grad_entry<G> t = entries[e];
    const std::uint64_t begin = (c - map.chunk_begin[e]) * map.chunk_elems;
    const std::uint64_t end = begin + map.chunk_elems < t.n ? begin + map.chunk_elems : t.n;
    acc.grad = t.grad;
    for_each_in_chunk<V>(begin, end, t.vector_ok != 0, acc);
  }
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  const double block_sum = reduce(temp).Sum(acc.sum);
  const int block_flag = __syncthreads_or(acc.nonfinite);
  if (threadIdx.x == 0) {
    partial_sum[blockIdx.x] = block_sum;
    partial_flag[blockIdx.x] = block_flag;
  }
}

template <class G>
cudaError_t launch_grad_stats(const grad_entry<G>* entries, const chunk_map& map, std::uint32_t grid, bool check,
                              const double* max_grad_norm, double* partial_sum, int* partial_flag,
                              cudaStream_t stream) {
  if (grid == 0) return cudaSuccess;
  grad_stats_kernel<G>
      <<<grid, block_threads, 0, stream>>>(entries, map, check, max_grad_norm, partial_sum, partial_flag);
  return cudaGetLastError();
}

}  // namespace mpopt::cuda
