// The main() of the MPI benchmarks: every rank runs the same benchmarks (the collectives need all of them; each
// benchmark fixes its iteration count so the ranks agree), and only rank 0 reports.
#pragma once

#include <benchmark/benchmark.h>

#include <vector>

#include "mpopt/comm/mpi.hpp"

#define MPOPT_MPI_BENCHMARK_MAIN()                                   \
  int main(int argc, char** argv) {                                  \
    MPI_Init(&argc, &argv);                                          \
    int rank = 0;                                                    \
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);                            \
    benchmark::Initialize(&argc, argv);                              \
    if (rank == 0) {                                                 \
      benchmark::RunSpecifiedBenchmarks();                           \
    } else {                                                         \
      struct silent : benchmark::BenchmarkReporter {                 \
        bool ReportContext(const Context&) override { return true; } \
        void ReportRuns(const std::vector<Run>&) override {}         \
      } quiet;                                                       \
      benchmark::RunSpecifiedBenchmarks(&quiet);                     \
    }                                                                \
    benchmark::Shutdown();                                           \
    MPI_Finalize();                                                  \
    return 0;                                                        \
  }
