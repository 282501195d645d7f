// Memory traffic of one optimizer step, so a measured time reads as a fraction of memory bandwidth.
#pragma once

#include <cstddef>

namespace mpopt {

// Bytes moved per parameter by the fused update: read grad, master and every state; write master, every state,
// and the param copy when it is separate from the master. (The read-only statistics pass over the grads, when
// the step makes one, adds sizeof(grad_t).)
template <class Prec>
constexpr std::size_t update_bytes_per_param(int num_states) {
  return sizeof(typename Prec::grad_t) + 2 * sizeof(typename Prec::master_t) +
         2 * std::size_t(num_states) * sizeof(typename Prec::state_t) +
         (Prec::separate_master ? sizeof(typename Prec::param_t) : 0);
}

}  // namespace mpopt
