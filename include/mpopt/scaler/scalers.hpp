// Scaler policies, the optimizer's Scaler template argument. Each has the same static interface:
//   args, state_type                      runtime hyper-parameters and the mutable state (trivially copyable)
//   validate(args) -> status              host only; the message names the field and the value
//   init(args) -> state_type
//   scale(state, args) -> float           the scale to multiply the loss by (1 without scaling)
//   update(state&, args, overflow) -> scale_event   once per optimizer step
//   skips_on_overflow(args) -> bool       whether non-finite grads skip the step
#pragma once

#include <cmath>
#include <string>

#include "../config.hpp"
#include "../error.hpp"
#include "loss_scaler.hpp"

namespace mpopt {

// No loss scaling (bf16, fp32). Non-finite grads still skip the step unless check_overflow is off.
struct no_scaler {
  struct args {
    // true: skip steps with non-finite grads (DeepSpeed ZeRO-1/2 bf16 check_grad_overflow, default on since
    // 2026-06). false: apply them anyway, as DeepSpeed ZeRO-3 bf16 does.
    bool check_overflow = true;
  };
  struct state_type {};

  static status validate(const args&) { return status::success(); }
  MPOPT_HOST_DEVICE static state_type init(const args&) { return {}; }
  MPOPT_HOST_DEVICE static float scale(const state_type&, const args&) { return 1.f; }
  MPOPT_HOST_DEVICE static scale_event update(state_type&, const args&, bool) { return scale_event::unchanged; }
  MPOPT_HOST_DEVICE static bool skips_on_overflow(const args& a) { return a.check_overflow; }
};

// A fixed loss scale (DeepSpeed fp16.loss_scale > 0). An overflow still skips the step; the scale stays.
struct static_scaler {
  struct args {
    float scale = 1.f;
  };
  struct state_type {};

  static status validate(const args& a) {
    if (!std::isfinite(a.scale) || a.scale <= 0)
      return status::invalid("static_scaler::args.scale must be finite and > 0, got " + detail::format_float(a.scale));
    return status::success();
  }
  MPOPT_HOST_DEVICE static state_type init(const args&) { return {}; }
  MPOPT_HOST_DEVICE static float scale(const state_type&, const args& a) { return a.scale; }
  MPOPT_HOST_DEVICE static scale_event update(state_type&, const args&, bool) { return scale_event::unchanged; }
  MPOPT_HOST_DEVICE static bool skips_on_overflow(const args&) { return true; }
};

// Dynamic loss scaling: the state machine of loss_scaler.hpp.
struct dynamic_scaler {
  using args = dynamic_scale_args;
  using state_type = scaler_state;

  static status validate(const args& a) { return mpopt::validate(a); }
  MPOPT_HOST_DEVICE static state_type init(const args& a) { return initial_scaler_state(a); }
  MPOPT_HOST_DEVICE static float scale(const state_type& s, const args&) { return s.scale; }
  MPOPT_HOST_DEVICE static scale_event update(state_type& s, const args& a, bool overflow) {
    return update_scale(s, a, overflow);
  }
  MPOPT_HOST_DEVICE static bool skips_on_overflow(const args&) { return true; }
};

}  // namespace mpopt
