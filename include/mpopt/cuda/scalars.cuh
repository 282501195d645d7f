// Device-resident step scalars: the scaler state, found_inf, the step counter, the grad factor, the grad norm, the
// clip coefficient, the scales and the status of the latest step all live in device memory, as do the rule's
// hyper-parameters and step options. One single-block kernel per step turns the statistics partials into the step's
// decisions with the host's own functions (Scaler::update, combined_grad_factor, Rule::prepare), so the step needs
// no host synchronisation and can be captured in a CUDA graph; an lr schedule writes device memory and needs no
// re-capture.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include <cub/block/block_reduce.cuh>

#include "../config.hpp"
#include "../error.hpp"
#include "../optimizer.hpp"
#include "../scaler/loss_scaler.hpp"
#include "../scaler/scalers.hpp"
#include "../scaler/unscale_clip.hpp"
#include "error.cuh"
#include "launch.cuh"
#include "memory.cuh"
#include "reduce.cuh"

namespace mpopt::cuda {

// What the latest step decided; read by the update kernels (applied, grad_factor) and by optimizer::result().
// Mirrors mpopt::step_result field by field.
struct step_core {
  double sum_sq;           // global sum of squares of the grads as produced (scaled), from the statistics pass
  double grad_norm;        // sqrt(sum_sq) / loss_scale: the unscaled norm before clipping (NaN without statistics)
  double clip_coef;        // what clipping multiplied the unscaled grads by (1: no clipping)
  std::int64_t step;       // applied steps so far; advances only when a step is applied
  float loss_scale;        // the scale this step's grads were produced with
  float next_loss_scale;   // the scale for the next backward (optimizer::device_loss_scale() points here)
  float grad_factor;       // what the update multiplies every grad by: 1 / (scale * max(1, k))
  std::int32_t nonfinite;  // the statistics pass saw inf or NaN
  std::int32_t found_inf;  // nonfinite and the scaler skips on overflow
  std::int32_t applied;    // 1: the update kernels run; 0: they return at once (nothing is written)
  std::int32_t event;      // mpopt::scale_event
  std::int32_t reason;     // mpopt::skip_reason
  std::int32_t code;       // mpopt::errc: ok, or scale_at_minimum
  std::int32_t reserved;
  // step_options.rounding_seed as of this step: with `step`, stochastic rounding's key, read by the update kernels
  // from here so that set_options needs no new tables and a captured step picks a new seed up.
  std::uint64_t rounding_seed;
};

template <class ScalerState>
struct step_scalars {
  step_core core;  // first, so a step_scalars* is also a step_core* (the update kernels take that)
  ScalerState scaler;
};

// The outcome of the step whose scalars `device` holds, once `stream` reaches it: copies them back and waits (the
// CUDA optimizers' opt-in synchronising result()). A failed launch of that step (`launch_error`) is the outcome.
template <class ScalerState>
step_result read_step_result(const step_scalars<ScalerState>* device, const status& launch_error, cudaStream_t stream) {
  step_result r;
  if (!launch_error.ok()) {
    r.error = launch_error;
    return r;
  }
  step_scalars<ScalerState> h{};
  cudaError_t err = cudaMemcpyAsync(&h, device, sizeof h, cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    r.error = to_status(err, "result: copying the step scalars back");
    return r;
  }
  const step_core& c = h.core;
  r.applied = c.applied != 0;
  r.reason = skip_reason(c.reason);
  r.grad_norm = c.grad_norm;
  r.clip_coef = c.clip_coef;
  r.loss_scale = double(c.loss_scale);
  r.next_loss_scale = double(c.next_loss_scale);
  r.event = scale_event(c.event);
  r.step = c.step;
  if (c.code == int(errc::scale_at_minimum)) {
    r.error = status{errc::scale_at_minimum,
                     "loss scale " + std::to_string(r.loss_scale) +
                         " is already at its minimum and the gradients overflowed again (error_at_min is on)"};
  }
  return r;
}

// step_options as the kernels read them (set_options writes them on the stream).
struct device_options {
  double max_grad_norm;
  std::int32_t deepspeed_scale_order;
  std::int32_t reserved;
  std::uint64_t rounding_seed;
};

static_assert(offsetof(device_options, max_grad_norm) == 0,
              "the statistics kernel reads max_grad_norm through a const double* to the device_options");

inline device_options to_device(const step_options& o) {
  return device_options{o.max_grad_norm, o.deepspeed_scale_order ? 1 : 0, 0, o.rounding_seed};
}

template <class ScalerState>
step_scalars<ScalerState> initial_scalars(const ScalerState& state, float scale) {
  step_scalars<ScalerState> s{};
  s.core.grad_norm = 0.0;
  s.core.clip_coef = 1.0;
  s.core.loss_scale = scale;
  s.core.next_loss_scale = scale;
  s.scaler = state;
  return s;
}

// Construction of the CUDA optimizers: `options` and the initial step scalars (the scaler's initial state, no step
// yet) in new device buffers, written on `stream` and waited for. Throws mpopt::error.
template <class Scaler>
void init_step_state(const step_options& options, const typename Scaler::args& scaler_args,
                     device_buffer<device_options>& options_d,
                     device_buffer<step_scalars<typename Scaler::state_type>>& scalars_d, cudaStream_t stream) {
  using scalars_type = step_scalars<typename Scaler::state_type>;
  options_d = device_buffer<device_options>(1, "step options");
  scalars_d = device_buffer<scalars_type>(1, "step scalars");
  const typename Scaler::state_type s0 = Scaler::init(scaler_args);
  const scalars_type scalars0 = initial_scalars(s0, Scaler::scale(s0, scaler_args));
  const device_options options0 = to_device(options);
  detail::copy_to_device(options_d.get(), &options0, sizeof options0, "step options", stream);
  detail::copy_to_device(scalars_d.get(), &scalars0, sizeof scalars0, "step scalars", stream);
}

// <<<1, block_threads>>>. Sums the statistics partials in a fixed order (thread t takes partials t, t + 256, ...,
// then cub::BlockReduce), then thread 0 runs what mpopt::optimizer::step() runs between its statistics pass and its
// update, and every thread computes the rule's coefficients of some groups with the step counter just advanced.
template <class Rule, class Scaler, class C>
__global__ void __launch_bounds__(block_threads)
    step_scalars_kernel(step_scalars<typename Scaler::state_type>* scalars, const double* partial_sum,
                        const int* partial_flag, std::uint32_t num_partials, const device_options* options,
                        typename Scaler::args scaler_args, const typename Rule::args* hparams,
                        typename Rule::template coeffs<C>* coeffs, std::uint32_t num_groups) {
  const device_options opt = *options;
  const bool check = Scaler::skips_on_overflow(scaler_args);
  const bool need_stats = check || opt.max_grad_norm > 0;

  double sum = 0.0;
  int flag = 0;
  if (need_stats) {
    for (std::uint32_t i = threadIdx.x; i < num_partials; i += block_threads) {
      sum += partial_sum[i];
      flag |= partial_flag[i];
    }
  }
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  __shared__ int apply_shared;
  __shared__ std::int64_t step_shared;
  sum = reduce(temp).Sum(sum);  // valid in thread 0
  const bool nonfinite = __syncthreads_or(flag) != 0;

  if (threadIdx.x == 0) {
    step_core& c = scalars->core;
    const float loss_scale = Scaler::scale(scalars->scaler, scaler_args);
    const bool overflow = check && nonfinite;
    c.sum_sq = sum;
    c.nonfinite = nonfinite;
    c.found_inf = overflow;
    c.loss_scale = loss_scale;
    c.grad_norm = ::sqrt(sum) / double(loss_scale);
    c.clip_coef = 1.0;
    c.applied = 0;
    c.code = int(errc::ok);
    c.rounding_seed = opt.rounding_seed;
    typename Scaler::state_type next = scalars->scaler;
    const scale_event event = Scaler::update(next, scaler_args, overflow);
    c.event = int(event);
    if (event == scale_event::error_at_min) {
      // Nothing changes, the scaler state included.
      c.reason = int(skip_reason::scale_at_minimum);
      c.code = int(errc::scale_at_minimum);
      c.next_loss_scale = loss_scale;
    } else {
      scalars->scaler = next;
      c.next_loss_scale = Scaler::scale(next, scaler_args);
      if (overflow) {
        c.reason = int(skip_reason::nonfinite_grads);
      } else {
        const double unscale_by = opt.deepspeed_scale_order ? double(c.next_loss_scale) : double(loss_scale);
        grad_factor f{float(1.0 / unscale_by), 0.0f, 1.0f};
        if (need_stats) f = combined_grad_factor(sum, float(unscale_by), float(opt.max_grad_norm));
        if (!need_stats) c.grad_norm = ::nan("");
        c.clip_coef = f.clip_coef;
        c.grad_factor = f.factor;
        c.reason = int(skip_reason::none);
        c.step += 1;
        c.applied = 1;
      }
    }
    apply_shared = c.applied;
    step_shared = c.step;
  }
  __syncthreads();
  if (apply_shared) {
    for (std::uint32_t g = threadIdx.x; g < num_groups; g += block_threads)
      coeffs[g] = Rule::template prepare<C>(hparams[g], step_shared);
  }
}

// Where the statistics partials live: this rank's pass writes blocks [offset, offset + grid) of `sum` and `flag`, and
// the step-scalars kernel reads [0, count). One rank: offset 0, count = grid. A sharded ZeRO step: every rank's
// blocks, all-gathered between the two launches, so every rank reduces the same partials in the same order.
struct stats_partials {
  double* sum;
  int* flag;
  std::uint32_t offset;
  std::uint32_t count;
};

// A step's first two launches on `stream`, the same in every CUDA optimizer: the statistics pass over `stats` (`grid`
// blocks) and the step-scalars kernel, which also prepares Rule's coefficients of `num_groups` groups from `hparams`.
// between() runs after the first launch is enqueued and before the second (the partials' all-gather; it may throw),
// whatever the first launch reports. After a failed launch the scalars kernel does not run (it would advance the step
// and the scaler on stale partials) and the step is marked not applied, so the update kernels write nothing; returns
// the first failure, named for step_result::error.
template <class Rule, class Scaler, class C, class G, class Between>
status enqueue_step_scalars(const device_table<grad_entry<G>>& stats, std::uint32_t grid, const stats_partials& p,
                            const typename Scaler::args& scaler_args, const device_options* options,
                            step_scalars<typename Scaler::state_type>* scalars, const typename Rule::args* hparams,
                            typename Rule::template coeffs<C>* coeffs, std::uint32_t num_groups, cudaStream_t stream,
                            Between&& between) {
  const cudaError_t stats_error =
      launch_grad_stats<G>(stats.entries(), stats.map(), grid, Scaler::skips_on_overflow(scaler_args),
                           reinterpret_cast<const double*>(options), p.sum + p.offset, p.flag + p.offset, stream);
  between();
  cudaError_t scalars_error = cudaSuccess;
  if (stats_error == cudaSuccess) {
    step_scalars_kernel<Rule, Scaler, C><<<1, block_threads, 0, stream>>>(scalars, p.sum, p.flag, p.count, options,
                                                                          scaler_args, hparams, coeffs, num_groups);
    scalars_error = cudaGetLastError();
    if (scalars_error == cudaSuccess) return status::success();
  }
  // A memset is no kernel launch: it may still be enqueued after a failed one.
  (void)cudaMemsetAsync(&scalars->core.applied, 0, sizeof(std::int32_t), stream);
  // Messages built only on failure: a step allocates nothing.
  if (stats_error != cudaSuccess) return to_status(stats_error, "step: launch of the statistics kernel");
  return to_status(scalars_error, "step: launch of the step-scalars kernel");
}

// One rank: the partials are this rank's own.
template <class Rule, class Scaler, class C, class G>
status enqueue_step_scalars(const device_table<grad_entry<G>>& stats, std::uint32_t grid, double* partial_sum,
                            int* partial_flag, const typename Scaler::args& scaler_args, const device_options* options,
                            step_scalars<typename Scaler::state_type>* scalars, const typename Rule::args* hparams,
                            typename Rule::template coeffs<C>* coeffs, std::uint32_t num_groups, cudaStream_t stream) {
  return enqueue_step_scalars<Rule, Scaler, C>(stats, grid, stats_partials{partial_sum, partial_flag, 0, grid},
                                               scaler_args, options, scalars, hparams, coeffs, num_groups, stream,
                                               [] {});
}

// Writes one value on the stream. Used for hyper-parameters and options: the value travels as a kernel argument,
// so the setter needs neither a pinned staging buffer nor a synchronisation, and works inside stream capture.
template <class T>
__global__ void store_value_kernel(T* dst, T value) {
  *dst = value;
}

// set_options of the CUDA optimizers: validates `o` (the host optimizer's messages), then writes it on `stream`, so
// later steps on that stream use it and a captured graph picks it up at its next replay. Throws mpopt::error.
inline void store_step_options(device_options* options_d, const step_options& o, cudaStream_t stream) {
  throw_if_error(mpopt::detail::validate_step_options(o));
  store_value_kernel<device_options><<<1, 1, 0, stream>>>(options_d, to_device(o));
  throw_if_cuda_error(cudaGetLastError(), "set_options: launch of the store kernel");
}

// Sets the scaler state and the scale the next backward reads.
template <class Scaler>
__global__ void store_scaler_state_kernel(step_scalars<typename Scaler::state_type>* scalars,
                                          typename Scaler::state_type state, typename Scaler::args args) {
  scalars->scaler = state;
  scalars->core.next_loss_scale = Scaler::scale(state, args);
}

// The CUDA optimizers' synchronising accessors of the step counter and the scaler state (checkpoints): each waits for
// `stream`. Throws mpopt::error.
template <class S>
std::int64_t read_step_count(const step_scalars<S>* scalars, cudaStream_t stream) {
  std::int64_t n = 0;
  detail::copy_from_device(&n, reinterpret_cast<const char*>(scalars) + offsetof(step_core, step), sizeof n,
                           "step counter", stream);
  return n;
}
template <class S>
void write_step_count(step_scalars<S>* scalars, std::int64_t step, cudaStream_t stream) {
  if (step < 0) throw error(status::invalid("set_step_count: step must be >= 0, got " + std::to_string(step)));
  store_value_kernel<std::int64_t><<<1, 1, 0, stream>>>(
      reinterpret_cast<std::int64_t*>(reinterpret_cast<char*>(scalars) + offsetof(step_core, step)), step);
  throw_if_cuda_error(cudaGetLastError(), "set_step_count: launch of the store kernel");
  throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (set_step_count)");
}
template <class S>
S read_scaler_state(const step_scalars<S>* scalars, cudaStream_t stream) {
  S s{};
  detail::copy_from_device(&s, reinterpret_cast<const char*>(scalars) + offsetof(step_scalars<S>, scaler), sizeof s,
                           "scaler state", stream);
  return s;
}
// Also sets the scale the next backward reads.
template <class Scaler>
void write_scaler_state(step_scalars<typename Scaler::state_type>* scalars, const typename Scaler::state_type& s,
                        const typename Scaler::args& args, cudaStream_t stream) {
  store_scaler_state_kernel<Scaler><<<1, 1, 0, stream>>>(scalars, s, args);
  throw_if_cuda_error(cudaGetLastError(), "set_scaler_state: launch of the store kernel");
  throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (set_scaler_state)");
}

}  // namespace mpopt::cuda
