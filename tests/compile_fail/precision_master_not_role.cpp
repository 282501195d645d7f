// expect-error: the 2nd argument must be mpopt::master<T>
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::grad<float>, mpopt::grad<float>, mpopt::state<float>>;
P::master_t x;
