// The communication-compressed rules (DeepSpeed's runtime/fp16/onebit): 1-bit Adam, 0/1 Adam and 1-bit LAMB. Their
// hyper-parameters and element math; the phases, the compressed allreduce and the schedules are in
// onebit/optimizer.hpp.
//
// As in DeepSpeed none of the three applies bias correction, and weight decay is decoupled: the exact (warm-up)
// steps are mpopt::adam / mpopt::lamb with adam_w_mode (Adam) and bias_correction off, so they match those rules bit
// for bit, and the compressed steps reuse the same expressions with the variance frozen.
#pragma once

#include <cmath>
#include <cstdint>

#include "adam.hpp"
#include "common.hpp"
#include "lamb.hpp"

namespace mpopt {

namespace detail {

inline status check_step_count(const char* rule, const char* field, std::int64_t v, std::int64_t at_least) {
  if (v < at_least)
    return status::invalid(std::string(rule) + "." + field + " must be >= " + std::to_string(at_least) + ", got " +
                           std::to_string(v));
  return status::success();
}

// The Adam hyper-parameters the three 1-bit rules share (DeepSpeed's defaults), their checks, and the exact rule they
// are in the warm-up: AdamW without bias correction.
struct onebit_moment_args {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

inline status check_moment_args(const char* rule, const onebit_moment_args& a) {
  return first_error(check_nonnegative(rule, "lr", a.lr), check_beta(rule, "beta1", a.beta1),
                     check_beta(rule, "beta2", a.beta2), check_positive(rule, "eps", a.eps),
                     check_nonnegative(rule, "weight_decay", a.weight_decay));
}

inline adam::args exact_adam_args(const onebit_moment_args& a) {
  adam::args e;
  e.lr = a.lr;
  e.beta1 = a.beta1;
  e.beta2 = a.beta2;
  e.eps = a.eps;
  e.weight_decay = a.weight_decay;
  e.adam_w_mode = true;
  e.bias_correction = false;
  return e;
}

}  // namespace detail

// 1-bit Adam (Tang et al. 2021): exact Adam for freeze_step steps, then the variance is frozen and the momentum is
// averaged over ranks by the error-compensated 1-bit allreduce.
struct onebit_adam {
  static constexpr const char* name = "onebit_adam";
  struct args : detail::onebit_moment_args {
    std::int64_t freeze_step = 100000;  // exact steps before compression (DeepSpeed: ~15-25 % of training)
  };
  static constexpr int max_states = 2;
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"exp_avg", "exp_avg_sq"};
  static int num_states(const args&) { return 2; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    return detail::first_error(detail::check_moment_args(name, a),
                               detail::check_step_count(name, "freeze_step", a.freeze_step, 0));
  }
  static adam::args exact(const args& a) { return detail::exact_adam_args(a); }
};

// 0/1 Adam (Lu et al. 2022): the variance is updated only on exact steps that grow exponentially sparser (intervals
// 1 for var_update_scaler steps, then 2, 4, ...), the other steps average grads with the 1-bit allreduce; after
// var_freeze_step the variance is frozen and ranks take local steps, synchronising the accumulated update with the
// 1-bit allreduce every local_step_interval steps (1, 2, 4, ... up to local_step_clipper).
struct zero_one_adam {
  static constexpr const char* name = "zero_one_adam";
  struct args : detail::onebit_moment_args {
    std::int64_t var_freeze_step = 100000;
    std::int64_t var_update_scaler = 16;     // exact variance updates per interval before it doubles (kappa)
    std::int64_t local_step_scaler = 32678;  // local steps per interval before it doubles (DeepSpeed's default, sic)
    std::int64_t local_step_clipper = 16;    // the largest local-step interval (H)
  };
  static constexpr int max_states = 2;
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"exp_avg", "exp_avg_sq"};
  static int num_states(const args&) { return 2; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    return detail::first_error(detail::check_moment_args(name, a),
                               detail::check_step_count(name, "var_freeze_step", a.var_freeze_step, 0),
                               detail::check_step_count(name, "var_update_scaler", a.var_update_scaler, 1),
                               detail::check_step_count(name, "local_step_scaler", a.local_step_scaler, 1),
                               detail::check_step_count(name, "local_step_clipper", a.local_step_clipper, 1));
  }
  static adam::args exact(const args& a) { return detail::exact_adam_args(a); }
};

// 1-bit LAMB (Li et al. 2021): exact LAMB for freeze_step steps while an EMA of the trust ratios is kept; then the
// momentum of all tensors, each rescaled to a common RMS, goes through one 1-bit allreduce, the variance is frozen,
// and each tensor's ratio is the frozen EMA times a factor from a fresh variance of the reconstructed gradients,
// bounded to [factor_min, factor_max] and to factor_threshold of its last value.
struct onebit_lamb {
  static constexpr const char* name = "onebit_lamb";
  struct args : detail::onebit_moment_args {
    std::int64_t freeze_step = 100000;
    double max_coeff = 10.0;
    double min_coeff = 0.01;
    double coeff_beta = 0.9;  // EMA of the warm-up trust ratios; 1 / (1 - coeff_beta) should be <= freeze_step
    double factor_max = 4.0;
    double factor_min = 0.5;
    double factor_threshold = 0.1;
  };
  static constexpr int max_states = 3;
  static constexpr bool per_tensor = true;
  static constexpr const char* state_names[max_states] = {"exp_avg", "exp_avg_sq", "exp_avg_sq_fresh"};
  static int num_states(const args&) { return 3; }
  static double initial_state(const args&, int) { return 0.0; }

