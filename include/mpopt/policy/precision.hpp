// Precision policy: the element type of each of the four roles, checked at compile time.
#pragma once

#include <type_traits>

#include "../numeric/traits.hpp"
#include "rounding.hpp"

namespace mpopt {

// Role tags: precision<param<bf16_t>, master<float>, grad<bf16_t>, state<float>>.
template <class T>
struct param {
  using type = T;
};
// Rounding: how a 16-bit master takes its updates (policy/rounding.hpp): nearest_rounding, stochastic_rounding or
// kahan_summation.
template <class T, class Rounding = nearest_rounding>
struct master {
  using type = T;
  using rounding = Rounding;
};
template <class T>
struct grad {
  using type = T;
};
template <class T>
struct state {
  using type = T;
};
template <class T>
struct compute {
  using type = T;
};

namespace detail {
template <class T, template <class> class Role>
struct is_role : std::false_type {};
template <class T, template <class> class Role>
struct is_role<Role<T>, Role> : std::true_type {};
template <class T>
struct is_master : std::false_type {};
template <class T, class R>
struct is_master<master<T, R>> : std::true_type {};
template <class T>
inline constexpr bool is_storage_v = std::is_same_v<T, float> || std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>;
}  // namespace detail

// Supported (all checked below; each rule has a compile-fail test):
//  - param, grad: fp32, fp16 or bf16;
//  - master: the param's type or fp32 (a master narrower than the param would lose what the param holds);
//  - state: fp32, or bf16 together with a bf16 master (DeepSpeed's bf16_optimizer_states rule);
//    fp16 states are refused (the second moment under/overflows fp16: DeepSpeed calls it "not practical");
//  - compute: fp32; fp64 only with every role fp64 (reference runs).
template <class Param, class Master, class Grad, class State, class Compute = compute<float>>
struct precision {
  static_assert(detail::is_role<Param, mpopt::param>::value,
                "mpopt::precision: the 1st argument must be mpopt::param<T>, e.g. param<bf16_t>");
  static_assert(detail::is_master<Master>::value,
                "mpopt::precision: the 2nd argument must be mpopt::master<T>, e.g. master<float>");
  static_assert(detail::is_role<Grad, mpopt::grad>::value,
                "mpopt::precision: the 3rd argument must be mpopt::grad<T>, e.g. grad<bf16_t>");
  static_assert(detail::is_role<State, mpopt::state>::value,
                "mpopt::precision: the 4th argument must be mpopt::state<T>, e.g. state<float>");
  static_assert(detail::is_role<Compute, mpopt::compute>::value,
                "mpopt::precision: the 5th argument must be mpopt::compute<float> (or compute<double> for fp64 runs)");

  using param_t = typename Param::type;
  using master_t = typename Master::type;
  using master_rounding = typename Master::rounding;
  using grad_t = typename Grad::type;
  using state_t = typename State::type;
  using compute_t = typename Compute::type;

  static constexpr bool all_fp64 = std::is_same_v<param_t, double> && std::is_same_v<master_t, double> &&
                                   std::is_same_v<grad_t, double> && std::is_same_v<state_t, double>;

  static_assert(std::is_same_v<compute_t, float> || (std::is_same_v<compute_t, double> && all_fp64),
                "mpopt::precision: compute must be float; compute<double> is allowed only when param, master, "
                "grad and state are all double");
  static_assert(all_fp64 || detail::is_storage_v<param_t>, "mpopt::precision: param must be float, half_t or bf16_t");
  static_assert(all_fp64 || detail::is_storage_v<master_t>, "mpopt::precision: master must be float, half_t or bf16_t");
  static_assert(all_fp64 || detail::is_storage_v<grad_t>, "mpopt::precision: grad must be float, half_t or bf16_t");
  static_assert(all_fp64 || detail::is_storage_v<state_t>, "mpopt::precision: state must be float or bf16_t");
  static_assert(std::is_same_v<master_t, param_t> || std::is_same_v<master_t, float> || all_fp64,
                "mpopt::precision: master must be the param type or float; a master narrower than the param "
                "(or of the other 16-bit family) loses what the param holds. Use master<float>");
  static_assert(!std::is_same_v<state_t, half_t>,
                "mpopt::precision: fp16 optimizer states are not supported (the second moment under- and "
                "overflows fp16). Use state<float>, or state<bf16_t> with master<bf16_t>");
  static_assert(!std::is_same_v<state_t, bf16_t> || std::is_same_v<master_t, bf16_t>,
                "mpopt::precision: state<bf16_t> requires master<bf16_t> (DeepSpeed: bf16_optimizer_states "
                "requires bf16_master_weights_and_grads). Use state<float>, or master<bf16_t>");

  static_assert(is_master_rounding_v<master_rounding>,
                "mpopt::precision: master<T, R>: R must be nearest_rounding, stochastic_rounding or kahan_summation");
  static_assert(std::is_same_v<master_rounding, nearest_rounding> || is_16bit_v<master_t>,
                "mpopt::precision: stochastic_rounding and kahan_summation are for 16-bit masters (a float master "
                "already keeps small updates). Use master<bf16_t, R> or master<half_t, R>, or nearest_rounding");

  // Where master and param have one type, the param buffer is the master: no second copy.
  static constexpr bool separate_master = !std::is_same_v<master_t, param_t>;
};

// Common policies.
using fp32_policy = precision<param<float>, master<float>, grad<float>, state<float>>;
using fp64_policy = precision<param<double>, master<double>, grad<double>, state<double>, compute<double>>;
using bf16_mixed_policy = precision<param<bf16_t>, master<float>, grad<bf16_t>, state<float>>;
using fp16_mixed_policy = precision<param<half_t>, master<float>, grad<half_t>, state<float>>;
using bf16_pure_policy = precision<param<bf16_t>, master<bf16_t>, grad<bf16_t>, state<bf16_t>>;
// All-bf16 with the master's small updates kept: in expectation, or by a compensation buffer (policy/rounding.hpp).
using bf16_stochastic_policy =
    precision<param<bf16_t>, master<bf16_t, stochastic_rounding>, grad<bf16_t>, state<bf16_t>>;
using bf16_kahan_policy = precision<param<bf16_t>, master<bf16_t, kahan_summation>, grad<bf16_t>, state<bf16_t>>;

template <class P>
struct is_precision : std::false_type {};
template <class A, class B, class C, class D, class E>
struct is_precision<precision<A, B, C, D, E>> : std::true_type {};

}  // namespace mpopt
