// Example 04's extension for CPU tensors: mpopt's host optimizer (OpenMP) steps the model in place. train.py builds
// it with torch.utils.cpp_extension when no CUDA device is present; mpopt_torch.cu is the GPU twin.
#include "mpopt_torch.h"

namespace {

template <class T, class Prec>
struct host_stepper final : mpopt_torch::stepper {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  mpopt::optimizer<mpopt::adamw, Prec> opt;
  mpopt::step_result last;
  host_stepper(torch::Tensor& p, torch::Tensor& g, std::vector<std::size_t> sizes, const mpopt::adamw::args& hp,
               const mpopt::step_options& o)
      : opt({mpopt_torch::flat_group<T, Prec>(p, g, std::move(sizes), hp)}, {}, o) {}
  void step() override { last = opt.step(); }
  mpopt::step_result result() const override { return last; }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  mpopt_torch::bind<host_stepper>(m);
}
