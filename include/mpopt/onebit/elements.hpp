// The per-element bodies of the 1-bit Adam family's steps (1-bit Adam's compressed step, 0/1 Adam's compressed-grad
// and local steps), on one element's master, param copy and states. The host loops (onebit/optimizer.hpp) and the CUDA
// kernels (cuda/onebit.cuh) both call these, so the two backends round alike step for step.
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

}  // namespace mpopt::onebit::element
