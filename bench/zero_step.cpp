// ZeRO over MPI on the host: per stage, the step time and what each rank communicates per step, in units of the
// parameter count Ψ (the ZeRO paper's 2Ψ for stages 0-2 and 3Ψ for stage 3, from the communicator's bus-traffic
// counters with the (W-1)/W ring factor taken out). Stage 3 counts the two gathers a forward and a backward pass
// make. Run under mpirun: every rank runs the same fixed number of iterations (a time-based count could differ
// between ranks and deadlock the collectives); rank 0 reports.
//   mpirun -np 2 build/bench/mpopt_bench_zero
#include <benchmark/benchmark.h>

#include <vector>

#include "mpi_bench_main.hpp"
#include "mpopt/comm/mpi.hpp"
#include "mpopt/mpopt.hpp"

namespace {

template <class Prec>
void bm_zero_adamw_step(benchmark::State& state) {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  const int stage = int(state.range(0));
  const std::size_t n = std::size_t(state.range(1));
  std::vector<param_t> params(n, mpopt::convert<param_t>(0.5f));
  std::vector<grad_t> grads(n, mpopt::convert<grad_t>(1e-3f));
  mpopt::param_group<mpopt::adamw, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = stage;
  mpopt::step_options opts;
  opts.max_grad_norm = 1.0;
  mpopt::optimizer<mpopt::adamw, Prec> opt({g}, comm, z, {}, opts);
  comm.reset_traffic();
  for (auto _ : state) {
    if (stage == 3) {
      for (int pass = 0; pass < 2; ++pass) {  // forward and backward gather the params once each
        benchmark::DoNotOptimize(opt.gather(0, 0, 1));
        opt.release(0, 0, 1);
      }
    }
    const auto r = opt.step();
    benchmark::DoNotOptimize(r.applied);
  }
  const double w = double(comm.size());
  const double ring = w > 1 ? (w - 1) / w : 1.0;
  const double steps = double(state.iterations());
  state.counters["ranks"] = w;
  state.counters["comm_elems_per_param"] = comm.traffic_so_far().elements / steps / double(n) / ring;
  state.counters["comm_bytes_per_param"] = comm.traffic_so_far().bytes / steps / double(n) / ring;
  state.counters["memory_bytes_per_param"] = double(opt.memory().total()) / double(n);
}

}  // namespace

BENCHMARK_TEMPLATE(bm_zero_adamw_step, mpopt::fp32_policy)
    ->ArgsProduct({{0, 1, 2, 3}, {1 << 22}})
    ->ArgNames({"stage", "params"})
    ->Iterations(20)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(bm_zero_adamw_step, mpopt::bf16_mixed_policy)
    ->ArgsProduct({{0, 1, 2, 3}, {1 << 22}})
    ->ArgNames({"stage", "params"})
    ->Iterations(20)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

MPOPT_MPI_BENCHMARK_MAIN()
