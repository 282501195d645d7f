// Adam (L2 weight decay, torch.optim.Adam) and AdamW (decoupled decay, torch.optim.AdamW), with amsgrad
// and the bias-correction toggle. DeepSpeed's `adam_w_mode` is the `adam_w_mode` field.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.hpp"

namespace mpopt {

struct adam {
  static constexpr const char* name = "adam";
  struct args {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;
    bool adam_w_mode = false;  // false: L2 (decay added to the gradient); true: decoupled (AdamW)
    bool amsgrad = false;
    bool bias_correction = true;
  };

  static constexpr int max_states = 3;  // exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad only)
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static int num_states(const args& a) { return a.amsgrad ? 3 : 2; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    return detail::first_error(detail::check_nonnegative(name, "lr", a.lr), detail::check_beta(name, "beta1", a.beta1),
                               detail::check_beta(name, "beta2", a.beta2), detail::check_positive(name, "eps", a.eps),
                               detail::check_nonnegative(name, "weight_decay", a.weight_decay));
  }

  // Per-step scalars, formed in double and rounded once to C (as torch passes Python floats to its kernels).
  // l2_decay is 0 in AdamW mode and decay_factor 1 in Adam mode, so apply() has no branch on the mode (x * 1 and
  // g + 0 * w are exact for finite w).
  template <class C>
  struct coeffs {
    C beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2_decay, decay_factor, step_size, bias_correction2_sqrt;
    bool amsgrad;
  };

  template <class C>
  MPOPT_HOST_DEVICE static coeffs<C> prepare(const args& a, std::int64_t step) {
    const double bc1 = a.bias_correction ? 1.0 - std::pow(a.beta1, double(step)) : 1.0;
    const double bc2 = a.bias_correction ? 1.0 - std::pow(a.beta2, double(step)) : 1.0;
    return {C(a.beta1),
            C(1.0 - a.beta1),
            C(a.beta2),
            C(1.0 - a.beta2),
            C(a.eps),
            C(a.adam_w_mode ? 0.0 : a.weight_decay),
            C(a.adam_w_mode ? 1.0 - a.lr * a.weight_decay : 1.0),
            C(a.lr / bc1),
            C(std::sqrt(bc2)),
            a.amsgrad};
  }

  // s: exp_avg, exp_avg_sq, max_exp_avg_sq (max_states slots; the third is stored only with amsgrad). Same
  // operation order as torch's single-tensor Adam. Selects, not branches, so host loops vectorise.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void apply(const coeffs<C>& k, C& w, C g, C* s) {
    g = g + k.l2_decay * w;
    w = w * k.decay_factor;
    s[0] = s[0] * k.beta1 + k.one_minus_beta1 * g;
    s[1] = s[1] * k.beta2 + k.one_minus_beta2 * (g * g);
    s[2] = detail::max_c(s[2], s[1]);
    w = update_weight(k, w, s[0], k.amsgrad ? s[2] : s[1]);
  }

  // The weight step from the moments, after the decay; the 1-bit rules (rule/onebit.hpp) call it with a frozen v.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static C update_weight(const coeffs<C>& k, C w, C m, C v) {
    const C denom = detail::sqrt_c(v) / k.bias_correction2_sqrt + k.eps;
    return w - k.step_size * (m / denom);
  }
};

// torch.optim.AdamW: the same rule with decoupled decay and torch's AdamW defaults.
struct adamw : adam {
  static constexpr const char* name = "adamw";
  struct args : adam::args {
    args() {
      adam_w_mode = true;
      weight_decay = 1e-2;
    }
  };
  static status validate(const args& a) { return adam::validate(a); }
};

}  // namespace mpopt
