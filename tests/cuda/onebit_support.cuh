// Shared by the CUDA 1-bit tests: hyper-parameters that reach every phase within a few steps.
#pragma once

#include <type_traits>

#include "mpopt/rule/onebit.hpp"

namespace mpopt_test {

// 1-bit Adam and 1-bit LAMB: compressed from step 5. 0/1 Adam: variance frozen after step 6, then local steps whose
// interval grows.
template <class Rule>
typename Rule::args onebit_hparams() {
  typename Rule::args a;
  a.lr = 1e-2;
  a.weight_decay = 0.01;
  if constexpr (std::is_same_v<Rule, mpopt::onebit_adam> || std::is_same_v<Rule, mpopt::onebit_lamb>) {
    a.freeze_step = 4;
  } else {
    a.var_freeze_step = 6;
    a.var_update_scaler = 2;
    a.local_step_scaler = 2;
    a.local_step_clipper = 4;
  }
  return a;
}

}  // namespace mpopt_test
