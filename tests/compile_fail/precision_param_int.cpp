// expect-error: param must be float, half_t or bf16_t
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<int>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>>;
P::param_t x;
