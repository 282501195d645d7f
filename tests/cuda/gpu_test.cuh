// Shared by the CUDA tests: doctest, the runtime API, and a check that names the failing call.
// The runner (main) is tests/cuda/gpu_main.cpp; a test file only includes this header.
#pragma once

#include <doctest/doctest.h>

#include <cuda_runtime.h>

// REQUIREs that a CUDA runtime call succeeded, printing the call and the error string when not.
#define MPOPT_CUDA_REQUIRE(call)                            \
  do {                                                      \
    const cudaError_t mpopt_cuda_err_ = (call);             \
    INFO(#call, ": ", cudaGetErrorString(mpopt_cuda_err_)); \
    REQUIRE(mpopt_cuda_err_ == cudaSuccess);                \
  } while (0)
