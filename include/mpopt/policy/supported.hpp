// The precision policies mpopt supports, as a list, and a runtime -> compile-time dispatcher over a list.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "precision.hpp"

namespace mpopt {

template <class P, class M, class G, class S>
using precision_of = precision<param<P>, master<M>, grad<G>, state<S>>;

namespace detail {
// param x master x grad with fp32 states (master is the param type or fp32), plus bf16 states with a bf16 master.
template <class G>
using policies_for_grad = std::tuple<precision_of<float, float, G, float>, precision_of<half_t, float, G, float>,
                                     precision_of<half_t, half_t, G, float>, precision_of<bf16_t, float, G, float>,
                                     precision_of<bf16_t, bf16_t, G, float>, precision_of<bf16_t, bf16_t, G, bf16_t>>;
}  // namespace detail

// Every supported fp32-compute policy (18), then the fp64 reference policy.
using supported_precisions =
    decltype(std::tuple_cat(detail::policies_for_grad<float>{}, detail::policies_for_grad<half_t>{},
                            detail::policies_for_grad<bf16_t>{}, std::tuple<fp64_policy>{}));

template <class Prec>
constexpr bool precision_matches(dtype p, dtype m, dtype g, dtype s) {
  return dtype_of<typename Prec::param_t>::value == p && dtype_of<typename Prec::master_t>::value == m &&
         dtype_of<typename Prec::grad_t>::value == g && dtype_of<typename Prec::state_t>::value == s;
}

// Calls f(Prec{}) for the policy of `List` (a std::tuple of precisions) whose roles have these dtypes.
// Returns false, calling nothing, when the build has no such policy: only `List` is instantiated.
template <class List = supported_precisions, class F>
bool dispatch_precision(dtype p, dtype m, dtype g, dtype s, F&& f) {
  return std::apply(
      [&](auto... prec) { return ((precision_matches<decltype(prec)>(p, m, g, s) ? (f(prec), true) : false) || ...); },
      List{});
}

}  // namespace mpopt
