// Every elementwise rule under five precision policies, on the CUDA backend against the host backend: ten steps
// from identical inputs each, within the bound explained in test_cuda_support.cuh (the device fuses multiply-adds).
// Groups cover the three access paths of the update kernel: 16-byte vectors with a tail (4099 elements), an
// unaligned buffer (scalar path), a group smaller than one vector, an empty group, and groups with different
// hyper-parameters and state counts in one step.
#include "test_cuda_support.cuh"

using namespace mpopt_test;

namespace {

// fp16 params get the dynamic loss scaler they are used with; the others none.
template <class Prec>
using scaler_for =
    std::conditional_t<std::is_same_v<typename Prec::param_t, half_t>, mpopt::dynamic_scaler, mpopt::no_scaler>;

template <class Rule, class Prec>
void lockstep(const typename Rule::args& a, const typename Rule::args& b, int steps = 10) {
  std::vector<group_spec<Rule>> groups(5);
  groups[0].size = 4099;
  groups[0].hparams = a;
  groups[1].size = 517;
  groups[1].offset = 1;  // misaligned for 16-byte access
  groups[1].hparams = b;
  groups[2].size = 0;
  groups[2].hparams = a;
  groups[3].size = 5;  // less than one vector
  groups[3].hparams = b;
  groups[4].size = 1024;
  groups[4].hparams = b;
  twin<Rule, Prec, scaler_for<Prec>> t(groups);
  CHECK(t.run_lockstep(steps) == steps);
}

}  // namespace

#define MPOPT_RULE_POLICIES fp32, bf16_mixed, fp16_mixed, bf16_pure, fp16_master

TEST_CASE_TEMPLATE("adamw on the device matches the host", Prec, MPOPT_RULE_POLICIES) {
  mpopt::adamw::args a, b;
  a.lr = 1e-2;
  a.weight_decay = 0.1;
  b.lr = 3e-3;
  b.beta1 = 0.8;
  b.beta2 = 0.99;
  b.eps = 1e-6;
  b.weight_decay = 0.0;
  lockstep<mpopt::adamw, Prec>(a, b);
}

TEST_CASE_TEMPLATE("adam (L2 decay, amsgrad, no bias correction) on the device matches the host", Prec, fp32,
                   bf16_mixed) {
  mpopt::adam::args a, b;
  a.lr = 1e-2;
  a.weight_decay = 1e-2;
  a.amsgrad = true;  // three states: the state-count-3 kernel
  b = a;
  b.bias_correction = false;
  b.lr = 1e-3;
  lockstep<mpopt::adam, Prec>(a, b);
}

TEST_CASE_TEMPLATE("sgd on the device matches the host", Prec, MPOPT_RULE_POLICIES) {
  mpopt::sgd::args a, b;
  a.lr = 1e-2;
  a.momentum = 0.9;
  a.nesterov = true;
  a.weight_decay = 1e-3;
  b.lr = 5e-2;  // no momentum: no state, a second update launch in the same step
  b.weight_decay = 1e-2;
  lockstep<mpopt::sgd, Prec>(a, b);

  mpopt::sgd::args c = a;
  c.nesterov = false;
  c.dampening = 0.1;
  lockstep<mpopt::sgd, Prec>(c, c, 4);
}

TEST_CASE_TEMPLATE("adagrad on the device matches the host", Prec, MPOPT_RULE_POLICIES) {
  mpopt::adagrad::args a, b;
  a.lr = 0.1;
  a.lr_decay = 1e-2;
  a.weight_decay = 1e-3;
  a.initial_accumulator_value = 0.1;
  lockstep<mpopt::adagrad, Prec>(a, b);
}

TEST_CASE_TEMPLATE("lion on the device matches the host", Prec, MPOPT_RULE_POLICIES) {
  mpopt::lion::args a, b;
  a.lr = 1e-3;
  a.weight_decay = 0.1;
  b.lr = 3e-4;
  b.beta1 = 0.95;
  b.beta2 = 0.98;
  lockstep<mpopt::lion, Prec>(a, b);
}
