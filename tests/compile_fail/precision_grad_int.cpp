// expect-error: grad must be float, half_t or bf16_t
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<int>, mpopt::state<float>>;
P::grad_t x;
