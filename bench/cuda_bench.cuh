// What the CUDA benchmarks share: a CUDA error as a skipped benchmark, deterministic test data, and the CUDA-event
// timing loop (Google Benchmark's manual time).
#pragma once

#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "mpopt/numeric/convert.hpp"

namespace mpopt_bench {

// False (and the benchmark skipped, naming `what`) when err is an error.
inline bool check(benchmark::State& state, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();
  state.SkipWithError((std::string(what) + ": " + cudaGetErrorString(err)).c_str());
  return false;
}

// Params in [-0.48, 0.48] and grads in [-6e-3, 6e-3] + spread·(i mod 1021): finite at any loss scale fp16 can carry.
template <class P, class G>
__global__ void init_buffers(P* p, G* g, std::uint64_t n, float spread = 0.f) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    p[i] = mpopt::convert<P>(0.01f * float(int(i % 97) - 48));
    g[i] = mpopt::convert<G>(1e-3f * float(int(i % 13) - 6) + spread * float(i % 1021));
  }
}

// Times `enqueue` with a pair of events around it, once per iteration, after `warmup` untimed calls (cuBLAS picks
// and loads its kernels on the first).
template <class Enqueue>
void time_loop(benchmark::State& state, cudaStream_t stream, Enqueue&& enqueue, int warmup = 3) {
  cudaEvent_t start, stop;
  if (!check(state, cudaEventCreate(&start), "cudaEventCreate")) return;
  if (!check(state, cudaEventCreate(&stop), "cudaEventCreate")) {
    cudaEventDestroy(start);
    return;
  }
  for (int i = 0; i < warmup; ++i) enqueue();
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    enqueue();
    cudaEventRecord(stop, stream);
    if (!check(state, cudaEventSynchronize(stop), "cudaEventSynchronize")) break;
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(double(ms) * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace mpopt_bench
