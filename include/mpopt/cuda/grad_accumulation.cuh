// Gradient accumulation on the device: the kernel twin of mpopt/grad_accumulation.hpp, with the same element
// formula (numeric/accumulate.hpp), so the host loop and the kernel give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../error.hpp"
#include "../numeric/accumulate.hpp"
#include "../numeric/traits.hpp"
#include "launch.cuh"

namespace mpopt::cuda {

namespace detail {

// Grid-stride over [0, n): V elements per thread per access when both streams are 16-byte aligned, else scalar.
template <bool First, int V, class Accum, class G>
MPOPT_KERNEL void __launch_bounds__(block_threads)
    accumulate_kernel(Accum* __restrict__ acc, const G* __restrict__ micro, std::uint64_t n, bool vector_ok) {
  const std::uint64_t stride = std::uint64_t(gridDim.x) * block_threads;
  const std::uint64_t tid = std::uint64_t(blockIdx.x) * block_threads + threadIdx.x;
  const std::uint64_t vector_end = vector_ok ? n / V * V : 0;
  for (std::uint64_t i = tid * V; i < vector_end; i += stride * V) {
    const vec<G, V> g = load<G, V>(micro + i);
    vec<Accum, V> a;
    if constexpr (!First) a = load<Accum, V>(acc + i);
#pragma unroll
    for (int e = 0; e < V; ++e) a.v[e] = First ? convert<Accum>(g.v[e]) : accumulate_grad(a.v[e], g.v[e]);
    store<Accum, V>(acc + i, a);
  }
  for (std::uint64_t i = vector_end + tid; i < n; i += stride)
    acc[i] = First ? convert<Accum>(micro[i]) : accumulate_grad(acc[i], micro[i]);
}

template <bool First, class Accum, class G>
cudaError_t launch_accumulate(Accum* acc, const G* micro, std::size_t n, cudaStream_t stream) {
  static_assert(is_element_type_v<Accum> && is_element_type_v<G>,
                "mpopt::cuda::accumulate_grads: the accumulator and the micro-batch grads must be float, double, "
                "half_t or bf16_t");
  if (n == 0) return cudaSuccess;
  if (acc == nullptr || micro == nullptr) return cudaErrorInvalidValue;  // a fault would end the CUDA context
  constexpr int V = elements_per_vector<Accum, G>;
  const bool vector_ok = is_aligned(acc, vector_bytes) && is_aligned(micro, vector_bytes);
  const std::uint64_t per_block = std::uint64_t(block_threads) * (vector_ok ? V : 1);
  const std::uint64_t blocks = (std::uint64_t(n) + per_block - 1) / per_block;
  auto kernel = accumulate_kernel<First, V, Accum, G>;
  std::uint64_t resident = 0;
  if (const cudaError_t e = query_resident_blocks(kernel, resident); e != cudaSuccess) return e;
  kernel<<<grid_for(resident, blocks), block_threads, 0, stream>>>(acc, micro, std::uint64_t(n), vector_ok);
  return cudaGetLastError();
}

}  // namespace detail

// acc[i] = accumulate_grad(acc[i], micro[i]) for i < n, device memory, stream-ordered; no host synchronisation.
// Returns the launch status, cudaErrorInvalidValue for a null pointer with n > 0 (graph-capturable: no allocation, no
// query that synchronises).
template <class Accum, class G>
cudaError_t accumulate_grads(Accum* acc, const G* micro, std::size_t n, cudaStream_t stream = nullptr) {
  return detail::launch_accumulate<false>(acc, micro, n, stream);
}

// The first micro-batch of a window: acc[i] = micro[i] rounded to Accum.
template <class Accum, class G>
cudaError_t assign_grads(Accum* acc, const G* micro, std::size_t n, cudaStream_t stream = nullptr) {
  return detail::launch_accumulate<true>(acc, micro, n, stream);
}

}  // namespace mpopt::cuda
