// Shared by the MPI checkpoint tests: sub-communicators of the world, directories every rank agrees on, and a
// checkpoint file cut short on one rank.
#pragma once

#include <mpopt/checkpoint/index.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>

#include "../mpi/mpi_test.hpp"

namespace ckpt_test {

// The first n world ranks, or nothing on the others.
struct sub_comm {
  MPI_Comm c = MPI_COMM_NULL;
  explicit sub_comm(int n) {
    MPI_Comm_split(MPI_COMM_WORLD, mpopt_test::world_rank() < n ? 0 : MPI_UNDEFINED, mpopt_test::world_rank(), &c);
  }
  sub_comm(const sub_comm&) = delete;
  sub_comm& operator=(const sub_comm&) = delete;
  ~sub_comm() {
    if (c != MPI_COMM_NULL) MPI_Comm_free(&c);
  }
  bool member() const { return c != MPI_COMM_NULL; }
};

// Directories every rank agrees on: shared("name") is <temp>/<prefix><rank 0's pid>/name. Both calls are collective
// over the world.
struct shared_space {
  std::string prefix;

  std::filesystem::path root() const {
    int pid = mpopt_test::world_rank() == 0 ? int(::getpid()) : 0;
    MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
    return std::filesystem::temp_directory_path() / (prefix + std::to_string(pid));
  }
  std::string operator()(const std::string& name) const { return (root() / name).string(); }
  // Removes the root and everything under it, once every rank is done with it.
  void remove() const {
    const std::filesystem::path r = root();
    MPI_Barrier(MPI_COMM_WORLD);
    if (mpopt_test::world_rank() == 0) std::filesystem::remove_all(r);
    MPI_Barrier(MPI_COMM_WORLD);
  }
};

// A checkpoint saved by the first save_world ranks at ZeRO save_stage, loaded by the first load_world at load_stage.
struct reshard {
  int save_world, save_stage, load_world, load_stage;

  // Whether this world has the ranks (the np4 run covers every case).
  bool fits() const { return std::max(save_world, load_world) <= mpopt_test::world_size(); }
  // "<what>_<save_world>s<save_stage>_<load_world>s<load_stage>": the case and its directory.
  std::string name(const std::string& what) const {
    return what + "_" + std::to_string(save_world) + "s" + std::to_string(save_stage) + "_" +
           std::to_string(load_world) + "s" + std::to_string(load_stage);
  }
};

// Rank 0 cuts the last byte off saving rank 0's file of the checkpoint in `dir` (saved by all world ranks); at the
// same world size and stage only rank 0 reads that file. Collective.
inline void truncate_rank0_file(const std::string& dir) {
  if (mpopt_test::world_rank() == 0) {
    const std::string f = dir + "/" + mpopt::checkpoint::rank_file_name(0, mpopt_test::world_size());
    std::filesystem::resize_file(f, std::filesystem::file_size(f) - 1);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}
// The load error of each rank then: rank 0's own, and on the others that rank 0 failed.
inline void check_rank0_truncated(const std::string& msg) {
  CAPTURE(msg);
  if (mpopt_test::world_rank() == 0) {
    CHECK(msg.find("(truncated)") != std::string::npos);
  } else {
    CHECK(msg.find("checkpoint load: failed on rank 0 (its error says why); nothing was changed") != std::string::npos);
  }
}

}  // namespace ckpt_test
