// What the CPU and the GPU builds of example 04's extension share: the Python class AdamW, its argument checks and
// the dtype → precision-policy choice. Each source supplies Stepper<T, Prec> (an mpopt optimizer over one flat group
// of T) and the device it accepts; mpopt_torch.cpp steps CPU tensors with mpopt::optimizer, mpopt_torch.cu CUDA
// tensors with mpopt::cuda::optimizer.
#pragma once

#include <torch/extension.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <mpopt/error.hpp>
#include <mpopt/optimizer.hpp>
#include <mpopt/rule/adam.hpp>

namespace mpopt_torch {

struct stepper {
  virtual ~stepper() = default;
  virtual void step() = 0;
  virtual mpopt::step_result result() const = 0;
};

// One flat group over the tensors' storage. The tensors stay owned by AdamW, which outlives the stepper.
template <class T, class Prec>
mpopt::param_group<mpopt::adamw, Prec> flat_group(torch::Tensor& params, torch::Tensor& grads,
                                                  std::vector<std::size_t> sizes, const mpopt::adamw::args& hp) {
  mpopt::param_group<mpopt::adamw, Prec> g;
  g.params = reinterpret_cast<typename Prec::param_t*>(params.data_ptr<T>());
  g.grads = reinterpret_cast<const typename Prec::grad_t*>(grads.data_ptr<T>());
  g.size = std::size_t(params.numel());
  g.tensor_sizes = std::move(sizes);
  g.hparams = hp;
  return g;
}

template <template <class T, class Prec> class Stepper>
class AdamW {
 public:
  AdamW(torch::Tensor params, torch::Tensor grads, std::vector<int64_t> tensor_sizes, double lr, double beta1,
        double beta2, double eps, double weight_decay, double max_grad_norm)
      : params_(params), grads_(grads) {
    const c10::DeviceType device = Stepper<float, mpopt::fp32_policy>::device;
    TORCH_CHECK(params.device().type() == device && grads.device().type() == device, "mpopt: params and grads must be ",
                c10::DeviceTypeName(device), " tensors, got ", params.device(), " and ", grads.device());
    TORCH_CHECK(params.is_contiguous() && grads.is_contiguous(), "mpopt: params and grads must be contiguous");
    TORCH_CHECK(params.dim() == 1 && params.sizes() == grads.sizes(), "mpopt: flat params and grads of one size");
    TORCH_CHECK(params.scalar_type() == grads.scalar_type(), "mpopt: params and grads must have one dtype");
    mpopt::adamw::args hp;
    hp.lr = lr;
    hp.beta1 = beta1;
    hp.beta2 = beta2;
    hp.eps = eps;
    hp.weight_decay = weight_decay;
    mpopt::step_options o;
    o.max_grad_norm = max_grad_norm;
    std::vector<std::size_t> sizes(tensor_sizes.begin(), tensor_sizes.end());
    try {
      if (params.scalar_type() == torch::kFloat32)  // fp32 throughout: the param tensor is the master
        impl_ = std::make_unique<Stepper<float, mpopt::fp32_policy>>(params, grads, sizes, hp, o);
      else if (params.scalar_type() == torch::kBFloat16)  // bf16 params and grads, fp32 master and states
        impl_ = std::make_unique<Stepper<at::BFloat16, mpopt::bf16_mixed_policy>>(params, grads, sizes, hp, o);
      else
        TORCH_CHECK(false, "mpopt: params must be float32 or bfloat16, got ", params.scalar_type());
    } catch (const mpopt::error& e) {
      TORCH_CHECK(false, "mpopt: ", e.what());  // a Python RuntimeError naming the field
    }
  }

  void step() { impl_->step(); }

  // (applied, grad_norm) of the last step; on the GPU this waits for torch's current stream.
  std::pair<bool, double> last_result() const {
    const mpopt::step_result r = impl_->result();
    return {r.applied, r.grad_norm};
  }

 private:
  torch::Tensor params_, grads_;  // keep the buffers alive as long as the optimizer
  std::unique_ptr<stepper> impl_;
};

template <template <class T, class Prec> class Stepper>
void bind(pybind11::module& m) {
  namespace py = pybind11;
  using cls = AdamW<Stepper>;
  py::class_<cls>(m, "AdamW")
      .def(py::init<torch::Tensor, torch::Tensor, std::vector<int64_t>, double, double, double, double, double,
                    double>(),
           py::arg("params"), py::arg("grads"), py::arg("tensor_sizes"), py::arg("lr") = 1e-3, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("weight_decay") = 1e-2,
           py::arg("max_grad_norm") = 0.0)
      .def("step", &cls::step)
      .def("last_result", &cls::last_result);
}

}  // namespace mpopt_torch
