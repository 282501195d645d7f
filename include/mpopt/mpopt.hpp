// mpopt umbrella header: everything host-side.
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "numeric.hpp"
#include "optimizer.hpp"
#include "policy/precision.hpp"
#include "policy/supported.hpp"
#include "rules.hpp"
#include "scaler/loss_scaler.hpp"
#include "scaler/scalers.hpp"
#include "scaler/unscale_clip.hpp"
