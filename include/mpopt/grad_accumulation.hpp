// Gradient accumulation in a dtype of its own (DeepSpeed's data_types.grad_accum_dtype): the micro-batch grads come
// in the model's dtype and are summed into a buffer of the accumulation dtype, which the optimizer then reads as its
// grads. So the precision policy's grad role is the accumulation dtype, e.g. bf16 params with an fp32 accumulation:
//   precision<param<bf16_t>, master<float>, grad<float>, state<float>>, fed micro-batch grads of bf16_t.
// Stages 0-1 read param_group::grads (point it at the buffer); at stages 2-3 optimizer::reduce_grads() takes the
// micro-batch grads directly and accumulates the reduced shard in the grad role's dtype.
// Like DeepSpeed, this sums: scale the loss by 1 / micro-batches (or the learning rate) for a mean.
#pragma once

#include <cstddef>
#include <string>

#include "error.hpp"
#include "host/aligned_buffer.hpp"
#include "host/executor.hpp"
#include "numeric/accumulate.hpp"
#include "numeric/traits.hpp"

namespace mpopt {

namespace detail {
template <bool First, class Accum, class G>
void accumulate_loop(Accum* acc, const G* micro, std::ptrdiff_t count) {
#if defined(_OPENMP)
#pragma omp parallel for simd schedule(static) if (count > host::parallel_threshold)
#endif
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    if constexpr (First) {
      acc[i] = convert<Accum>(micro[i]);
    } else {
      acc[i] = accumulate_grad(acc[i], micro[i]);
    }
  }
}

template <class Accum, class G>
void check_accumulate_args(const Accum* acc, const G* micro, std::size_t n, const char* what) {
  static_assert(is_element_type_v<Accum> && is_element_type_v<G>,
                "mpopt::accumulate_grads: the accumulator and the micro-batch grads must be float, double, half_t or "
                "bf16_t");
  if (n > 0 && (acc == nullptr || micro == nullptr))
    throw error(status::invalid(std::string(what) + ": " + (acc == nullptr ? "acc" : "micro") + " is null but n is " +
                                std::to_string(n)));
}
}  // namespace detail

// acc[i] = accumulate_grad(acc[i], micro[i]) for i < n (host memory). The result does not depend on the thread count.
template <class Accum, class G>
void accumulate_grads(Accum* acc, const G* micro, std::size_t n) {
  detail::check_accumulate_args(acc, micro, n, "accumulate_grads");
  detail::accumulate_loop<false>(acc, micro, std::ptrdiff_t(n));
}

// The first micro-batch of a window: acc[i] = micro[i] rounded to Accum (no zeroing pass needed).
template <class Accum, class G>
void assign_grads(Accum* acc, const G* micro, std::size_t n) {
  detail::check_accumulate_args(acc, micro, n, "assign_grads");
  detail::accumulate_loop<true>(acc, micro, std::ptrdiff_t(n));
}

// An owning accumulation buffer of `size` elements of Accum: add() each micro-batch's grads (the first of a window
// overwrites), point param_group::grads at data() for the step, then reset() for the next window.
template <class Accum>
class grad_accumulator {
  static_assert(is_element_type_v<Accum>,
                "mpopt::grad_accumulator<Accum>: Accum must be float, double, half_t or bf16_t");

 public:
  explicit grad_accumulator(std::size_t size) : buffer_(size) {}

  template <class G>
  void add(const G* micro, std::size_t n) {
    if (n != buffer_.size())
      throw error(status::invalid("grad_accumulator::add: the buffer has " + std::to_string(buffer_.size()) +
                                  " elements, got n = " + std::to_string(n)));
    if (micro_batches_ == 0) {
      assign_grads(buffer_.data(), micro, n);
    } else {
      accumulate_grads(buffer_.data(), micro, n);
    }
    ++micro_batches_;
  }
  // Starts the next window; the next add() overwrites the sum.
  void reset() noexcept { micro_batches_ = 0; }

  Accum* data() noexcept { return buffer_.data(); }
  const Accum* data() const noexcept { return buffer_.data(); }
  std::size_t size() const noexcept { return buffer_.size(); }
  int micro_batches() const noexcept { return micro_batches_; }

 private:
  host::aligned_buffer<Accum> buffer_;
  int micro_batches_ = 0;
};

}  // namespace mpopt
