// expect-error: the 3rd argument must be mpopt::grad<T>
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::state<float>, mpopt::state<float>>;
P::master_t x;
