// LAMB (You et al. 2019) as DeepSpeed's FusedLamb computes it: Adam moments, an update direction
// u = m_hat / (sqrt(v_hat) + eps) + wd * w, and a per-tensor trust ratio clamp(|w| / |u|, min_coeff, max_coeff)
// (1 when either norm is zero). Apex's FusedLAMB is min_coeff = 0, max_coeff = inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.hpp"

namespace mpopt {

struct lamb {
  static constexpr const char* name = "lamb";
  struct args {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-6;
    double weight_decay = 0.0;
    double max_coeff = 10.0;
    double min_coeff = 0.01;
    bool bias_correction = true;
  };

  static constexpr int max_states = 2;  // exp_avg, exp_avg_sq
  static constexpr bool per_tensor = true;
  static constexpr const char* state_names[max_states] = {"exp_avg", "exp_avg_sq"};
  static int num_states(const args&) { return 2; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    status s =
        detail::first_error(detail::check_nonnegative(name, "lr", a.lr), detail::check_beta(name, "beta1", a.beta1),
                            detail::check_beta(name, "beta2", a.beta2), detail::check_positive(name, "eps", a.eps),
                            detail::check_nonnegative(name, "weight_decay", a.weight_decay),
                            detail::check_nonnegative(name, "min_coeff", a.min_coeff));
    if (s.ok() && !(a.max_coeff >= a.min_coeff))  // also rejects NaN; +inf means no upper clamp
      return detail::field_error(name, "max_coeff", ">= min_coeff", a.max_coeff);
    return s;
  }

  template <class C>
  struct coeffs {
    C beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, inv_bc1, inv_bc2, lr;
    double max_coeff, min_coeff;
  };

  template <class C>
  MPOPT_HOST_DEVICE static coeffs<C> prepare(const args& a, std::int64_t step) {
    const double bc1 = a.bias_correction ? 1.0 - std::pow(a.beta1, double(step)) : 1.0;
    const double bc2 = a.bias_correction ? 1.0 - std::pow(a.beta2, double(step)) : 1.0;
    return {C(a.beta1),   C(1.0 - a.beta1), C(a.beta2), C(1.0 - a.beta2), C(a.eps),   C(a.weight_decay),
            C(1.0 / bc1), C(1.0 / bc2),     C(a.lr),    a.max_coeff,      a.min_coeff};
  }

  // Phase 1: advance the moments.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void update_states(const coeffs<C>& k, C g, C* s) {
    s[0] = s[0] * k.beta1 + k.one_minus_beta1 * g;
    s[1] = s[1] * k.beta2 + k.one_minus_beta2 * (g * g);
  }

  // The update direction from the stored moments; both phases call it, so they agree bit for bit.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static C direction(const coeffs<C>& k, C w, const C* s) {
    return adaptive(k, s) + k.weight_decay * w;
  }
  // m_hat / (sqrt(v_hat) + eps): the direction without weight decay (1-bit LAMB bounds its ratio to the direction).
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static C adaptive(const coeffs<C>& k, const C* s) {
    return (s[0] * k.inv_bc1) / (detail::sqrt_c(s[1] * k.inv_bc2) + k.eps);
  }

  // Per tensor, from the L2 norms of the weights and of the direction (accumulated in double).
  template <class C>
  MPOPT_HOST_DEVICE static C trust_ratio(const coeffs<C>& k, double w_norm, double u_norm) {
    if (!(w_norm > 0) || !(u_norm > 0)) return C(1);
    return C(std::fmin(std::fmax(w_norm / u_norm, k.min_coeff), k.max_coeff));
  }

  // Phase 2.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void apply_direction(const coeffs<C>& k, C& w, C u, C ratio) {
    w = w - (k.lr * ratio) * u;
  }
};

}  // namespace mpopt
