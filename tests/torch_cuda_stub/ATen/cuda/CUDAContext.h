// Build check only: Debian's CPU build of torch ships ATen/cuda/CUDAContext.h without the generated header it
// needs, so examples/CMakeLists.txt compiles example 04's CUDA extension with this stand-in in front of it. Never
// linked or run; train.py builds the extension against a real CUDA torch.
#pragma once

#include <cuda_runtime.h>

namespace at::cuda {

struct stream_stand_in {
  operator cudaStream_t() const { return nullptr; }
};
inline stream_stand_in getCurrentCUDAStream() {
  return {};
}

}  // namespace at::cuda
