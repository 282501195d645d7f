// expect-compiles
// Control for the compile-fail harness: the supported policies compile (and so the failures above are the
// static_asserts, not a broken include path or flag).
#include <type_traits>

#include "mpopt/policy/precision.hpp"

// sizeof needs the complete type, so the class (and its static_asserts) is instantiated.
template <class P>
constexpr bool instantiates = sizeof(P) > 0;

static_assert(instantiates<mpopt::fp32_policy>);
static_assert(instantiates<mpopt::fp64_policy>);
static_assert(instantiates<mpopt::bf16_mixed_policy>);
static_assert(instantiates<mpopt::fp16_mixed_policy>);
static_assert(instantiates<mpopt::bf16_pure_policy>);
static_assert(instantiates<mpopt::precision<mpopt::param<mpopt::half_t>, mpopt::master<mpopt::half_t>,
                                            mpopt::grad<mpopt::half_t>, mpopt::state<float>>>);
static_assert(instantiates<mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<float>,
                                            mpopt::state<float>>>);
static_assert(mpopt::fp16_mixed_policy::separate_master && !mpopt::bf16_pure_policy::separate_master);
static_assert(std::is_same_v<mpopt::fp64_policy::compute_t, double>);
