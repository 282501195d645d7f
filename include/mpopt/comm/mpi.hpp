// The communicator over MPI, on host memory: ZeRO on CPUs and the multi-rank tests (OpenMPI under mpirun).
// The caller owns MPI: it calls MPI_Init before and MPI_Finalize after, and passes the communicator to use.
#pragma once

// The C API only: OpenMPI's deprecated C++ bindings do not compile cleanly with -Wextra -Werror.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <climits>
#include <cstddef>
#include <string>
#include <vector>

#include "communicator.hpp"

namespace mpopt::comm {

class mpi final : public communicator {
 public:
  // Duplicates `c`, so the optimizer's traffic never matches the caller's messages.
  explicit mpi(MPI_Comm c = MPI_COMM_WORLD) {
    check(MPI_Comm_dup(c, &comm_), "MPI_Comm_dup");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~mpi() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  mpi(const mpi&) = delete;
  mpi& operator=(const mpi&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  memory_space memory() const override { return memory_space::host; }
  std::string name() const override { return "mpi"; }
  MPI_Comm native() const noexcept { return comm_; }

  void all_reduce(void* buf, std::size_t count, dtype t, reduce_op op) override {
    count_all_reduce(count, t);
    if (count == 0) return;
    check(
        MPI_Allreduce(MPI_IN_PLACE, buf, to_int(count, "all_reduce"), reduce_type(t, "all_reduce"), to_mpi(op), comm_),
        "MPI_Allreduce");
  }

  void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, reduce_op op) override {
    count_spread(counts, t);
    std::vector<int> c(static_cast<std::size_t>(size_));
    std::size_t total = 0;
    for (int r = 0; r < size_; ++r) {
      c[std::size_t(r)] = to_int(counts[r], "reduce_scatter");
      total += counts[r];
    }
    if (total == 0) return;
    check(MPI_Reduce_scatter(send, recv, c.data(), reduce_type(t, "reduce_scatter"), to_mpi(op), comm_),
          "MPI_Reduce_scatter");
  }

  void all_gather(void* buf, const std::size_t* counts, dtype t) override {
    count_spread(counts, t);
    // Any element type travels as bytes: a gather copies, it does not compute.
    const std::size_t es = dtype_size(t);
    std::vector<int> c(static_cast<std::size_t>(size_)), displs(static_cast<std::size_t>(size_));
    std::size_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      c[std::size_t(r)] = to_int(counts[r] * es, "all_gather");
      displs[std::size_t(r)] = to_int(offset * es, "all_gather");
      offset += counts[r];
    }
    if (offset == 0) return;
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, c.data(), displs.data(), MPI_BYTE, comm_),
          "MPI_Allgatherv");
  }

  void broadcast(void* buf, std::size_t count, dtype t, int root) override {
    count_broadcast(count, t);
    if (count == 0) return;
    check(MPI_Bcast(buf, to_int(count * dtype_size(t), "broadcast"), MPI_BYTE, root, comm_), "MPI_Bcast");
  }

  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }

  void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) override {
    const int count = to_int(bytes_per_rank, "all_to_all_bytes");
    check_all_to_all(send, recv, bytes_per_rank);
    count_bytes_spread(bytes_per_rank);
    if (count == 0) return;
    check(MPI_Alltoall(send, count, MPI_BYTE, recv, count, MPI_BYTE, comm_), "MPI_Alltoall");
  }

  void all_gather_bytes(void* buf, std::size_t bytes_per_rank) override {
    const int count = to_int(bytes_per_rank, "all_gather_bytes");
    count_bytes_spread(bytes_per_rank);
    if (count == 0) return;
    check(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, count, MPI_BYTE, comm_), "MPI_Allgather");
  }

  using communicator::all_gather;
  using communicator::all_reduce;
  using communicator::broadcast;
  using communicator::reduce_scatter;

 private:
  static void check(int rc, const char* what) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw error(status{errc::unsupported, std::string(what) + " failed: " + std::string(text, std::size_t(len))});
  }
  static int to_int(std::size_t n, const char* what) {
    if (n > std::size_t(INT_MAX))
      throw error(status{errc::unsupported, std::string("mpi ") + what + ": " + std::to_string(n) +
                                                " exceeds MPI's int count; use a smaller bucket"});
    return int(n);
  }
  static MPI_Datatype reduce_type(dtype t, const char* what) {
    switch (t) {
      case dtype::fp32: return MPI_FLOAT;
      case dtype::fp64: return MPI_DOUBLE;
      default:
        throw error(status{errc::unsupported, std::string("mpi ") + what + ": MPI has no " + dtype_name(t) +
                                                  " arithmetic; reduce in fp32 or fp64"});
    }
  }
  static MPI_Op to_mpi(reduce_op op) { return op == reduce_op::sum ? MPI_SUM : MPI_MAX; }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace mpopt::comm
