// Host backend step time (the CPU-offload optimizer), with bytes per parameter reported as bytes/s so a figure
// reads as a fraction of memory bandwidth. Ceilings in the same binary: STREAM's triad (all threads) and a memcpy.
// bench/compare_torch_cpu.py runs this binary and torch's AdamW on the same sizes and thread count in one run.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "mpopt/mpopt.hpp"
#include "mpopt/policy/traffic.hpp"

namespace {

// Google Benchmark's name reads host_adamw_step<policy, scaler>/params.
template <class Prec, class Scaler>
void host_adamw_step(benchmark::State& state) {
  const std::size_t n = std::size_t(state.range(0));
  std::vector<typename Prec::param_t> params(n, mpopt::convert<typename Prec::param_t>(0.5f));
  std::vector<typename Prec::grad_t> grads(n, mpopt::convert<typename Prec::grad_t>(1e-3f));
  mpopt::param_group<mpopt::adamw, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  mpopt::optimizer<mpopt::adamw, Prec, Scaler> opt({g});
  opt.step();  // first touch of every page happens at construction; this warms the thread pool
  for (auto _ : state) {
    const auto r = opt.step();
    benchmark::DoNotOptimize(r.applied);
  }
  // The statistics pass reads the grads once more whenever the step checks for overflow (every scaler but
  // no_scaler with check_overflow off, which the no_scaler rows use: DeepSpeed's cpu_adam makes no such pass).
  const bool stats = Scaler::skips_on_overflow(typename Scaler::args{});
  const std::size_t bytes = mpopt::update_bytes_per_param<Prec>(2) + (stats ? sizeof(typename Prec::grad_t) : 0);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n * bytes));
  state.counters["bytes_per_param"] = double(bytes);
}

// The optimizer's no_scaler with the overflow check off: the update alone, as DeepSpeed's cpu_adam does it.
struct unchecked : mpopt::no_scaler {
  struct args : mpopt::no_scaler::args {
    args() { check_overflow = false; }
  };
};

// STREAM's triad a = b + s * c over doubles, parallel like the optimizer (24 bytes per element).
void stream_triad(benchmark::State& state) {
  const std::ptrdiff_t n = std::ptrdiff_t(state.range(0));
  const std::size_t count = std::size_t(n);
  mpopt::host::aligned_buffer<double> a(count), b(count), c(count);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    a[std::size_t(i)] = 0;
    b[std::size_t(i)] = 1;
    c[std::size_t(i)] = 2;
  }
  const double s = 3.0;
  double* __restrict pa = a.data();
  const double* __restrict pb = b.data();
  const double* __restrict pc = c.data();
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (std::ptrdiff_t i = 0; i < n; ++i) pa[i] = pb[i] + s * pc[i];
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * n * 24);
}

void memcpy_one_thread(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0)) * std::size_t(state.range(1)) / 2;  // copy = read + write
  std::vector<char> a(bytes, 1), b(bytes);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(2 * bytes));
}

using fp32 = mpopt::fp32_policy;
using bf16_mixed = mpopt::bf16_mixed_policy;  // bf16 params, fp32 master and states
using fp16_mixed = mpopt::fp16_mixed_policy;
using bf16_pure = mpopt::bf16_pure_policy;  // DeepSpeed bf16_master_weights_and_grads + bf16_optimizer_states
// DeepSpeed bf16_master_weights_and_grads with fp32 states (its offload-only mode).
using bf16_master_fp32_states = mpopt::precision_of<mpopt::bf16_t, mpopt::bf16_t, mpopt::bf16_t, float>;

#define MPOPT_HOST_BENCH(...)                      \
  BENCHMARK_TEMPLATE(host_adamw_step, __VA_ARGS__) \
      ->Arg(1 << 20)                               \
      ->Arg(1 << 24)                               \
      ->Unit(benchmark::kMillisecond)              \
      ->UseRealTime()

}  // namespace

MPOPT_HOST_BENCH(fp32, unchecked);
MPOPT_HOST_BENCH(bf16_master_fp32_states, unchecked);
MPOPT_HOST_BENCH(bf16_pure, unchecked);
MPOPT_HOST_BENCH(bf16_mixed, unchecked);
MPOPT_HOST_BENCH(fp32, mpopt::no_scaler);
MPOPT_HOST_BENCH(fp16_mixed, mpopt::dynamic_scaler);
BENCHMARK(stream_triad)->Arg(1 << 24)->Unit(benchmark::kMillisecond)->UseRealTime();
// The same bytes as the fp32 AdamW update (28 B/param) at 16 M params.
BENCHMARK(memcpy_one_thread)->Args({1 << 24, 28})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
