// The doctest runner for the CUDA tests (compiled once, linked into every tests/cuda/*.cu executable).
// Without a usable device it prints why and exits 0 before running any test; ctest marks the test skipped.
// Set MPOPT_REQUIRE_GPU=1 where a device must be present (a GPU runner): then no device is a failure.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    const char* why = err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount found none";
    const char* require = std::getenv("MPOPT_REQUIRE_GPU");
    if (require != nullptr && *require != '\0' && *require != '0') {
      std::printf("no CUDA device: %s — and MPOPT_REQUIRE_GPU is set: failing\n", why);
      return 1;
    }
    std::printf("no CUDA device: %s — GPU tests skipped\n", why);
    return 0;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
