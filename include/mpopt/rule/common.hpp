// Shared pieces of the update rules: hyper-parameter validation and compute-type helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "../config.hpp"
#include "../error.hpp"

namespace mpopt {

// The rule concept. Every rule R has:
//   R::args                  plain struct of hyper-parameters (doubles), validated by R::validate -> status
//   R::max_states, R::num_states(args), R::initial_state(args, j), R::state_names
//   R::coeffs<C>             per-step scalars, from MPOPT_HOST_DEVICE R::prepare<C>(args, step), step counted from 1
//   R::apply(k, w, g, s)     MPOPT_HOST_DEVICE per-element update (elementwise rules); s has R::max_states slots,
//                            the first num_states loaded from the state buffers, the rest zero; only those
//                            num_states are stored back
//   R::per_tensor            true for rules with per-tensor norms (LAMB: update_states, direction, trust_ratio,
//                            apply_direction instead of apply)

namespace detail {

// Formats "<rule>.<field> must be <what>, got <value>" with the value written exactly.
inline status field_error(const char* rule, const char* field, const char* what, double value) {
  std::ostringstream os;
  os.precision(17);
  os << rule << "." << field << " must be " << what << ", got " << value;
  return status::invalid(os.str());
}

// Each returns the first violated rule for one field, or success. Non-finite values are always rejected.
inline status check_nonnegative(const char* rule, const char* field, double v) {
  if (!std::isfinite(v) || v < 0) return field_error(rule, field, "finite and >= 0", v);
  return status::success();
}
inline status check_positive(const char* rule, const char* field, double v) {
  if (!std::isfinite(v) || v <= 0) return field_error(rule, field, "finite and > 0", v);
  return status::success();
}
inline status check_beta(const char* rule, const char* field, double v) {
  if (!std::isfinite(v) || v < 0 || v >= 1) return field_error(rule, field, "in [0, 1)", v);
  return status::success();
}
inline status check_unit_closed(const char* rule, const char* field, double v) {
  if (!std::isfinite(v) || v < 0 || v > 1) return field_error(rule, field, "in [0, 1]", v);
  return status::success();
}

// Runs checks in order and keeps the first failure.
template <class... Checks>
status first_error(const Checks&... checks) {
  status result;
  ((result.ok() ? (void)(result = checks) : (void)0), ...);
  return result;
}

template <class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C sqrt_c(C x) {
  return std::sqrt(x);
}

template <class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C sign_c(C x) {
  return x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0));
}

template <class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C max_c(C a, C b) {
  // NaN in `b` propagates, as torch.maximum does.
  return (a < b || b != b) ? b : a;
}

}  // namespace detail
}  // namespace mpopt
