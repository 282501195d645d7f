// Shared by the multi-rank tests: the world communicator and rank-tagged messages.
#pragma once

#include <doctest/doctest.h>
#include "mpopt/comm/mpi.hpp"  // <mpi.h>, C API only

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
