// The 1-bit compressed allreduce (mpopt/onebit/compressed_allreduce.hpp) against an fp32 MPI all-reduce of the same
// elements, on the host over MPI: time per call, and the bytes each rank puts on the wire per call from the
// communicator's bus-traffic counters ((W-1)/W ring accounting), with their ratio to the fp32 all-reduce's
// 2·(W-1)/W·4n (about 1/32). The compressed call includes its compression and decompression passes. Run under
// mpirun: every rank runs the same fixed number of iterations (a time-based count could differ between ranks and
// deadlock the collectives); rank 0 reports.
//   OMP_NUM_THREADS=1 mpirun -np 2 build/bench/mpopt_bench_onebit_comm
#include <benchmark/benchmark.h>

#include <cstddef>
#include <vector>

#include "mpi_bench_main.hpp"
#include "mpopt/comm/mpi.hpp"
#include "mpopt/onebit/compressed_allreduce.hpp"

namespace {

std::vector<float> input(std::size_t n, int rank) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = float(int((i * 2654435761u + std::size_t(rank) * 97u) % 2001) - 1000) * 1e-3f;
  return v;
}

void set_counters(benchmark::State& state, const mpopt::comm::communicator& comm, std::size_t n) {
  const double w = double(comm.size());
  const double fp32_bytes = 2.0 * (w - 1) / w * 4.0 * double(n);  // ring all-reduce of n fp32 elements, per rank
  const double bytes = comm.traffic_so_far().bytes / double(state.iterations());
  state.counters["ranks"] = w;
  state.counters["wire_bytes_per_rank"] = bytes;
  state.counters["ratio_to_fp32"] = fp32_bytes > 0 ? bytes / fp32_bytes : 0.0;
  // The elements' fp32 size per second: how fast the mean of n floats is delivered.
  state.counters["elem_bytes_per_s"] =
      benchmark::Counter(4.0 * double(n), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1024);
}

void bm_compressed_allreduce(benchmark::State& state) {
  const std::size_t n = std::size_t(state.range(0));
  mpopt::comm::mpi comm;
  mpopt::onebit::compressed_allreduce allreduce(comm, n);
  const mpopt::onebit::compressed_layout layout = mpopt::onebit::compressed_layout::make(n, comm.size());
  mpopt::onebit::error_feedback err(layout);
  std::vector<float> buf = input(n, comm.rank());
  allreduce(buf.data(), layout, err);  // first touch of the workspace
  comm.reset_traffic();
  for (auto _ : state) {
    allreduce(buf.data(), layout, err);  // the previous output as input: the cost does not depend on the values
    benchmark::DoNotOptimize(buf.data());
  }
  set_counters(state, comm, n);
}

void bm_fp32_allreduce(benchmark::State& state) {
  const std::size_t n = std::size_t(state.range(0));
  mpopt::comm::mpi comm;
  std::vector<float> buf = input(n, comm.rank());
  comm.all_reduce(buf.data(), n, mpopt::comm::reduce_op::sum);
  comm.reset_traffic();
  for (auto _ : state) {
    comm.all_reduce(buf.data(), n, mpopt::comm::reduce_op::sum);
    benchmark::DoNotOptimize(buf.data());
  }
  set_counters(state, comm, n);
}

}  // namespace

BENCHMARK(bm_compressed_allreduce)
    ->Arg(1 << 20)
    ->Arg(1 << 24)
    ->Arg(1 << 26)
    ->ArgName("elements")
    ->Iterations(10)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(bm_fp32_allreduce)
    ->Arg(1 << 20)
    ->Arg(1 << 24)
    ->Arg(1 << 26)
    ->ArgName("elements")
    ->Iterations(10)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

MPOPT_MPI_BENCHMARK_MAIN()
