// The 1-bit optimizers over MPI on the host: step time and bytes each rank communicates per step, per parameter
// (bus bytes with the (W-1)/W ring factor taken out, so an fp32 all-reduce reads 8), in each phase, next to the exact
// optimizer (mpopt::optimizer<adam>, ZeRO stage 0) on the same fp16 grads. Phase 0 is the warm-up (exact steps;
// 0/1 Adam: its variance phase with var_update_scaler 4, exact and compressed steps mixed), phase 1 the compressed
// phase (0/1 Adam: local steps with intervals growing 1, 2, 4, ... to 16, local_step_scaler 1).
// Fixed iteration counts, so every rank makes the same collective calls; rank 0 reports.
//   mpirun -np 4 build/bench/mpopt_bench_onebit
#include <benchmark/benchmark.h>

#include <vector>

#include "mpi_bench_main.hpp"
#include "mpopt/comm/mpi.hpp"
#include "mpopt/mpopt.hpp"
#include "mpopt/onebit/optimizer.hpp"

namespace {

using prec = mpopt::fp16_mixed_policy;  // the precision the 1-bit family is verified with

template <class Rule>
typename Rule::args phase_args(int phase) {
  typename Rule::args a;
  if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
    a.var_freeze_step = phase == 0 ? 1000000 : 0;
    a.var_update_scaler = 4;
    a.local_step_scaler = 1;
  } else {
    a.freeze_step = phase == 0 ? 1000000 : 0;
  }
  return a;
}

void report(benchmark::State& state, mpopt::comm::mpi& comm, std::size_t n) {
  const double w = double(comm.size());
  const double ring = w > 1 ? (w - 1) / w : 1.0;
  const double steps = double(state.iterations());
  state.counters["ranks"] = w;
  state.counters["comm_bytes_per_param"] = comm.traffic_so_far().bytes / steps / double(n) / ring;
  state.counters["vs_fp32_allreduce"] = comm.traffic_so_far().bytes / steps / double(n) / ring / 8.0;
}

template <class Rule>
void bm_onebit_step(benchmark::State& state) {
  const int phase = int(state.range(0));
  const std::size_t n = std::size_t(state.range(1));
  std::vector<mpopt::half_t> params(n, mpopt::half_t(0.5f)), grads(n);
  mpopt::comm::mpi comm;
  for (std::size_t i = 0; i < n; ++i) grads[i] = mpopt::half_t(float((i * 7 + std::size_t(comm.rank())) % 13) - 6.0f);
  mpopt::param_group<Rule, prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  g.hparams = phase_args<Rule>(phase);
  mpopt::onebit::optimizer<Rule, prec> opt({g}, comm);
  comm.reset_traffic();
  for (auto _ : state) benchmark::DoNotOptimize(opt.step().applied);
  report(state, comm, n);
}

void bm_exact_adam_step(benchmark::State& state) {
  const std::size_t n = std::size_t(state.range(0));
  std::vector<mpopt::half_t> params(n, mpopt::half_t(0.5f)), grads(n, mpopt::half_t(0.25f));
  mpopt::comm::mpi comm;
  mpopt::param_group<mpopt::adam, prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  mpopt::optimizer<mpopt::adam, prec> opt({g}, comm, mpopt::zero_options{});
  comm.reset_traffic();
  for (auto _ : state) benchmark::DoNotOptimize(opt.step().applied);
  report(state, comm, n);
}

}  // namespace

#define MPOPT_ONEBIT_BENCH(rule)           \
  BENCHMARK_TEMPLATE(bm_onebit_step, rule) \
      ->ArgsProduct({{0, 1}, {1 << 22}})   \
      ->ArgNames({"phase", "params"})      \
      ->Iterations(32)                     \
      ->Unit(benchmark::kMillisecond)      \
      ->UseRealTime()
MPOPT_ONEBIT_BENCH(mpopt::onebit_adam);
MPOPT_ONEBIT_BENCH(mpopt::zero_one_adam);
MPOPT_ONEBIT_BENCH(mpopt::onebit_lamb);
BENCHMARK(bm_exact_adam_step)
    ->Arg(1 << 22)
    ->ArgName("params")
    ->Iterations(32)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

MPOPT_MPI_BENCHMARK_MAIN()
