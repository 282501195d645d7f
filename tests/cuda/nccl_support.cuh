// Shared by the NCCL tests: one NCCL rank on device 0 (NCCL allows one rank per GPU).
#pragma once

#include <nccl.h>

#include <memory>

#include "gpu_test.cuh"
#include "mpopt/comm/nccl.cuh"

namespace mpopt_test {

// One NCCL rank on device 0, owned by the communicator, on a fresh stream.
struct nccl_world_of_one {
  cudaStream_t stream = nullptr;
  std::unique_ptr<mpopt::comm::nccl> comm;

  nccl_world_of_one() {
    MPOPT_CUDA_REQUIRE(cudaSetDevice(0));
    MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream));
    ncclUniqueId id;
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    comm = std::make_unique<mpopt::comm::nccl>(id, 1, 0, stream);
  }
  ~nccl_world_of_one() {
    comm.reset();  // before the stream it uses
    cudaStreamDestroy(stream);
  }
};

}  // namespace mpopt_test
