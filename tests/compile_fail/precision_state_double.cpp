// expect-error: state must be float or bf16_t
// fp64 states only in an all-fp64 policy.
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<double>>;
P::state_t x;
