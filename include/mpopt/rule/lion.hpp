// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):
// c = b1*m + (1-b1)*g; w = w*(1 - lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g.
#pragma once

#include <cstdint>

#include "common.hpp"

namespace mpopt {

struct lion {
  static constexpr const char* name = "lion";
  struct args {
    double lr = 1e-4;
    double beta1 = 0.9;
    double beta2 = 0.99;
    double weight_decay = 0.0;
  };

  static constexpr int max_states = 1;  // exp_avg
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"exp_avg"};
  static int num_states(const args&) { return 1; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    return detail::first_error(detail::check_nonnegative(name, "lr", a.lr), detail::check_beta(name, "beta1", a.beta1),
                               detail::check_beta(name, "beta2", a.beta2),
                               detail::check_nonnegative(name, "weight_decay", a.weight_decay));
  }

  template <class C>
  struct coeffs {
    C lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor;
  };

  template <class C>
  MPOPT_HOST_DEVICE static coeffs<C> prepare(const args& a, std::int64_t) {
    return {C(a.lr), C(a.beta1), C(1.0 - a.beta1), C(a.beta2), C(1.0 - a.beta2), C(1.0 - a.lr * a.weight_decay)};
  }

  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void apply(const coeffs<C>& k, C& w, C g, C* s) {
    const C c = k.beta1 * s[0] + k.one_minus_beta1 * g;
    w = w * k.decay_factor - k.lr * detail::sign_c(c);
    s[0] = k.beta2 * s[0] + k.one_minus_beta2 * g;
  }
};

}  // namespace mpopt