  static status validate(const args& a) {
    status s = detail::first_error(
        detail::check_moment_args(name, a), detail::check_step_count(name, "freeze_step", a.freeze_step, 0),
        detail::check_nonnegative(name, "min_coeff", a.min_coeff), detail::check_beta(name, "coeff_beta", a.coeff_beta),
        detail::check_positive(name, "factor_min", a.factor_min),
        detail::check_nonnegative(name, "factor_threshold", a.factor_threshold));
    if (s.ok() && !(a.max_coeff >= a.min_coeff))
      return detail::field_error(name, "max_coeff", ">= min_coeff", a.max_coeff);
    if (s.ok() && !(std::isfinite(a.factor_max) && a.factor_max >= a.factor_min))
      return detail::field_error(name, "factor_max", "finite and >= factor_min", a.factor_max);
    return s;
  }

  // The exact steps: LAMB without bias correction (lamb::direction is then m / (sqrt(v) + eps) + wd * w exactly).
  static lamb::args exact(const args& a) {
    lamb::args e;
    e.lr = a.lr;
    e.beta1 = a.beta1;
    e.beta2 = a.beta2;
    e.eps = a.eps;
    e.weight_decay = a.weight_decay;
    e.max_coeff = a.max_coeff;
    e.min_coeff = a.min_coeff;
    e.bias_correction = false;
    return e;
  }

  // Per tensor: the frozen EMA of the warm-up trust ratios, the last bounded factor, the momentum equaliser (0 until
  // the first compressed step) and the coefficient of the last step (for logging). Host and CUDA optimizers keep it.
  struct tensor_state {
    double coeff_freeze = 0.0;
    double last_factor = 1.0;
    double scaling_coeff = 0.0;
    double last_coeff = 1.0;
  };

  // A warm-up step's trust ratio joins the EMA (a ratio of exactly 1, LAMB's "a norm is zero", does not).
  MPOPT_HOST_DEVICE static void record_warmup_ratio(const args& a, tensor_state& t, double ratio) {
    if (ratio != 1.0) t.coeff_freeze = a.coeff_beta * t.coeff_freeze + (1 - a.coeff_beta) * ratio;
    t.last_coeff = ratio;
  }

  // A tensor's compressed-phase factor from max_i (sqrt(v_i) + eps) / (sqrt(v_fresh_i) + eps) and, with weight decay,
  // the norms of the update without (u0) and with (u) it; bounded as described above. Returns the new last factor.
  MPOPT_HOST_DEVICE static double bounded_factor(const args& a, double max_ratio, double u0_norm, double u_norm,
                                                 double last_factor) {
    double f = max_ratio;
    if (a.weight_decay > 0 && u_norm > 0) {
      const double rho = std::fmin(1.0, u0_norm / u_norm);
      f = f * rho + (1.0 - rho);
    }
    f = std::fmin(std::fmax(f, a.factor_min), a.factor_max);
    return std::fmin(std::fmax(f, last_factor * (1.0 - a.factor_threshold)), last_factor * (1.0 + a.factor_threshold));
  }

  // A compressed step's coefficient of one tensor: the frozen EMA times the bounded factor.
  MPOPT_HOST_DEVICE static void record_compressed_factor(const args& a, tensor_state& t, double max_ratio,
                                                         double u0_norm, double u_norm) {
    t.last_factor = bounded_factor(a, max_ratio, u0_norm, u_norm, t.last_factor);
    t.last_coeff = t.coeff_freeze * t.last_factor;
  }

  // The equaliser of a tensor whose momentum has RMS `rms`, when the tensors' mean RMS is `united`: an all-zero
  // momentum keeps scale 1 (DeepSpeed divides by zero).
  MPOPT_HOST_DEVICE static double equaliser(double rms, double united) {
    return rms > 0 && united > 0 ? united / rms : 1.0;
  }
};

// The compressed-phase element math, shared by the three rules (C: the compute type).
namespace onebit_math {

// m <- beta1 m + (1 - beta1) g, as adam::apply and lamb::update_states advance it.
template <class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C momentum(C m, C beta1, C one_minus_beta1, C g) {
  return m * beta1 + one_minus_beta1 * g;
}

// The Adam update with a frozen variance: adam::apply after its moment updates (bias correction off).
template <class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C adam_weight(const adam::coeffs<C>& k, C w, C m, C v) {
  return adam::update_weight(k, w * k.decay_factor, m, v);
}

}  // namespace onebit_math
}  // namespace mpopt
