// expect-error: master must be the param type or float
// fp16 params with a bf16 master: the master cannot hold what the param holds.
#include "mpopt/policy/precision.hpp"

using P = mpopt::precision<mpopt::param<mpopt::half_t>, mpopt::master<mpopt::bf16_t>, mpopt::grad<mpopt::half_t>,
                           mpopt::state<float>>;
P::master_t x;
