// expect-error: state<bf16_t> requires master<bf16_t>
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<mpopt::bf16_t>,
                           mpopt::state<mpopt::bf16_t>>;
P::state_t x;
