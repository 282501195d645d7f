// mpopt-conformance's functions, shared by the command-line tool and the tests.
#pragma once

#include <stdexcept>

#include <nlohmann/json.hpp>

namespace mpopt::conformance {

// Malformed input or an unknown key; the message names the key and the value.
struct bad_input : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// {"optimizer", "dtype", "hparams", "w0", "grads"[, "precision", "tensor_sizes", "max_grad_norm"]}
// -> {"traj": params after each step, "master": master weights after each step}.
nlohmann::json run_optimizer_case(const nlohmann::json& c);
// {"init_scale", "scale_window", "min_scale", "hysteresis", "consecutive_hysteresis", "overflow"}
// -> {"scale_before", "hysteresis_after", "raised_at"}.
nlohmann::json run_scaler_case(const nlohmann::json& c);

}  // namespace mpopt::conformance
