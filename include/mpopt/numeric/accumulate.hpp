// accumulate_grad: the sum of an accumulated gradient and one more micro-batch gradient (DeepSpeed's
// data_types.grad_accum_dtype), for the host loops and the CUDA kernel alike.
#pragma once

#include <type_traits>

#include "../config.hpp"
#include "convert.hpp"

namespace mpopt {

// The type a sum of an Accum and a G is computed in: double when either is double, else float. float holds the sum
// of two 16-bit values with room to spare, so a 16-bit accumulator is rounded once, as torch's `acc += g` does.
template <class Accum, class G>
using accumulate_t = std::conditional_t<std::is_same_v<Accum, double> || std::is_same_v<G, double>, double, float>;

// acc + g, computed in accumulate_t and rounded once (to nearest even) to Accum.
template <class Accum, class G>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE Accum accumulate_grad(Accum acc, G g) {
  using wide = accumulate_t<Accum, G>;
  return convert<Accum>(convert<wide>(acc) + convert<wide>(g));
}

// ZeRO's grad mean: a reduced grad's sum over `world` ranks (in the reduction type R) divided by world, rounded to G,
// or added to `current` with accumulate_grad. The host optimizers and the CUDA kernel store reduced grads with it.
template <class G, class R>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE G store_mean(G current, R sum, R world, bool accumulate) {
  const R mean = sum / world;
  return accumulate ? accumulate_grad(current, mean) : convert<G>(mean);
}

}  // namespace mpopt
