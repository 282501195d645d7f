// SGD with momentum, dampening, nesterov and L2 weight decay (torch.optim.SGD).
#pragma once

#include <cstdint>

#include "common.hpp"

namespace mpopt {

struct sgd {
  static constexpr const char* name = "sgd";
  struct args {
    double lr = 1e-3;
    double momentum = 0.0;
    double dampening = 0.0;
    double weight_decay = 0.0;
    bool nesterov = false;
  };

  static constexpr int max_states = 1;  // momentum_buffer (only when momentum != 0)
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"momentum_buffer"};
  static int num_states(const args& a) { return a.momentum != 0.0 ? 1 : 0; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    status s = detail::first_error(detail::check_nonnegative(name, "lr", a.lr),
                                   detail::check_nonnegative(name, "momentum", a.momentum),
                                   detail::check_unit_closed(name, "dampening", a.dampening),
                                   detail::check_nonnegative(name, "weight_decay", a.weight_decay));
    if (s.ok() && a.nesterov && (a.momentum <= 0 || a.dampening != 0))
      return status::invalid("sgd.nesterov requires momentum > 0 and dampening == 0, got momentum " +
                             std::to_string(a.momentum) + " and dampening " + std::to_string(a.dampening));
    return s;
  }

  template <class C>
  struct coeffs {
    C lr, momentum, one_minus_dampening, weight_decay;
    bool use_momentum, nesterov, first_step;
  };

  template <class C>
  MPOPT_HOST_DEVICE static coeffs<C> prepare(const args& a, std::int64_t step) {
    return {C(a.lr), C(a.momentum), C(1.0 - a.dampening), C(a.weight_decay), a.momentum != 0.0, a.nesterov, step == 1};
  }

  // s[0] is the momentum buffer (a scratch slot without momentum). Selects, not branches, so host loops vectorise.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void apply(const coeffs<C>& k, C& w, C g, C* s) {
    g = g + k.weight_decay * w;
    // torch starts the buffer at the first gradient, undamped.
    s[0] = k.first_step ? g : s[0] * k.momentum + k.one_minus_dampening * g;
    const C with_momentum = k.nesterov ? g + k.momentum * s[0] : s[0];
    g = k.use_momentum ? with_momentum : g;
    w = w - k.lr * g;
  }
};

}  // namespace mpopt
