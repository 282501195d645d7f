// The doctest runner for the multi-rank tests (tests/mpi/test_*.cpp), run by ctest under
// `mpirun -np N` for N = 1..4. Every rank runs every test case; a rank's failure fails the run,
// and only rank 0 prints the summary (failures print on the rank that saw them, tagged with it).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include "mpopt/comm/mpi.hpp"  // <mpi.h>, C API only

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  doctest::Context context(argc, argv);
  if (rank != 0) context.setOption("minimal", true);  // reports failures only
  const int failed = context.run();
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) std::printf("[mpi] %d ranks: %s\n", size, any_failed ? "FAILED" : "all ranks passed");
  MPI_Finalize();
  return any_failed ? 1 : 0;
}
