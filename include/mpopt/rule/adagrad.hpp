// Adagrad with lr_decay, initial_accumulator_value and L2 weight decay (torch.optim.Adagrad).
#pragma once

#include <cstdint>

#include "common.hpp"

namespace mpopt {

struct adagrad {
  static constexpr const char* name = "adagrad";
  struct args {
    double lr = 1e-2;
    double lr_decay = 0.0;
    double weight_decay = 0.0;
    double initial_accumulator_value = 0.0;
    double eps = 1e-10;
  };

  static constexpr int max_states = 1;  // sum of squared gradients
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"sum"};
  static int num_states(const args&) { return 1; }
  static double initial_state(const args& a, int) { return a.initial_accumulator_value; }

  static status validate(const args& a) {
    return detail::first_error(
        detail::check_nonnegative(name, "lr", a.lr), detail::check_nonnegative(name, "lr_decay", a.lr_decay),
        detail::check_nonnegative(name, "weight_decay", a.weight_decay),
        detail::check_nonnegative(name, "initial_accumulator_value", a.initial_accumulator_value),
        detail::check_positive(name, "eps", a.eps));
  }

  template <class C>
  struct coeffs {
    C clr, weight_decay, eps;
  };

  template <class C>
  MPOPT_HOST_DEVICE static coeffs<C> prepare(const args& a, std::int64_t step) {
    return {C(a.lr / (1.0 + double(step - 1) * a.lr_decay)), C(a.weight_decay), C(a.eps)};
  }

  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void apply(const coeffs<C>& k, C& w, C g, C* s) {
    g = g + k.weight_decay * w;
    s[0] = s[0] + g * g;
    const C std_dev = detail::sqrt_c(s[0]) + k.eps;
    w = w - k.clr * (g / std_dev);
  }
};

}  // namespace mpopt
