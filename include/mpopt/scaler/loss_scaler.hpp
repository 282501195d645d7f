// The dynamic loss-scale state machine: DeepSpeed's DynamicLossScaler.update_scale (hysteresis,
// consecutive_hysteresis, error at the minimum), with torch GradScaler's growth rule as an option.
// update_scale() is written once, MPOPT_HOST_DEVICE: the host backend and the CUDA step kernel run
// the same arithmetic, so host tests test what the GPU does.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../error.hpp"

namespace mpopt {

// Runtime hyper-parameters of dynamic loss scaling. The defaults are DeepSpeed's ZeRO path
// (DynamicLossScaler with the config defaults); see the presets below for the other two flavours.
struct dynamic_scale_args {
  float init_scale = 65536.f;        // 2^fp16.initial_scale_power
  std::int64_t scale_window = 1000;  // fp16.loss_scale_window: clean steps between growths
  // fp16.hysteresis (DeepSpeed's delayed_shift): overflows tolerated before backing off; 1 = back off on every
  // overflow. 0 is accepted and, as in DeepSpeed, means the scale never backs off (the counter only goes down).
  std::int32_t hysteresis = 2;
  bool consecutive_hysteresis = false;  // refill the hysteresis on every clean step, not only when the scale grows
  float min_scale = 1.f;                // fp16.min_loss_scale: backing off clamps here
  float max_scale = INFINITY;           // +inf: no maximum (DeepSpeed and torch have none)
  float growth_factor = 2.f;            // DeepSpeed hard-codes 2
  float backoff_factor = 0.5f;          // DeepSpeed divides by 2
  // An overflow with the hysteresis used up while the scale already equals min_scale is an error
  // (DeepSpeed ZeRO raises; raise_error_at_min_scale has no config key, so it is always on there).
  bool error_at_min = true;
  // true: DeepSpeed's growth rule, stable = iter - last_overflow_iter - 1, grow when stable > 0 and
  // stable % scale_window == 0 (first growth on the (window+1)-th clean step, then every window).
  // false: torch GradScaler's growth tracker (grow on every window-th consecutive clean step).
  bool deepspeed_window = true;

  // DeepSpeed ZeRO 1/2/3: DynamicLossScaler with the config defaults (the member defaults above).
  static dynamic_scale_args deepspeed() { return {}; }

  // DeepSpeed without ZeRO (FP16_Optimizer / FP16_UnfusedOptimizer inline update): no hysteresis, and the
  // scale just clamps at min_scale instead of raising.
  static dynamic_scale_args deepspeed_legacy() {
    dynamic_scale_args a;
    a.hysteresis = 1;
    a.error_at_min = false;
    return a;
  }

