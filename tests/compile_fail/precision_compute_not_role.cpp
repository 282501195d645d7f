// expect-error: the 5th argument must be mpopt::compute<float>
// A bare type where the compute role belongs.
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>, float>;
P::master_t x;
