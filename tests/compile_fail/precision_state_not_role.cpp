// expect-error: the 4th argument must be mpopt::state<T>
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<float>, mpopt::grad<float>>;
P::master_t x;