  // torch.amp.GradScaler defaults: 2^16, x2 after 2000 consecutive clean steps, x0.5 on every overflow.
  // torch has no minimum; ours is the smallest normal float, which keeps the scale out of subnormals (a
  // flush-to-zero device build would turn those into 0).
  static dynamic_scale_args torch_grad_scaler() {
    dynamic_scale_args a;
    a.scale_window = 2000;
    a.hysteresis = 1;
    a.min_scale = FLT_MIN;
    a.error_at_min = false;
    a.deepspeed_window = false;
    return a;
  }
};

// The mutable state, a plain trivially copyable aggregate: it can live in device memory and be saved and
// restored with memcpy. The fields are ordered so the struct has no padding, so a saved copy compares
// bit-exactly with memcmp.
struct scaler_state {
  std::int64_t iter;                // updates so far (DeepSpeed cur_iter); an error_at_min update is not counted
  std::int64_t last_overflow_iter;  // iter of the latest overflow, -1 before any
  std::int64_t growth_tracker;      // consecutive clean updates since the latest overflow or growth
  float scale;                      // the loss scale to use for the next backward
  std::int32_t hysteresis_left;     // DeepSpeed cur_hysteresis
};
static_assert(std::is_trivially_copyable<scaler_state>::value, "scaler_state is saved with memcpy");
static_assert(sizeof(scaler_state) == 3 * sizeof(std::int64_t) + sizeof(float) + sizeof(std::int32_t),
              "scaler_state must have no padding, so saved states compare bit-exactly");

enum class scale_event : std::uint8_t {
  unchanged,     // clean step, no growth due
  grew,          // the growth window completed: scale = min(scale * growth, max_scale), hysteresis refilled
                 // (consecutive off). At max_scale, or where the product is not finite, the scale stays put.
  backed_off,    // overflow with the hysteresis used up: scale = max(scale * backoff, min_scale), which leaves it
                 // at min_scale when it is already there (error_at_min off)
  absorbed,      // overflow absorbed by the hysteresis: the scale is unchanged, the counter goes down
  error_at_min,  // overflow at min_scale with error_at_min on: the state is NOT modified (DeepSpeed raises
                 // before changing anything); the caller decides whether to stop
};

inline const char* to_string(scale_event e) {
  switch (e) {
    case scale_event::unchanged: return "unchanged";
    case scale_event::grew: return "grew";
    case scale_event::backed_off: return "backed_off";
    case scale_event::absorbed: return "absorbed";
    case scale_event::error_at_min: return "error_at_min";
  }
  return "?";
}

namespace detail {

// Shortest of %g and %.9g that reads back as the same float, so "got 0.1" rather than "got 0.100000001".
inline std::string format_float(float v) {
  std::ostringstream os;
  os << v;
  std::istringstream is(os.str());
  float back = 0;
  if (std::isfinite(v) && (!(is >> back) || back != v)) {
    os.str("");
    os.precision(9);
    os << v;
  }
  return os.str();
}

inline status scale_args_error(const char* field, const char* what, const std::string& value) {
  return status::invalid(std::string("dynamic_scale_args.") + field + " must be " + what + ", got " + value);
}

}  // namespace detail

// Host only. Accepts exactly what update_scale handles; the message names the field and its value.
inline status validate(const dynamic_scale_args& a) {
  using detail::format_float;
  using detail::scale_args_error;
  if (!std::isfinite(a.init_scale) || a.init_scale <= 0)
    return scale_args_error("init_scale", "finite and > 0", format_float(a.init_scale));
  if (a.scale_window <= 0) return scale_args_error("scale_window", "> 0", std::to_string(a.scale_window));
  // DeepSpeed does not validate hysteresis; 0 reproduces its never-back-off behaviour, negatives mean nothing.
  if (a.hysteresis < 0)
    return scale_args_error("hysteresis", ">= 0 (1: back off on every overflow)", std::to_string(a.hysteresis));
  if (!std::isfinite(a.min_scale) || a.min_scale <= 0)
    return scale_args_error("min_scale", "finite and > 0", format_float(a.min_scale));
  if (!(a.max_scale >= a.min_scale))  // also rejects NaN; +inf means no maximum
    return scale_args_error("max_scale", ("+inf (no maximum) or >= min_scale " + format_float(a.min_scale)).c_str(),
                            format_float(a.max_scale));
  if (a.init_scale < a.min_scale || a.init_scale > a.max_scale)
    return scale_args_error(
        "init_scale",
        ("in [min_scale, max_scale] = [" + format_float(a.min_scale) + ", " + format_float(a.max_scale) + "]").c_str(),
        format_float(a.init_scale));
  if (!std::isfinite(a.growth_factor) || a.growth_factor <= 1)
    return scale_args_error("growth_factor", "finite and > 1", format_float(a.growth_factor));
  if (!(a.backoff_factor > 0 && a.backoff_factor < 1))
    return scale_args_error("backoff_factor", "in (0, 1)", format_float(a.backoff_factor));
  return status::success();
}

MPOPT_HOST_DEVICE inline scaler_state initial_scaler_state(const dynamic_scale_args& a) {
  scaler_state s{};
  s.iter = 0;
  s.last_overflow_iter = -1;
  s.growth_tracker = 0;
  s.scale = a.init_scale;
  s.hysteresis_left = a.hysteresis;
  return s;
}

// One update per optimizer step (per accumulation boundary), with `overflow` already reduced over every
// rank. With deepspeed_window this is DeepSpeed's DynamicLossScaler.update_scale line for line; the only
// addition is the ceiling: growth never produces inf. A grown scale above max_scale is clamped to it, and
// where the product is not finite (max_scale = +inf) the scale stays where it is, as torch does.
MPOPT_HOST_DEVICE inline scale_event update_scale(scaler_state& s, const dynamic_scale_args& a, bool overflow) {
  scale_event event = scale_event::unchanged;
  if (overflow) {
    if (a.hysteresis == 1 || s.hysteresis_left == 1) {
      if (s.scale == a.min_scale && a.error_at_min) return scale_event::error_at_min;
      const float lowered = s.scale * a.backoff_factor;
      s.scale = lowered < a.min_scale ? a.min_scale : lowered;
      event = scale_event::backed_off;
    } else {
      // Saturates instead of wrapping; only hysteresis 0 counts down without end.
      if (s.hysteresis_left > INT32_MIN) --s.hysteresis_left;
      event = scale_event::absorbed;
    }
    s.last_overflow_iter = s.iter;  // an absorbed overflow restarts the growth window too
    s.growth_tracker = 0;
  } else {
    if (a.consecutive_hysteresis) s.hysteresis_left = a.hysteresis;
    ++s.growth_tracker;
    bool grow;
    if (a.deepspeed_window) {
      const std::int64_t stable = s.iter - s.last_overflow_iter - 1;
      grow = stable > 0 && stable % a.scale_window == 0;
    } else {
      grow = s.growth_tracker == a.scale_window;
    }
    if (grow) {
      if (!a.consecutive_hysteresis) s.hysteresis_left = a.hysteresis;
      float grown = s.scale * a.growth_factor;
      if (grown > a.max_scale) grown = a.max_scale;
      if (grown <= FLT_MAX) s.scale = grown;  // false only for +inf
      s.growth_tracker = 0;
      event = scale_event::grew;
    }
  }
  ++s.iter;
  return event;
}

}  // namespace mpopt
