// Example 04's extension for CUDA tensors: mpopt::cuda::optimizer steps the model on torch's current stream with no
// host synchronisation; mpopt keeps the fp32 master (for bf16 params) and the AdamW states itself. train.py builds
// it with torch.utils.cpp_extension; mpopt_torch.cpp is the CPU twin.
#include "mpopt_torch.h"

#include <ATen/cuda/CUDAContext.h>

#include <mpopt/cuda/optimizer.cuh>

namespace {

template <class T, class Prec>
struct cuda_stepper final : mpopt_torch::stepper {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  mpopt::cuda::optimizer<mpopt::adamw, Prec> opt;
  cuda_stepper(torch::Tensor& p, torch::Tensor& g, std::vector<std::size_t> sizes, const mpopt::adamw::args& hp,
               const mpopt::step_options& o)
      : opt({mpopt_torch::flat_group<T, Prec>(p, g, std::move(sizes), hp)}, {}, o, at::cuda::getCurrentCUDAStream()) {}
  void step() override { opt.step(at::cuda::getCurrentCUDAStream()); }
  mpopt::step_result result() const override { return opt.result(at::cuda::getCurrentCUDAStream()); }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  mpopt_torch::bind<cuda_stepper>(m);
}
