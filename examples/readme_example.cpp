#include <vector>
#include "mpopt/mpopt.hpp"

int main() {
  using prec = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<mpopt::bf16_t>,
                                mpopt::state<float>>;
  std::vector<mpopt::bf16_t> params(1024, mpopt::bf16_t(0.5f)), grads(1024, mpopt::bf16_t(0.1f));

  mpopt::param_group<mpopt::adamw, prec> group;
  group.params = params.data();  // the model's bf16 weights: step() rewrites them
  group.grads = grads.data();    // the model's bf16 gradients: step() reads them
  group.size = params.size();
  group.tensor_sizes = {512, 512};  // per-tensor views (LAMB's trust ratio uses them)
  group.hparams.lr = 3e-4;
  group.hparams.weight_decay = 0.1;

  mpopt::step_options options;
  options.max_grad_norm = 1.0;
  mpopt::optimizer<mpopt::adamw, prec> opt({group}, {}, options);

  mpopt::step_result r = opt.step();  // r.applied, r.grad_norm, r.clip_coef, r.loss_scale, ...
  return r.applied ? 0 : 1;
}
