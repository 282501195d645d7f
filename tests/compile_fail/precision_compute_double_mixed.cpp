// expect-error: compute<double> is allowed only when param, master, grad and state are all double
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>,
                           mpopt::compute<double>>;
P::compute_t x;
