// Shared by the multi-rank tests: the world communicator and rank-tagged messages.
#pragma once

#include <doctest/doctest.h>
// The C API only: OpenMPI's deprecated C++ bindings do not compile cleanly with -Wextra -Werror.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <string>

namespace mpopt_test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
inline std::string rank_tag() {
  return "rank " + std::to_string(world_rank()) + "/" + std::to_string(world_size());
}

}  // namespace mpopt_test
