// Host backend step time (the CPU-offload optimizer), with bytes per parameter reported as bytes/s so a figure
// reads as a fraction of memory bandwidth; a memcpy of the same bytes is the ceiling in the same binary.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "mpopt/mpopt.hpp"
#include "mpopt/policy/traffic.hpp"

namespace {

template <class Prec, class Scaler>
void bm_adamw_step(benchmark::State& state) {
  const std::size_t n = std::size_t(state.range(0));
  std::vector<typename Prec::param_t> params(n, mpopt::convert<typename Prec::param_t>(0.5f));
  std::vector<typename Prec::grad_t> grads(n, mpopt::convert<typename Prec::grad_t>(1e-3f));
  mpopt::param_group<mpopt::adamw, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  mpopt::optimizer<mpopt::adamw, Prec, Scaler> opt({g});
  for (auto _ : state) {
    const auto r = opt.step();
    benchmark::DoNotOptimize(r.applied);
  }
  // The statistics pass reads the grads once more whenever the scaler checks for overflow.
  const std::size_t bytes = mpopt::update_bytes_per_param<Prec>(2) + sizeof(typename Prec::grad_t);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n * bytes));
  state.counters["bytes_per_param"] = double(bytes);
}

void bm_memcpy(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0)) * std::size_t(state.range(1)) / 2;  // copy = read + write
  std::vector<char> a(bytes, 1), b(bytes);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(2 * bytes));
}

using fp32 = mpopt::fp32_policy;
using bf16_mixed = mpopt::bf16_mixed_policy;
using fp16_mixed = mpopt::fp16_mixed_policy;
using bf16_pure = mpopt::bf16_pure_policy;

}  // namespace

BENCHMARK_TEMPLATE(bm_adamw_step, fp32, mpopt::no_scaler)
    ->Arg(1 << 20)
    ->Arg(1 << 24)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(bm_adamw_step, bf16_mixed, mpopt::no_scaler)
    ->Arg(1 << 20)
    ->Arg(1 << 24)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(bm_adamw_step, fp16_mixed, mpopt::dynamic_scaler)
    ->Arg(1 << 20)
    ->Arg(1 << 24)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(bm_adamw_step, bf16_pure, mpopt::no_scaler)
    ->Arg(1 << 20)
    ->Arg(1 << 24)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// The same bytes as the fp32 AdamW step (28 + 4 B/param) at 16 M params.
BENCHMARK(bm_memcpy)->Args({1 << 24, 32})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
