// The training loop the examples and the end-to-end tests share: the MLP of mlp.hpp under any precision
// policy and scaler, the loss scale fed back into the next backward as a framework would.
#pragma once

#include <vector>

#include "mlp.hpp"
#include "mpopt/optimizer.hpp"
#include "mpopt/rule/adam.hpp"

namespace mlp_demo {

struct step_record {
  float loss;  // unscaled loss before this step's update
  mpopt::step_result result;
};

// Trains with AdamW from the same initial weights (rounded into Prec's param type) for `steps` steps.
struct run {
  std::vector<step_record> steps;
  float final_loss;  // loss of the weights after the last step
};

template <class Prec, class Scaler = mpopt::no_scaler>
run train(const dataset& d, int steps, const mpopt::adamw::args& hp, typename Scaler::args scaler = {},
          mpopt::step_options options = {}) {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  const std::vector<float> w0 = random_weights(d.s, 7, 1.0f);
  std::vector<param_t> params(w0.size());
  std::vector<grad_t> grads(w0.size());
  mpopt::param_group<mpopt::adamw, Prec> group;
  group.params = params.data();
  group.grads = grads.data();
  group.size = params.size();
  group.tensor_sizes = d.s.tensor_sizes();
  group.hparams = hp;
  mpopt::optimizer<mpopt::adamw, Prec, Scaler> opt({group}, scaler, options);
  opt.set_master(0, w0.data(), w0.size());

  run r;
  for (int i = 0; i < steps; ++i) {
    const float loss = loss_and_grad(d, params.data(), grads.data(), float(opt.loss_scale()));
    r.steps.push_back({loss, opt.step()});
  }
  r.final_loss = loss_and_grad(d, params.data(), grads.data(), 1.0f);
  return r;
}

}  // namespace mlp_demo
