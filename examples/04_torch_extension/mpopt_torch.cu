// A PyTorch C++/CUDA extension that steps torch tensors with mpopt on the GPU (built by train.py with
// torch.utils.cpp_extension.load). The model's params and grads must be views into two flat CUDA tensors (train.py
// arranges it, as DeepSpeed does); mpopt keeps the fp32 master (for bf16 params) and the AdamW states itself.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>

#include <memory>
#include <vector>

#include <mpopt/cuda/optimizer.cuh>

namespace {

struct stepper {
  virtual ~stepper() = default;
  virtual void step(cudaStream_t s) = 0;
  virtual mpopt::step_result result(cudaStream_t s) const = 0;
};

// mpopt::cuda::optimizer over one flat group; T is the torch element type, Prec the mpopt policy.
template <class T, class Prec>
struct adamw_stepper final : stepper {
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, Prec>;
  opt_t opt;
  static opt_t make(torch::Tensor& params, torch::Tensor& grads, std::vector<std::size_t> sizes,
                    const mpopt::adamw::args& hp, const mpopt::step_options& o, cudaStream_t s) {
    mpopt::param_group<mpopt::adamw, Prec> g;
    g.params = reinterpret_cast<typename Prec::param_t*>(params.data_ptr<T>());
    g.grads = reinterpret_cast<const typename Prec::grad_t*>(grads.data_ptr<T>());
    g.size = std::size_t(params.numel());
    g.tensor_sizes = std::move(sizes);
    g.hparams = hp;
    return opt_t({g}, {}, o, s);
  }
  adamw_stepper(torch::Tensor& p, torch::Tensor& g, std::vector<std::size_t> sizes, const mpopt::adamw::args& hp,
                const mpopt::step_options& o, cudaStream_t s)
      : opt(make(p, g, std::move(sizes), hp, o, s)) {}
  void step(cudaStream_t s) override { opt.step(s); }
  mpopt::step_result result(cudaStream_t s) const override { return opt.result(s); }
};

class AdamW {
 public:
  AdamW(torch::Tensor params, torch::Tensor grads, std::vector<int64_t> tensor_sizes, double lr, double beta1,
        double beta2, double eps, double weight_decay, double max_grad_norm)
      : params_(params), grads_(grads) {
    TORCH_CHECK(params.is_cuda() && grads.is_cuda(), "mpopt: params and grads must be CUDA tensors");
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
    const cudaStream_t s = at::cuda::getCurrentCUDAStream();
    try {
      if (params.scalar_type() == torch::kFloat32)  // fp32 throughout: the param tensor is the master
        impl_ = std::make_unique<adamw_stepper<float, mpopt::fp32_policy>>(params, grads, sizes, hp, o, s);
      else if (params.scalar_type() == torch::kBFloat16)  // bf16 params and grads, fp32 master and states
        impl_ = std::make_unique<adamw_stepper<at::BFloat16, mpopt::bf16_mixed_policy>>(params, grads, sizes, hp, o, s);
      else
        TORCH_CHECK(false, "mpopt: params must be float32 or bfloat16, got ", params.scalar_type());
    } catch (const mpopt::error& e) {
      TORCH_CHECK(false, "mpopt: ", e.what());  // a Python RuntimeError naming the field
    }
  }

  // Enqueues the whole step on torch's current stream: no host synchronisation.
  void step() { impl_->step(at::cuda::getCurrentCUDAStream()); }

  // Waits for the stream; (applied, grad_norm).
  std::pair<bool, double> last_result() const {
    const mpopt::step_result r = impl_->result(at::cuda::getCurrentCUDAStream());
    return {r.applied, r.grad_norm};
  }

 private:
  torch::Tensor params_, grads_;  // keep the buffers alive as long as the optimizer
  std::unique_ptr<stepper> impl_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<AdamW>(m, "AdamW")
      .def(py::init<torch::Tensor, torch::Tensor, std::vector<int64_t>, double, double, double, double, double,
                    double>(),
           py::arg("params"), py::arg("grads"), py::arg("tensor_sizes"), py::arg("lr") = 1e-3, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("weight_decay") = 1e-2,
           py::arg("max_grad_norm") = 0.0)
      .def("step", &AdamW::step)
      .def("last_result", &AdamW::last_result);
}
