// CUDA runtime errors as mpopt::status, each naming the call that failed. No exits, no aborts: constructors and
// setters throw mpopt::error (the API edge), the step reports through a status.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "../error.hpp"

namespace mpopt::cuda {

// ok for cudaSuccess; otherwise errc::unsupported (the device could not carry the request out) with the message
// "<what> failed: <error name>: <error string>", e.g. "cudaMalloc(master of group 0, 4096 bytes) failed: ...".
inline status to_status(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return status::success();
  return status{errc::unsupported, what + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err)};
}

// For calls made at the API edge (construction, setters): throws mpopt::error built by to_status. A failed runtime
// call also sets the thread's last error; it is cleared here so that a later cudaGetLastError() (ours in step(), or
// the caller's) does not report it a second time. Sticky errors stay, as they must.
inline void throw_if_cuda_error(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  throw error(to_status(err, what));
}

namespace detail {
// Keeps the first launch failure of a step: step() learns of it late and reports it later, it does not throw.
inline void keep_first_error(status& kept, cudaError_t err, const char* what) {
  if (err != cudaSuccess && kept.ok()) kept = to_status(err, what);
}
}  // namespace detail

}  // namespace mpopt::cuda
