// mpopt-conformance's functions, shared by the command-line tool and the tests.
#pragma once

#include <stdexcept>

#include <nlohmann/json.hpp>

#include "mpopt/comm/communicator.hpp"

namespace mpopt::conformance {

// Malformed input or an unknown key; the message names the key and the value.
struct bad_input : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// How to run a case: on one rank (no communicator), or sharded with ZeRO `stage` over `comm`, every rank feeding
// the case's grads as its local grads (their mean is the case's grads).
struct zero_run {
  comm::communicator* comm = nullptr;
  int stage = 0;
};

// {"optimizer", "dtype", "hparams", "w0", "grads"[, "precision", "tensor_sizes", "max_grad_norm"]}
// -> {"traj": params after each step, "master": master weights after each step}. Collective with a communicator;
// every rank returns the full trajectory.
nlohmann::json run_optimizer_case(const nlohmann::json& c, const zero_run& zero = {});
// {"init_scale", "scale_window", "min_scale", "hysteresis", "consecutive_hysteresis", "overflow"}
// -> {"scale_before", "hysteresis_after", "raised_at"}.
nlohmann::json run_scaler_case(const nlohmann::json& c);

}  // namespace mpopt::conformance
