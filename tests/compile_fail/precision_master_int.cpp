// expect-error: master must be float, half_t or bf16_t
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<int>, mpopt::grad<float>, mpopt::state<float>>;
P::master_t x;
