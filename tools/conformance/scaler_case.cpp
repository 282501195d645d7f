// mpopt-conformance scaler: replays a sequence of overflow flags through the dynamic loss-scale state machine
// with DeepSpeed ZeRO semantics (DynamicLossScaler: hysteresis, error at the minimum scale).
//   in:  {"init_scale", "scale_window", "min_scale", "hysteresis", "consecutive_hysteresis", "overflow": [0|1, ...]}
//        every key but "overflow" is optional and defaults to DeepSpeed's config default
//   out: {"scale_before": [...], "hysteresis_after": [...], "raised_at": index or null}
// The run stops at the update that trips error-at-min, as DeepSpeed raises there: its scale_before is listed,
// its hysteresis_after is not.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "conformance.hpp"
#include "mpopt/scaler/loss_scaler.hpp"

namespace mpopt::conformance {

namespace {

// The scale lives in a float; a value that is not a float would silently start a different trajectory.
float float_at(const nlohmann::json& j, const std::string& key) {
  if (!j.is_number()) throw bad_input(key + ": expected a number, got " + j.dump());
  const double v = j.get<double>();
  if (std::isfinite(v) && (std::fabs(v) > double(std::numeric_limits<float>::max()) || double(float(v)) != v))
    throw bad_input(key + ": " + j.dump() + " is not exactly representable as a float (the scale is kept in float)");
  return float(v);
}

std::int64_t integer_at(const nlohmann::json& j, const std::string& key, std::int64_t lo, std::int64_t hi) {
  if (!j.is_number_integer()) throw bad_input(key + ": expected an integer, got " + j.dump());
  if (j.is_number_unsigned() ? j.get<std::uint64_t>() > std::uint64_t(hi)
                             : (j.get<std::int64_t>() < lo || j.get<std::int64_t>() > hi))
    throw bad_input(key + ": " + j.dump() + " is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) +
                    "]");
  return j.get<std::int64_t>();
}

bool overflow_at(const nlohmann::json& j, std::size_t i) {
  if (j.is_boolean()) return j.get<bool>();
  if (j.is_number_integer()) {
    const std::int64_t v = j.get<std::int64_t>();
    if (v == 0 || v == 1) return v == 1;
  }
  throw bad_input("overflow[" + std::to_string(i) + "]: expected 0, 1, true or false, got " + j.dump());
}

}  // namespace

nlohmann::json run_scaler_case(const nlohmann::json& c) {
  if (!c.is_object()) throw bad_input("case: expected a JSON object, got " + c.dump());
  dynamic_scale_args a = dynamic_scale_args::deepspeed();  // error_at_min on, DeepSpeed's growth window
  const nlohmann::json* overflow = nullptr;
  for (auto it = c.begin(); it != c.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    if (key == "init_scale") {
      a.init_scale = float_at(v, key);
    } else if (key == "scale_window") {
      a.scale_window =
          integer_at(v, key, std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max());
    } else if (key == "min_scale") {
      a.min_scale = float_at(v, key);
    } else if (key == "hysteresis") {
      a.hysteresis = std::int32_t(
          integer_at(v, key, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()));
    } else if (key == "consecutive_hysteresis") {
      if (!v.is_boolean()) throw bad_input(key + ": expected true or false, got " + v.dump());
      a.consecutive_hysteresis = v.get<bool>();
    } else if (key == "overflow") {
      if (!v.is_array()) throw bad_input(key + ": expected a list of 0/1 or true/false, got " + v.dump());
      overflow = &v;
    } else {
      throw bad_input(key +
                      ": unknown key in the scaler case (known: init_scale, scale_window, min_scale, "
                      "hysteresis, consecutive_hysteresis, overflow)");
    }
  }
  if (overflow == nullptr) throw bad_input("overflow: missing (the list of overflow flags, one per update)");
  const status s = validate(a);
  if (!s.ok()) throw bad_input(s.message);

  // Read every flag first, so bad input is reported before any output is made.
  std::vector<bool> flags;
  for (std::size_t i = 0; i < overflow->size(); ++i) flags.push_back(overflow_at((*overflow)[i], i));

  nlohmann::json scale_before = nlohmann::json::array(), hysteresis_after = nlohmann::json::array();
  nlohmann::json raised_at = nullptr;
  scaler_state state = initial_scaler_state(a);
  for (std::size_t i = 0; i < flags.size(); ++i) {
    scale_before.push_back(double(state.scale));
    if (update_scale(state, a, flags[i]) == scale_event::error_at_min) {
      raised_at = i;
      break;
    }
    hysteresis_after.push_back(state.hysteresis_left);
  }
  return {{"scale_before", std::move(scale_before)},
          {"hysteresis_after", std::move(hysteresis_after)},
          {"raised_at", std::move(raised_at)}};
}

}  // namespace mpopt::conformance
