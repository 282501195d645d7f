// The per-element bodies of the 1-bit family's steps (1-bit Adam's compressed step, 0/1 Adam's compressed-grad and
// local steps, 1-bit LAMB's compressed step), on one element's master, param copy and states. The host loops
// (onebit/optimizer.hpp) and the CUDA kernels (cuda/onebit.cuh) both call these, so the two backends round alike step
// for step.
//
// Every state is stored and read back before the weight uses it (as the exact rules do), and the master is rounded
// once with the param copy made from that rounded master.
#pragma once

#include "../config.hpp"
#include "../numeric/convert.hpp"
#include "../rule/onebit.hpp"

namespace mpopt::onebit::element {

// Stores v as a state and returns it as stored.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C store_state(typename Prec::state_t& s, C v) {
  s = convert<typename Prec::state_t>(v);
  return convert<C>(s);
}

// w into the master and, with a separate master, the param copy (from the rounded master).
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE void store_weight(typename Prec::master_t& master, typename Prec::param_t& param,
                                                      C w) {
  master = convert<typename Prec::master_t>(w);
  if constexpr (Prec::separate_master) param = convert<typename Prec::param_t>(master);
}

// A local grad, unscaled and clipped by the step's factor: what 0/1 Adam averages between its exact steps.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C scaled_grad(typename Prec::grad_t g, C factor) {
  return convert<C>(g) * factor;
}

// The momentum advanced by a local grad (scaled by the step's unscale-and-clip factor), not stored: what 1-bit Adam
// averages, and 0/1 Adam's local step.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C local_momentum(const adam::coeffs<C>& k, typename Prec::state_t m,
                                                     typename Prec::grad_t g, C factor) {
  return onebit_math::momentum(convert<C>(m), k.beta1, k.one_minus_beta1, scaled_grad<Prec>(g, factor));
}

// Stores the momentum m_new, then Adam's weight step with the frozen variance v.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE void apply_momentum(const adam::coeffs<C>& k, typename Prec::master_t& master,
                                                        typename Prec::param_t& param, typename Prec::state_t& m,
                                                        typename Prec::state_t v, C m_new) {
  const C stored = store_state<Prec>(m, m_new);
  store_weight<Prec>(master, param, onebit_math::adam_weight(k, convert<C>(master), stored, convert<C>(v)));
}

// 0/1 Adam between exact steps: the averaged grad (already unscaled) advances the momentum, then the weight step.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE void apply_averaged_grad(const adam::coeffs<C>& k, typename Prec::master_t& master,
                                                             typename Prec::param_t& param, typename Prec::state_t& m,
                                                             typename Prec::state_t v, C avg) {
  apply_momentum<Prec>(k, master, param, m, v, onebit_math::momentum(convert<C>(m), k.beta1, k.one_minus_beta1, avg));
}

// Adam's denominator with the frozen variance (no bias correction in the 1-bit rules).
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C denominator(const adam::coeffs<C>& k, typename Prec::state_t v) {
  return mpopt::detail::sqrt_c(convert<C>(v)) + k.eps;
}

// 0/1 Adam's synchronisation, before the allreduce: this rank's update since the sync point, in momentum units.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C accumulated_update(const adam::coeffs<C>& k, typename Prec::master_t w,
                                                         float anchor, typename Prec::state_t v) {
  return (convert<C>(w) - anchor) * denominator<Prec>(k, v);
}

// ... after it: the averaged update x applied to the sync point, which moves to the new weight; the momentum becomes
// the average over the lr spent since the last synchronisation (kept when none was spent).
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE void apply_synchronised(const adam::coeffs<C>& k, typename Prec::master_t& master,
                                                            typename Prec::param_t& param, typename Prec::state_t& m,
                                                            typename Prec::state_t v, float& anchor, C x,
                                                            double lr_sum) {
  if (lr_sum > 0) store_state<Prec>(m, C(-double(x) / lr_sum));
  store_weight<Prec>(master, param, anchor + x / denominator<Prec>(k, v));
  anchor = convert<float>(master);
}

// 1-bit LAMB's compressed step (k: the exact LAMB's coefficients, Rule::exact). Before the allreduce: the momentum
// advanced by the local grad, times the tensor's equaliser.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE C lamb_fused_momentum(const lamb::coeffs<C>& k, C m_old, typename Prec::grad_t g,
                                                          C factor, C scale) {
  return onebit_math::momentum(m_old, k.beta1, k.one_minus_beta1, scaled_grad<Prec>(g, factor)) * scale;
}

// What one element adds to its tensor's sums: |update without decay|^2, |update|^2, and the variance ratio whose
// maximum bounds the factor.
template <class C>
struct lamb_terms {
  C u0, u, ratio;
};

// After the allreduce: stores the averaged momentum m_new (divided back by the equaliser, masked), and the fresh
// variance from the grad it implies (m_old: the momentum before this step); returns the element's terms.
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE lamb_terms<C> lamb_moments(const lamb::coeffs<C>& k, typename Prec::master_t w,
                                                               typename Prec::state_t& m, typename Prec::state_t v,
                                                               typename Prec::state_t& fresh, C m_new, C m_old) {
  C st[2];
  st[0] = store_state<Prec>(m, m_new);
  const C g_rec = (st[0] - k.beta1 * m_old) / k.one_minus_beta1;
  const C f = store_state<Prec>(fresh, k.beta2 * convert<C>(fresh) + k.one_minus_beta2 * (g_rec * g_rec));
  st[1] = convert<C>(v);
  const C fresh_denom = mpopt::detail::sqrt_c(f) + k.eps;
  return {lamb::adaptive(k, st), lamb::direction(k, convert<C>(w), st),
          (mpopt::detail::sqrt_c(st[1]) + k.eps) / fresh_denom};
}

// The weight step with the tensor's coefficient (the frozen EMA times the bounded factor).
template <class Prec, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE void lamb_apply(const lamb::coeffs<C>& k, typename Prec::master_t& master,
                                                    typename Prec::param_t& param, typename Prec::state_t m,
                                                    typename Prec::state_t v, C coeff) {
  const C st[2] = {convert<C>(m), convert<C>(v)};
  C w = convert<C>(master);
  lamb::apply_direction(k, w, lamb::direction(k, w, st), coeff);
  store_weight<Prec>(master, param, w);
}

}  // namespace mpopt::onebit::element
