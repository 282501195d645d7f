// mpopt umbrella header: everything host-side (comm/mpi.hpp, which needs <mpi.h>, is included separately).
#pragma once

#include "comm/communicator.hpp"
#include "config.hpp"
#include "error.hpp"
#include "grad_accumulation.hpp"
#include "numeric.hpp"
#include "optimizer.hpp"
#include "policy/precision.hpp"
#include "policy/supported.hpp"
#include "rules.hpp"
#include "scaler/loss_scaler.hpp"
#include "scaler/scalers.hpp"
#include "scaler/unscale_clip.hpp"
#include "zero/partition.hpp"
