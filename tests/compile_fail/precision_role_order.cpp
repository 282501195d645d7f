// expect-error: the 1st argument must be mpopt::param<T>
// Roles are positional: param, master, grad, state. Passing master<> first is refused.
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::master<float>, mpopt::param<float>, mpopt::grad<float>, mpopt::state<float>>;
P::master_t x;
