// expect-error: master must be the param type or float; a master narrower than the param
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<float>, mpopt::master<mpopt::bf16_t>, mpopt::grad<float>, mpopt::state<float>>;
P::master_t x;
