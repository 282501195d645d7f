// What the CUDA benchmarks share: a CUDA error as a skipped benchmark, deterministic test data, and the CUDA-event
// timing loop (Google Benchmark's manual time).
#pragma once

#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "mpopt/cuda/memory.cuh"
#include "mpopt/error.hpp"
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

// Runs run(stream) on a new non-blocking stream and destroys it; an mpopt::error (an allocation that does not fit,
// mostly) skips the benchmark with its message.
template <class Run>
void on_new_stream(benchmark::State& state, Run&& run) {
  cudaStream_t stream;
  if (!check(state, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate")) return;
  try {
    run(stream);
  } catch (const mpopt::error& e) {
    state.SkipWithError(e.what());
  }
  cudaStreamDestroy(stream);
}

// Bytes/s over `bytes` per iteration, and the counters that make a row read as a fraction of bandwidth.
inline void report_bytes(benchmark::State& state, std::size_t params, double bytes) {
  state.SetBytesProcessed(std::int64_t(double(state.iterations()) * bytes));
  state.counters["bytes_per_param"] = bytes / double(params);
  state.counters["params"] = double(params);
}

// The ceiling of a step that moves bytes_per_param for each of n params: a device-to-device copy reading and
// writing half of those bytes each.
inline void copy_ceiling(benchmark::State& state, std::size_t n, std::size_t bytes_per_param) {
  const std::size_t half = n * bytes_per_param / 2;
  on_new_stream(state, [&](cudaStream_t stream) {
    mpopt::cuda::device_buffer<unsigned char> src(half, "copy source"), dst(half, "copy destination");
    if (check(state, cudaMemsetAsync(src.get(), 1, half, stream), "cudaMemsetAsync"))
      time_loop(state, stream, [&] { cudaMemcpyAsync(dst.get(), src.get(), half, cudaMemcpyDeviceToDevice, stream); });
    check(state, cudaStreamSynchronize(stream), "cudaMemcpyAsync");
  });
  report_bytes(state, n, double(2 * half));
}

// main() of a CUDA benchmark after registering: runs what was registered (and says up front when there is no
// device, since every benchmark would then report an error). Returns main's exit code.
inline int run_registered(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
    std::fprintf(stderr, "no CUDA device: every benchmark will report an error\n");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace mpopt_bench
