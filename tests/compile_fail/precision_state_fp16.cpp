// expect-error: fp16 optimizer states are not supported
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<mpopt::half_t>, mpopt::master<float>, mpopt::grad<mpopt::half_t>,
                           mpopt::state<mpopt::half_t>>;
P::state_t x;
