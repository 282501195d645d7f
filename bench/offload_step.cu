// CPU offload (mpopt::cuda::offload_optimizer): wall time of one step, from the backward's last write to the params
// being back on the device, against the two ceilings it sits between, in the same binary:
//   offload/<variant>/<params>   the offload step (AdamW); its bytes over the bus per param are sizeof(grad) down
//                                plus sizeof(param) up
//   bus/<variant>/<params>       the same downloads and uploads alone, on the same two streams (no host work)
//   host/<variant>/<params>      the host step alone on host buffers (mpopt::optimizer::step)
// variant: bf16_clip (bf16 params, fp32 master and states, clipping: every grad lands before the first update) and
// bf16_stream (the same without grad statistics: pieces are updated as they land). bytes_per_second is over the
// bus bytes, so offload and bus rows read as a fraction of the measured bus speed.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_bench.cuh"
#include "mpopt/cuda/offload.cuh"
#include "mpopt/mpopt.hpp"

namespace {

using prec = mpopt::bf16_mixed_policy;
using P = prec::param_t;
using G = prec::grad_t;
constexpr std::size_t bus_bytes_per_param = sizeof(P) + sizeof(G);

using mpopt_bench::check;

struct variant {
  const char* name;
  bool clip;
};

mpopt::no_scaler::args scaler_of(const variant& v) {
  mpopt::no_scaler::args a;
  a.check_overflow = v.clip;
  return a;
}

mpopt::step_options options_of(const variant& v) {
  mpopt::step_options o;
  o.max_grad_norm = v.clip ? 1.0 : 0.0;
  return o;
}

template <class F>
void wall_loop(benchmark::State& state, F&& once) {
  for (int i = 0; i < 2; ++i) once();  // warm-up
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    once();
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
}

void bm_offload(benchmark::State& state, std::size_t n, variant v) {
  try {
    mpopt::cuda::device_buffer<P> params(n, "params");
    mpopt::cuda::device_buffer<G> grads(n, "grads");
    if (!check(state, cudaMemset(params.get(), 0, params.bytes()), "cudaMemset") ||
        !check(state, cudaMemset(grads.get(), 0, grads.bytes()), "cudaMemset"))
      return;
    mpopt::param_group<mpopt::adamw, prec> g;
    g.params = params.get();
    g.grads = grads.get();
    g.size = n;
    mpopt::cuda::offload_optimizer<mpopt::adamw, prec> opt({g}, scaler_of(v), options_of(v));
    cudaStream_t stream;
    if (!check(state, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate")) return;
    bool ok = true;
    wall_loop(state, [&] {
      const mpopt::step_result r = opt.step(stream);
      ok = ok && r.error.ok() && cudaStreamSynchronize(stream) == cudaSuccess;
    });
    if (!ok) state.SkipWithError("a step failed");
    cudaStreamDestroy(stream);
  } catch (const mpopt::error& e) {
    state.SkipWithError(e.what());
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n * bus_bytes_per_param));
  state.counters["bus_bytes_per_param"] = double(bus_bytes_per_param);
}

void bm_bus(benchmark::State& state, std::size_t n) {
  try {
    mpopt::cuda::device_buffer<P> params(n, "params");
    mpopt::cuda::device_buffer<G> grads(n, "grads");
    mpopt::cuda::pinned_buffer<P> host_params(n, "host params");
    mpopt::cuda::pinned_buffer<G> host_grads(n, "host grads");
    cudaStream_t down, up;
    if (!check(state, cudaStreamCreateWithFlags(&down, cudaStreamNonBlocking), "cudaStreamCreate") ||
        !check(state, cudaStreamCreateWithFlags(&up, cudaStreamNonBlocking), "cudaStreamCreate"))
      return;
    const std::size_t piece = mpopt::cuda::offload_options{}.piece_elements;
    wall_loop(state, [&] {
      for (std::size_t b = 0; b < n; b += piece) {
        const std::size_t e = std::min(n, b + piece);
        cudaMemcpyAsync(host_grads.get() + b, grads.get() + b, (e - b) * sizeof(G), cudaMemcpyDeviceToHost, down);
        cudaMemcpyAsync(params.get() + b, host_params.get() + b, (e - b) * sizeof(P), cudaMemcpyHostToDevice, up);
      }
      cudaStreamSynchronize(down);
      cudaStreamSynchronize(up);
    });
    cudaStreamDestroy(down);
    cudaStreamDestroy(up);
  } catch (const mpopt::error& e) {
    state.SkipWithError(e.what());
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n * bus_bytes_per_param));
  state.counters["bus_bytes_per_param"] = double(bus_bytes_per_param);
}

void bm_host(benchmark::State& state, std::size_t n, variant v) {
  std::vector<P> params(n, P(0.f));
  std::vector<G> grads(n, G(0.f));
  mpopt::param_group<mpopt::adamw, prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  mpopt::optimizer<mpopt::adamw, prec> opt({g}, scaler_of(v), options_of(v));
  wall_loop(state, [&] { benchmark::DoNotOptimize(opt.step()); });
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n * bus_bytes_per_param));
  state.counters["bus_bytes_per_param"] = double(bus_bytes_per_param);
}

}  // namespace

int main(int argc, char** argv) {
  for (std::size_t n : {std::size_t(1) << 24, std::size_t(1) << 28}) {
    const std::string size = std::to_string(n);
    for (variant v : {variant{"bf16_clip", true}, variant{"bf16_stream", false}}) {
      benchmark::RegisterBenchmark(("offload/" + std::string(v.name) + "/" + size).c_str(),
                                   [n, v](benchmark::State& s) { bm_offload(s, n, v); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("host/" + std::string(v.name) + "/" + size).c_str(),
                                   [n, v](benchmark::State& s) { bm_host(s, n, v); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
    benchmark::RegisterBenchmark(("bus/bf16/" + size).c_str(), [n](benchmark::State& s) { bm_bus(s, n); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
