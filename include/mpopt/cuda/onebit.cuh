// mpopt::cuda::onebit::optimizer: 1-bit Adam, 0/1 Adam and 1-bit LAMB (rule/onebit.hpp) on the GPU, data-parallel over
// a device-memory communicator (comm::nccl), with mpopt::onebit::optimizer's semantics step for step: the same phases
// and schedules, the exact steps through the CUDA Adam update (so they are mpopt::adam bit for bit), the compressed
// steps through cuda/compressed_allreduce.cuh (the host's format and order) and the per-element bodies of
// onebit/elements.hpp. Built without fused multiply-adds (nvcc --fmad=false) a rank's bits are the host optimizer's.
// 1-bit LAMB's exact steps are the CUDA LAMB update (cuda/update.cuh) and its compressed steps the kernels of
// cuda/onebit_lamb.cuh; its per-tensor sums (trust ratios, equalisers, factors) are double sums in another order than
// the host's, so those doubles may differ from the host's in their last bits.
//
// A step is enqueued on one stream and never waits for the device, with one exception: the phase, and so which
// collective a step makes, is decided on the host from the count of *applied* steps. When the scaler can skip a step
// (Scaler::skips_on_overflow), step() first waits for the previous step to end (an event recorded after it) and reads
// whether it applied. That wait is for the previous optimizer step, not for the forward and backward enqueued since,
// so it costs nothing unless the device runs a whole iteration behind. Without a skipping scaler every step applies and
// nothing waits. The step is therefore not meant for graph capture (a captured phase would not change).
//
// A skipped step (overflow) writes nothing: every kernel, the compressed allreduce's included, reads the step's
// `applied` flag from device memory, so the error buffers stay as they were, as on the host. In compressed and local
// steps each rank's grads are local: the overflow flag is max-reduced over the ranks (a one-double all-reduce) so
// that all skip together, and the clipping norm is the local one (as in DeepSpeed and the host optimizer).
//
// Checkpoints: checkpoint/cuda_onebit.cuh.
//
// Usage (device pointers in the groups; comm an mpopt::comm::nccl, stream its stream):
//   mpopt::cuda::onebit::optimizer<mpopt::onebit_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_loss_scaler> opt(
//       {group}, comm, scaler_args, step_options, {}, comm.stream());
//   if (opt.next_communication() == mpopt::onebit::communication::exact_allreduce) { ... }
//   opt.step(comm.stream());
//   mpopt::step_result r = opt.result(comm.stream());  // optional: copies the outcome back and waits
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../error.hpp"
#include "../numeric/convert.hpp"
#include "../onebit/elements.hpp"
#include "../onebit/optimizer.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../rule/onebit.hpp"
#include "../scaler/scalers.hpp"
#include "../zero/partition.hpp"
#include "compressed_allreduce.cuh"
#include "data_parallel.cuh"
#include "error.cuh"
#include "launch.cuh"
#include "memory.cuh"
#include "onebit_lamb.cuh"
#include "reduce.cuh"
#include "scalars.cuh"
#include "update.cuh"

namespace mpopt::cuda::onebit {

using mpopt::onebit::communication;
using mpopt::onebit::phase;
using mpopt::onebit::schedule;

namespace detail {

// The elementwise kernels of the compressed and local steps: which body of onebit/elements.hpp runs.
enum class element_step : int {
  local_momentum,       // work = the momentum advanced by the local grad (1-bit Adam, before the allreduce)
  scaled_grad,          // work = the unscaled local grad (0/1 Adam, before the allreduce)
  apply_momentum,       // momentum = masked(work), then the weight step (1-bit Adam, after)
  apply_averaged_grad,  // momentum advanced by masked(work), then the weight step (0/1 Adam, after)
  local_update,         // momentum advanced by the local grad, then the weight step (0/1 Adam's local step)
  accumulated_update,   // work = the update since the sync point (0/1 Adam's synchronisation, before)
  apply_synchronised,   // the averaged update applied to the sync point (after)
};

// One group's buffers for element_kernel (device pointers; unused ones null).
template <class Prec>
struct element_args {
  typename Prec::master_t* master;
  typename Prec::param_t* param;  // == master when the policy has no separate master
  typename Prec::state_t* m;
  const typename Prec::state_t* v;
  const typename Prec::grad_t* grad;
  float* work;
  const std::uint8_t* mask;  // null: every element
  float* anchor;
  const adam::coeffs<typename Prec::compute_t>* k;  // the group's, prepared by the step-scalars kernel
  double lr_sum;                                    // apply_synchronised: lr spent since the last synchronisation
};

// The templates exist so that every translation unit may define the kernels (a __global__ cannot be inline).
template <element_step K, class Prec>
__global__ void __launch_bounds__(block_threads)
    element_kernel(element_args<Prec> a, std::uint64_t n, const step_core* core) {
  namespace el = mpopt::onebit::element;
  using C = typename Prec::compute_t;
  if (!core->applied) return;
  const adam::coeffs<C> k = *a.k;
  const C factor = C(core->grad_factor);
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    const bool kept = a.mask == nullptr || a.mask[i] != 0;
    if constexpr (K == element_step::local_momentum) {
      a.work[i] = el::local_momentum<Prec>(k, a.m[i], a.grad[i], factor);
    } else if constexpr (K == element_step::scaled_grad) {
      a.work[i] = el::scaled_grad<Prec>(a.grad[i], factor);
    } else if constexpr (K == element_step::apply_momentum) {
      el::apply_momentum<Prec>(k, a.master[i], a.param[i], a.m[i], a.v[i], C(kept ? a.work[i] : 0.0f));
    } else if constexpr (K == element_step::apply_averaged_grad) {
      el::apply_averaged_grad<Prec>(k, a.master[i], a.param[i], a.m[i], a.v[i], C(kept ? a.work[i] : 0.0f));
    } else if constexpr (K == element_step::local_update) {
      el::apply_momentum<Prec>(k, a.master[i], a.param[i], a.m[i], a.v[i],
                               el::local_momentum<Prec>(k, a.m[i], a.grad[i], factor));
    } else if constexpr (K == element_step::accumulated_update) {
      a.work[i] = el::accumulated_update<Prec>(k, a.master[i], a.anchor[i], a.v[i]);
    } else {
      el::apply_synchronised<Prec>(k, a.master[i], a.param[i], a.m[i], a.v[i], a.anchor[i], C(kept ? a.work[i] : 0.0f),
                                   a.lr_sum);
    }
  }
}

// dst[i] = src[i] (converted; src null: zeros) for i < n on an applied step; a skipped step writes nothing.
template <class To, class From>
__global__ void __launch_bounds__(block_threads)
    assign_if_applied_kernel(To* dst, const From* src, std::uint64_t n, const step_core* core) {
  if (!core->applied) return;
  for (std::uint64_t i = blockIdx.x * std::uint64_t(block_threads) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * block_threads)
    dst[i] = src != nullptr ? convert<To>(src[i]) : To(0.0f);
}

// <<<1, block_threads>>>: *out = 1 when any of the n statistics flags is set, else 0 (a double, for the all-reduce).
template <int = 0>
__global__ void __launch_bounds__(block_threads) any_flag_kernel(const int* flags, std::uint32_t n, double* out) {
  int any = 0;
  for (std::uint32_t i = threadIdx.x; i < n; i += block_threads) any |= flags[i];
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) *out = any != 0 ? 1.0 : 0.0;
}

// <<<1, 1>>>: the max-reduced flag back into the first statistics flag, which the step-scalars kernel ORs in.
template <int = 0>
__global__ void set_flag_kernel(const double* any, int* flags) {
  if (*any != 0.0) flags[0] = 1;
}

}  // namespace detail

template <class Rule, class Prec, class Scaler = no_scaler>
class optimizer {
  static constexpr bool is_adam = std::is_same_v<Rule, onebit_adam>;
  static constexpr bool is_zero_one = std::is_same_v<Rule, zero_one_adam>;
  static constexpr bool is_lamb = std::is_same_v<Rule, onebit_lamb>;
  static_assert(is_adam || is_zero_one || is_lamb,
                "mpopt::cuda::onebit::optimizer: the rule must be mpopt::onebit_adam, mpopt::zero_one_adam or "
                "mpopt::onebit_lamb; other rules go to mpopt::cuda::optimizer");
  static_assert(mpopt::onebit::supported_policy<Prec>());

 public:
  using rule_type = Rule;
  using precision_type = Prec;
  using scaler_type = Scaler;
  using args_type = typename Rule::args;
  using scaler_args = typename Scaler::args;
  using scaler_state_type = typename Scaler::state_type;
  using param_t = typename Prec::param_t;
  using master_t = typename Prec::master_t;
  using grad_t = typename Prec::grad_t;
  using state_t = typename Prec::state_t;
  using compute_t = typename Prec::compute_t;
  using group_type = mpopt::param_group<Rule, Prec>;
  using scalars_type = step_scalars<scaler_state_type>;
  static constexpr bool verified_precision = mpopt::onebit::verified_precision_v<Prec>;

  // One GPU: the compressed allreduce is the identity (as in DeepSpeed and the host optimizer). Validates as the host
  // optimizer does (same messages), plus alignment and device memory; allocates and initialises on `stream` and waits
  // for it (the one synchronisation of construction).
  explicit optimizer(std::vector<group_type> groups, scaler_args scaler = {}, step_options step_opts = {},
                     mpopt::onebit::options opts = {}, cudaStream_t stream = nullptr)
      : scaler_args_(scaler), step_options_(step_opts), options_(opts) {
    init(std::move(groups), stream);
  }

  // Data-parallel over `comm`, a device-memory communicator that outlives the optimizer; `stream` must be its stream
  // (every step() too). Collective: every rank constructs with the same group layout (checked) and the same initial
  // params, with its own buffers.
  optimizer(std::vector<group_type> groups, comm::communicator& comm, scaler_args scaler = {},
            step_options step_opts = {}, mpopt::onebit::options opts = {}, cudaStream_t stream = nullptr)
      : comm_(&comm), scaler_args_(scaler), step_options_(step_opts), options_(opts) {
    if (comm.memory() != comm::memory_space::device)
      throw error(status::invalid(std::string(Rule::name) +
                                  ": the CUDA optimizer needs a device-memory communicator (nccl), got " + comm.name() +
                                  "; host memory goes to mpopt::onebit::optimizer"));
    world_ = comm.size();
    cuda::detail::check_comm_stream(comm, stream, "construction");
    init(std::move(groups), stream);
  }

  optimizer(const optimizer&) = delete;
  optimizer& operator=(const optimizer&) = delete;
  optimizer(optimizer&&) noexcept = default;
  optimizer& operator=(optimizer&&) noexcept = default;
  ~optimizer() = default;

  // Enqueues one step on `stream`: the exact grad mean (exact steps on several ranks), statistics and step scalars,
  // then the exact Adam update, or the compressed or local step with its 1-bit allreduce. Waits only as the header
  // says. Launch failures are kept in last_error(); a collective that cannot be enqueued throws mpopt::error.
  void step(cudaStream_t stream) {
    if (comm_ != nullptr) cuda::detail::check_comm_stream(*comm_, stream, "step");
    resolve();
    last_error_ = status::success();
    const std::int64_t s = step_ + 1;
    const phase ph = phase_of(s);
    const communication c = communication_of(s);
    const bool exact = c == communication::exact_allreduce;
    const bool several = world_ > 1;
    if (exact && several)
      for (group_storage& grp : groups_)
        mean_.reduce(grp.reduce_part, zero::range{0, grp.spec.size}, grp.spec.grads, grp.reduced.get(), 0,
                     /*accumulate=*/false, /*gather_means=*/true, last_error_, stream);

    // Exact steps take statistics of the mean; the others of the local grads, sharing only the overflow flag.
    const bool share_flag = !exact && several && Scaler::skips_on_overflow(scaler_args_);
    const auto& stats = exact && several ? stats_mean_ : stats_local_;
    const status scalars_status = enqueue_step_scalars<exact_rule, Scaler, compute_t>(
        stats, stats_grid_, stats_partials{partial_sum_.get(), partial_flag_.get(), 0, stats_grid_}, scaler_args_,
        options_d_.get(), scalars_.get(), args_d_.get(), coeffs_d_.get(), std::uint32_t(groups_.size()), stream, [&] {
          if (share_flag) share_overflow_flag(stream);
        });
    if (last_error_.ok()) last_error_ = scalars_status;

    if constexpr (is_lamb) {
      if (!groups_.empty()) exact ? warmup_lamb(s, stream) : compressed_lamb(stream);
    } else if (exact) {
      note(
          launch_update<adam, Prec, 2, 2>(exact_.entries(), exact_.map(), exact_grid_, coeffs_d_.get(), core(), stream),
          "step: launch of the exact Adam update kernel");
    } else if constexpr (is_adam) {
      for (group_storage& grp : groups_) compressed_adam(grp, stream);
    } else {
      zero_one_step(s, ph, c, stream);
    }

    // What resolve() reads before the next step.
    note(cudaMemcpyAsync(applied_h_.get(), applied_flag(), sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream),
         "step: cudaMemcpyAsync(applied flag)");
    note(cudaEventRecord(done_.get(), stream), "step: cudaEventRecord");
    pending_ = pending_step{true, s, ph, c, groups_.empty() ? args_type{} : groups_[0].spec.hparams};
    for (std::size_t g = 0; g < groups_.size(); ++g) pending_lr_[g] = groups_[g].spec.hparams.lr;
  }

  // The phase and communication of the next step(); they may wait for the previous step (see the header).
  phase next_phase() {
    resolve();
    return phase_of(step_ + 1);
  }
  communication next_communication() {
    resolve();
    return communication_of(step_ + 1);
  }
  // Applied steps so far (may wait for the previous step).
  std::int64_t step_count() {
    resolve();
    return step_;
  }

  // The outcome of the latest step() on `stream`: copies the step scalars back and waits for the stream.
  step_result result(cudaStream_t stream) const { return read_step_result(scalars_.get(), last_error_, stream); }
  const status& last_error() const noexcept { return last_error_; }

  std::size_t num_groups() const noexcept { return groups_.size(); }
  std::size_t size(std::size_t g) const { return at(g).spec.size; }
  // Group g's tensor sizes as constructed (empty: one tensor): checkpoint metadata.
  const std::vector<std::size_t>& tensor_sizes(std::size_t g) const { return at(g).spec.tensor_sizes; }
  const args_type& hparams(std::size_t g) const { return at(g).spec.hparams; }
  // Validates, then writes the device copy on `stream` (later steps use it). The phase boundaries must be the same
  // on every rank.
  void set_hparams(std::size_t g, const args_type& a, cudaStream_t stream) {
    check_group_index(g);
    throw_if_error(mpopt::detail::with_group_prefix(Rule::validate(a), g));
    store_value_kernel<exact_args><<<1, 1, 0, stream>>>(args_d_.get() + g, Rule::exact(a));
    throw_if_cuda_error(cudaGetLastError(), "set_hparams: launch of the store kernel");
    if constexpr (is_lamb) {
      store_value_kernel<args_type><<<1, 1, 0, stream>>>(lamb_.args.get() + g, a);
      throw_if_cuda_error(cudaGetLastError(), "set_hparams: launch of the store kernel");
    }
    groups_[g].spec.hparams = a;
  }
  const step_options& options() const noexcept { return step_options_; }
  const mpopt::onebit::options& onebit_options() const noexcept { return options_; }
  const scaler_args& scaler_arguments() const noexcept { return scaler_args_; }
  comm::communicator* communicator() const noexcept { return comm_; }

  // Device pointers: the master (the params when the policy has none separate), the states (exp_avg, exp_avg_sq),
  // the params.
  master_t* master(std::size_t g) const { return at(g).master(); }
  param_t* params(std::size_t g) const { return at(g).spec.params; }
  int num_states(std::size_t) const noexcept { return Rule::max_states; }
  state_t* state(std::size_t g, int j) const {
    check_group_index(g);
    if (j < 0 || j >= Rule::max_states)
      throw error(status::invalid("state index " + std::to_string(j) + " out of range for group " + std::to_string(g) +
                                  " (" + std::to_string(Rule::max_states) + " states)"));
    return groups_[g].states[std::size_t(j)].get();
  }
  // This rank's error-feedback buffers (device memory; they differ per rank) and their layout: one per group, or
  // (1-bit LAMB) one for the momentum of all groups fused, as the host optimizer's.
  std::size_t num_error_buffers() const noexcept { return is_lamb ? 1 : groups_.size(); }
  error_feedback& errors(std::size_t i) {
    check_error_index(i);
    if constexpr (is_lamb) {
      return lamb_.errors;
    } else {
      return groups_[i].errors;
    }
  }
  const compressed_layout& error_layout(std::size_t i) const {
    check_error_index(i);
    if constexpr (is_lamb) {
      return lamb_.layout;
    } else {
      return groups_[i].layout;
    }
  }

  // 1-bit LAMB, per tensor of group g: mpopt::onebit::optimizer::lamb_state. Reading copies it back and waits for
  // `stream`; setting copies it to the device on `stream` (checkpoint restore).
  using lamb_tensor_state = onebit_lamb::tensor_state;
  std::vector<lamb_tensor_state> lamb_state(std::size_t g, cudaStream_t stream) const {
    static_assert(is_lamb, "lamb_state: only mpopt::onebit_lamb has per-tensor coefficients");
    check_group_index(g);
    std::vector<lamb_tensor_state> out(lamb_.tensor_base[g + 1] - lamb_.tensor_base[g]);
    if (!out.empty())
      cuda::detail::copy_from_device(out.data(), lamb_.tensors.get() + lamb_.tensor_base[g],
                                     out.size() * sizeof(lamb_tensor_state), "1-bit LAMB tensor state", stream);
    return out;
  }
  void set_lamb_state(std::size_t g, const std::vector<lamb_tensor_state>& s, cudaStream_t stream) {
    static_assert(is_lamb, "set_lamb_state: only mpopt::onebit_lamb has per-tensor coefficients");
    check_group_index(g);
    const std::size_t tensors = lamb_.tensor_base[g + 1] - lamb_.tensor_base[g];
    if (s.size() != tensors)
      throw error(status::invalid("set_lamb_state: group " + std::to_string(g) + " has " + std::to_string(tensors) +
                                  " tensors, got " + std::to_string(s.size())));
    if (!s.empty())
      cuda::detail::copy_to_device(lamb_.tensors.get() + lamb_.tensor_base[g], s.data(),
                                   s.size() * sizeof(lamb_tensor_state), "1-bit LAMB tensor state", stream);
  }
  // 0/1 Adam: the weights at the last synchronisation (device memory, group size floats) and the lr spent since; the
  // schedule. They may wait for the previous step.
  const float* sync_point(std::size_t g) const {
    static_assert(is_zero_one, "sync_point: only mpopt::zero_one_adam takes local steps");
    return at(g).anchor.get();
  }
  double accumulated_lr(std::size_t g) {
    resolve();
    return at(g).lr_sum;
  }
  const schedule& current_schedule() {
    resolve();
    return schedule_;
  }

  // Checkpoint restore (checkpoint/cuda.cuh). Each waits for a pending step first; the device writes go on `stream`
  // and are waited for. The buffers themselves (master, states, params, errors, sync point) are written through the
  // device pointers above.
  void set_step_count(std::int64_t step, cudaStream_t stream) {
    if (step < 0) throw error(status::invalid("set_step_count: step must be >= 0, got " + std::to_string(step)));
    resolve();
    write_step_count(scalars_.get(), step, stream);
    step_ = step;
  }
  void set_schedule(const schedule& s) {
    throw_if_error(mpopt::onebit::validate_schedule(s));
    resolve();
    schedule_ = s;
  }
  void set_accumulated_lr(std::size_t g, double lr_sum) {
    static_assert(is_zero_one, "set_accumulated_lr: only mpopt::zero_one_adam takes local steps");
    resolve();
    at(g).lr_sum = lr_sum;
  }
  float* sync_point(std::size_t g) {
    static_assert(is_zero_one, "sync_point: only mpopt::zero_one_adam takes local steps");
    return at(g).anchor.get();
  }
  // Synchronising: the scaler state as of `stream`, and setting it (with the scale the next backward reads).
  scaler_state_type scaler_state(cudaStream_t stream) const { return read_scaler_state(scalars_.get(), stream); }
  void set_scaler_state(const scaler_state_type& st, cudaStream_t stream) {
    write_scaler_state<Scaler>(scalars_.get(), st, scaler_args_, stream);
  }

  // A 0/1 mask over group g's elements (host memory, n == size(g); DeepSpeed's exp_avg_mask), copied to the device on
  // `stream`; null clears it. As the host optimizer's set_momentum_mask. Synchronising: the steps enqueued on `stream`
  // may still read the mask (and 1-bit LAMB's segment table) being replaced.
  void set_momentum_mask(std::size_t g, const std::uint8_t* mask, std::size_t n, cudaStream_t stream) {
    check_group_index(g);
    group_storage& grp = groups_[g];
    device_buffer<std::uint8_t> d;
    if (mask != nullptr) {
      mpopt::onebit::check_momentum_mask(g, grp.spec.size, mask, n);
      d = device_buffer<std::uint8_t>(n, "momentum mask of group " + std::to_string(g));
    }
    // The queued steps finish before the old mask and segment table go: copy_to_device waits for the stream.
    if (mask != nullptr) {
      cuda::detail::copy_to_device(d.get(), mask, n, "momentum mask", stream);
    } else {
      throw_if_cuda_error(cudaStreamSynchronize(stream), "set_momentum_mask: cudaStreamSynchronize");
    }
    if constexpr (is_lamb) lamb_.segs = lamb_segment_table(g, d.get());  // before the mask: a throw changes nothing
    grp.mask = std::move(d);
  }

  // The step scalars and the scale for the next backward, in device memory (see mpopt::cuda::optimizer).
  const scalars_type* device_scalars() const noexcept { return scalars_.get(); }
  const float* device_loss_scale() const noexcept { return field<float>(offsetof(step_core, next_loss_scale)); }

 private:
  using reduce_type = mpopt::detail::reduce_t<grad_t>;
  using entry_type = tensor_entry<Prec, 2>;
  // The rule of the exact steps (Rule::exact): its coefficients are what the step-scalars kernel prepares.
  using exact_rule = std::conditional_t<is_lamb, lamb, adam>;
  using exact_args = typename exact_rule::args;
  using coeffs_type = typename exact_rule::template coeffs<compute_t>;
  using element_step = detail::element_step;
  using lamb_pass = detail::lamb_pass;

  // 1-bit LAMB's device state and tables (empty for the other rules). Segments and tensors are numbered over all
  // groups in group order; a tensor's segments are consecutive (slot k is segment k).
  struct lamb_storage {
    compressed_layout layout;  // of the fused momentum
    error_feedback errors;
    device_buffer<float> fused, prev;
    device_buffer<args_type> args;  // per group
    device_buffer<onebit_lamb::tensor_state> tensors;
    std::vector<std::size_t> tensor_base;  // first tensor of each group, groups + 1 values
    device_buffer<std::uint64_t> tensor_begin, slot, elements;
    device_buffer<std::uint32_t> tensor_group, entry_tensor;
    tensor_segments segments;
    device_table<entry_type> warmup;  // the exact LAMB's entries: one per segment, on the mean grads
    std::uint32_t warmup_grid = 0, ratio_grid = 0;
    std::vector<detail::lamb_segment<Prec>> host_segments;  // uploaded again with each new momentum mask
    device_buffer<detail::lamb_segment<Prec>> segs;
    std::uint32_t segment_grid = 0;
    device_buffer<double> partial;   // detail::lamb_partials per segment
    device_buffer<double> rms;       // per tensor, the equaliser's scratch
    device_buffer<compute_t> coeff;  // per tensor: the warm-up trust ratio, or the compressed step's coefficient
  };

  struct group_storage {
    group_type spec;
    device_buffer<master_t> master_copy;  // empty when the param buffer is the master
    std::vector<device_buffer<state_t>> states;
    device_buffer<grad_t> reduced;  // exact steps on several ranks: the mean grads
    device_buffer<float> work;      // what the 1-bit allreduce averages
    device_buffer<std::uint8_t> mask;
    device_buffer<float> anchor;  // 0/1 Adam: the weights at the last synchronisation
    compressed_layout layout;
    error_feedback errors;
    zero::partition reduce_part;
    double lr_sum = 0.0;  // 0/1 Adam: lr spent in local steps since the last synchronisation (applied steps)

    master_t* master() const {
      if constexpr (Prec::separate_master) {
        return master_copy.get();
      } else {
        return spec.params;
      }
    }
    const grad_t* mean_grads() const { return reduced.size() > 0 ? reduced.get() : spec.grads; }
  };

  // A step enqueued but not yet known to have applied (resolve() learns it).
  struct pending_step {
    bool valid = false;
    std::int64_t s = 0;
    phase ph = phase::warmup;
    communication c = communication::exact_allreduce;
    args_type schedule_args{};  // group 0's as of the step: 0/1 Adam's schedule advances with them, as on the host
  };

  const group_storage& at(std::size_t g) const {
    check_group_index(g);
    return groups_[g];
  }
  group_storage& at(std::size_t g) {
    check_group_index(g);
    return groups_[g];
  }
  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw error(status::invalid("group index " + std::to_string(g) + " out of range (" +
                                  std::to_string(groups_.size()) + " groups)"));
  }
  void check_error_index(std::size_t i) const {
    if (i >= num_error_buffers())
      throw error(status::invalid("errors: index " + std::to_string(i) + " out of range (" +
                                  std::to_string(num_error_buffers()) + " error buffers)"));
  }
  void note(cudaError_t err, const char* what) { cuda::detail::keep_first_error(last_error_, err, what); }
  const step_core* core() const { return reinterpret_cast<const step_core*>(scalars_.get()); }
  // A field of the device step scalars, by byte offset (never dereferenced on the host).
  template <class T>
  const T* field(std::size_t offset) const {
    return reinterpret_cast<const T*>(reinterpret_cast<const char*>(scalars_.get()) + offset);
  }
  const std::int32_t* applied_flag() const { return field<std::int32_t>(offsetof(step_core, applied)); }

  phase phase_of(std::int64_t s) const {
    if (groups_.empty()) return phase::warmup;
    const args_type& a = groups_[0].spec.hparams;
    if constexpr (is_zero_one) {
      return s <= a.var_freeze_step ? phase::warmup : phase::local_steps;
    } else {
      return s <= a.freeze_step ? phase::warmup : phase::compressed;
    }
  }
  // As mpopt::onebit::optimizer::next_communication for step s.
  communication communication_of(std::int64_t s) const {
    switch (phase_of(s)) {
      case phase::warmup:
        if constexpr (is_zero_one)
          return s % schedule_.var_interval == 0 ? communication::exact_allreduce : communication::compressed_allreduce;
        return communication::exact_allreduce;
      case phase::compressed: return communication::compressed_allreduce;
      case phase::local_steps:
        return s % schedule_.local_step_interval == 0 ? communication::compressed_allreduce : communication::none;
    }
    return communication::none;
  }

  // Learns whether the pending step applied (waiting for it only when the scaler can skip) and, if so, advances the
  // host's counters as the host optimizer does after an applied step.
  void resolve() {
    if (!pending_.valid) return;
    bool applied = true;
    if (Scaler::skips_on_overflow(scaler_args_)) {
      throw_if_cuda_error(cudaEventSynchronize(done_.get()), "cudaEventSynchronize (the previous step)");
      applied = *applied_h_.get() != 0;
    }
    const pending_step p = pending_;
    pending_.valid = false;
    if (!applied) return;
    step_ = p.s;
    if constexpr (is_zero_one) {
      if (groups_.empty()) return;
      const zero_one_adam::args& a = p.schedule_args;
      if (p.ph == phase::warmup) {
        if (p.s % schedule_.var_interval == 0 && ++schedule_.var_counter == a.var_update_scaler) {
          schedule_.var_counter = 0;
          schedule_.var_interval *= 2;
        }
        return;
      }
      for (std::size_t g = 0; g < groups_.size(); ++g)
        groups_[g].lr_sum = p.c == communication::compressed_allreduce ? 0.0 : groups_[g].lr_sum + pending_lr_[g];
      if (++schedule_.local_step_counter == a.local_step_scaler) {
        schedule_.local_step_counter = 0;
        schedule_.local_step_interval = std::min(a.local_step_clipper, 2 * schedule_.local_step_interval);
      }
    }
  }

  detail::element_args<Prec> args_of(std::size_t g) const {
    const group_storage& grp = groups_[g];
    detail::element_args<Prec> a{};
    a.master = grp.master();
    a.param = grp.spec.params;
    a.m = grp.states[0].get();
    a.v = grp.states[1].get();
    a.grad = grp.spec.grads;
    a.work = grp.work.get();
    a.mask = grp.mask.get();
    a.anchor = grp.anchor.get();
    a.k = coeffs_d_.get() + g;
    return a;
  }

  template <element_step K>
  void launch(const detail::element_args<Prec>& a, std::uint64_t n, cudaStream_t stream) {
    if (n == 0) return;
    detail::element_kernel<K, Prec><<<elementwise_grid(n), block_threads, 0, stream>>>(a, n, core());
    note(cudaGetLastError(), "step: launch of a 1-bit element kernel");
  }
  // dst = src (converted; null: zeros) over n elements, if this step applies.
  template <class To, class From>
  void assign_if_applied(To* dst, const From* src, std::size_t n, const char* what, cudaStream_t stream) {
    if (n == 0) return;
    detail::assign_if_applied_kernel<To, From><<<elementwise_grid(n), block_threads, 0, stream>>>(dst, src, n, core());
    note(cudaGetLastError(), what);
  }

  // The 1-bit allreduce of group grp's work buffer; nothing on one rank, and nothing (on every rank) when the step
  // is skipped.
  void average(group_storage& grp) {
    if (allreduce_) (*allreduce_)(grp.work.get(), grp.layout, grp.errors, applied_flag());
  }

  std::size_t index_of(const group_storage& grp) const { return std::size_t(&grp - groups_.data()); }

  // 1-bit Adam's compressed step: local momentum, its 1-bit average, then Adam with the frozen variance.
  void compressed_adam(group_storage& grp, cudaStream_t stream) {
    const detail::element_args<Prec> a = args_of(index_of(grp));
    launch<element_step::local_momentum>(a, grp.spec.size, stream);
    average(grp);
    launch<element_step::apply_momentum>(a, grp.spec.size, stream);
  }

  void zero_one_step(std::int64_t s, phase ph, communication c, cudaStream_t stream) {
    if (ph == phase::warmup) {  // the exact steps went through the Adam update
      for (group_storage& grp : groups_) {
        const detail::element_args<Prec> a = args_of(index_of(grp));
        launch<element_step::scaled_grad>(a, grp.spec.size, stream);
        average(grp);
        launch<element_step::apply_averaged_grad>(a, grp.spec.size, stream);
      }
      return;
    }
    // The first local step: the errors so far were of grads, from now on of accumulated updates; the sync point is
    // where the ranks last agreed. Gated on the applied flag like the rest: a skipped attempt changes nothing.
    if (s == groups_[0].spec.hparams.var_freeze_step + 1) {
      for (group_storage& grp : groups_) {
        assign_if_applied(grp.errors.worker.get(), static_cast<const float*>(nullptr), grp.errors.worker.size(),
                          "step: launch of the worker error reset", stream);
        assign_if_applied(grp.errors.server.get(), static_cast<const float*>(nullptr), grp.errors.server.size(),
                          "step: launch of the server error reset", stream);
        assign_if_applied(grp.anchor.get(), grp.master(), grp.spec.size, "step: launch of the sync point copy", stream);
      }
    }
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      group_storage& grp = groups_[g];
      detail::element_args<Prec> a = args_of(g);
      launch<element_step::local_update>(a, grp.spec.size, stream);
      if (c != communication::compressed_allreduce) continue;
      launch<element_step::accumulated_update>(a, grp.spec.size, stream);
      average(grp);
      a.lr_sum = grp.lr_sum + grp.spec.hparams.lr;  // this step's lr counts once it applies
      launch<element_step::apply_synchronised>(a, grp.spec.size, stream);
    }
  }

  // 1-bit LAMB's warm-up: exact LAMB on the mean grads (cuda/update.cuh's per-tensor update), each trust ratio
  // joining its tensor's EMA; at freeze_step the fresh variance starts from the variance.
  void warmup_lamb(std::int64_t s, cudaStream_t stream) {
    lamb_storage& l = lamb_;
    note(launch_per_tensor_update<lamb, Prec, 2>(
             l.warmup.entries(), l.warmup.map(), l.warmup_grid, l.entry_tensor.get(), l.segments, l.ratio_grid,
             coeffs_d_.get(), core(), l.partial.get(), l.partial.get(), l.coeff.get(), stream, [] {}),
         "step: launch of the exact LAMB update kernels");
    detail::lamb_warmup_ratio_kernel<compute_t><<<elementwise_grid(l.segments.tensors), block_threads, 0, stream>>>(
        l.segments, l.args.get(), core(), l.coeff.get(), l.tensors.get());
    note(cudaGetLastError(), "step: launch of the trust-ratio EMA kernel");
    for (group_storage& grp : groups_) {
      if (s != grp.spec.hparams.freeze_step || grp.spec.size == 0) continue;
      assign_if_applied(grp.states[2].get(), grp.states[1].get(), grp.spec.size,
                        "step: launch of the fresh-variance copy", stream);
    }
  }

  // 1-bit LAMB's compressed step, as the host's compressed_lamb: the equalisers (once), the fused momentum and its
  // 1-bit average, the stored momentum and fresh variance with their per-tensor sums, the factors, the update.
  void compressed_lamb(cudaStream_t stream) {
    lamb_storage& l = lamb_;
    const std::uint64_t count = l.host_segments.size();
    segment_pass<lamb_pass::momentum_squares>(stream);
    detail::lamb_equalise_kernel<><<<1, block_threads, 0, stream>>>(l.segments, l.elements.get(), core(),
                                                                    l.partial.get(), l.rms.get(), l.tensors.get());
    note(cudaGetLastError(), "step: launch of the equaliser kernel");
    segment_pass<lamb_pass::fused_momentum>(stream);
    if (allreduce_) (*allreduce_)(l.fused.get(), l.layout, l.errors, applied_flag());
    segment_pass<lamb_pass::moments>(stream);
    detail::lamb_factor_kernel<compute_t><<<l.ratio_grid, block_threads, 0, stream>>>(
        l.segments, l.args.get(), core(), l.partial.get(), l.tensors.get(), l.coeff.get());
    note(cudaGetLastError(), "step: launch of the factor kernel");
    segment_pass<lamb_pass::apply>(stream);
  }

  template <lamb_pass P>
  void segment_pass(cudaStream_t stream) {
    lamb_storage& l = lamb_;
    if (l.segment_grid == 0) return;
    detail::lamb_segment_kernel<P, Prec><<<l.segment_grid, block_threads, 0, stream>>>(
        l.segs.get(), l.host_segments.size(), coeffs_d_.get(), core(), l.tensors.get(), l.coeff.get(), l.partial.get());
    note(cudaGetLastError(), "step: launch of a 1-bit LAMB segment kernel");
  }

  // Every rank skips when any rank's local grads overflowed.
  void share_overflow_flag(cudaStream_t stream) {
    detail::any_flag_kernel<><<<1, block_threads, 0, stream>>>(partial_flag_.get(), stats_grid_, any_flag_.get());
    note(cudaGetLastError(), "step: launch of the overflow flag kernel");
    comm_->all_reduce(any_flag_.get(), 1, comm::reduce_op::max);
    detail::set_flag_kernel<><<<1, 1, 0, stream>>>(any_flag_.get(), partial_flag_.get());
    note(cudaGetLastError(), "step: launch of the overflow flag kernel");
  }

  void init(std::vector<group_type> groups, cudaStream_t stream) {
    throw_if_error(mpopt::onebit::validate_options<Rule, Prec>(options_));
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(mpopt::detail::validate_step_options(step_options_));
    for (std::size_t g = 0; g < groups.size(); ++g) {
      throw_if_error(mpopt::detail::validate_group(groups[g], g));
      throw_if_error(cuda::detail::check_group_buffers(groups[g], g));
    }
    int device = 0;
    throw_if_cuda_error(cudaGetDevice(&device), "cudaGetDevice");
    for (std::size_t g = 0; g < groups.size(); ++g)
      throw_if_error(cuda::detail::check_group_memory(groups[g], g, device));
    if (comm_ != nullptr) cuda::detail::check_same_layout(*comm_, -1, groups, stream);

    std::size_t largest = 0, total = 0;
    for (const group_type& spec : groups) {
      largest = std::max(largest, spec.size);
      total += spec.size;
    }
    groups_.reserve(groups.size());
    for (std::size_t g = 0; g < groups.size(); ++g) groups_.push_back(make_group(std::move(groups[g]), g, stream));
    if (world_ > 1) {
      mean_ = cuda::detail::grad_mean<reduce_type>(*comm_, largest, options_.bucket_elements);
      allreduce_.emplace(*comm_, is_lamb ? total : largest, stream);  // 1-bit LAMB: every group fused
      any_flag_ = device_buffer<double>(1, "overflow flag");
    }
    build_tables();

    const std::size_t ng = groups_.size();
    args_d_ = device_buffer<exact_args>(ng, "hyper-parameters");
    coeffs_d_ = device_buffer<coeffs_type>(ng, "rule coefficients");
    std::vector<exact_args> args(ng);
    for (std::size_t g = 0; g < ng; ++g) args[g] = Rule::exact(groups_[g].spec.hparams);
    if (ng > 0) cuda::detail::copy_to_device(args_d_.get(), args.data(), args_d_.bytes(), "hyper-parameters", stream);
    if constexpr (is_lamb) init_lamb(total, stream);
    init_step_state<Scaler>(step_options_, scaler_args_, options_d_, scalars_, stream);
    pending_lr_.assign(ng, 0.0);
    applied_h_ = pinned_buffer<std::int32_t>(1, "applied flag");
    done_ = make_ordering_event("the end of each step");
    throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (optimizer construction)");
  }

  group_storage make_group(group_type spec, std::size_t g, cudaStream_t stream) const {
    group_storage grp;
    const std::string where = " of group " + std::to_string(g);
    const std::size_t n = spec.size;
    if constexpr (Prec::separate_master)
      grp.master_copy = converted_buffer<master_t>(n, spec.params, n, "master" + where, stream);
    for (int j = 0; j < Rule::max_states; ++j)
      grp.states.push_back(
          filled_buffer<state_t>(n, convert<state_t>(0.0f), std::string(Rule::state_names[j]) + where, stream));
    if (world_ > 1) grp.reduced = device_buffer<grad_t>(n, "mean grads" + where);
    if constexpr (!is_lamb) {  // 1-bit LAMB averages the fused momentum of every group (lamb_storage)
      grp.work = device_buffer<float>(n, "1-bit work buffer" + where);
      grp.layout = compressed_layout::make(n, world_);
      grp.errors = error_feedback(grp.layout, stream);
    }
    grp.reduce_part = zero::make_partition(n, world_);
    if constexpr (is_zero_one) grp.anchor = filled_buffer<float>(n, 0.0f, "sync point" + where, stream);  // as the host
    grp.spec = std::move(spec);
    return grp;
  }

  void build_tables() {
    std::vector<grad_entry<grad_t>> local, mean;
    std::vector<entry_type> entries;
    std::uint64_t chunks = 0;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const group_storage& grp = groups_[g];
      local.push_back({grp.spec.grads, grp.spec.size, is_aligned(grp.spec.grads, vector_bytes) ? 1u : 0u});
      mean.push_back({grp.mean_grads(), grp.spec.size, is_aligned(grp.mean_grads(), vector_bytes) ? 1u : 0u});
      chunks += (grp.spec.size + stats_chunk_elems<grad_t> - 1) / stats_chunk_elems<grad_t>;
      entries.push_back(exact_entry(g, 0, grp.spec.size));
    }
    stats_local_ = device_table<grad_entry<grad_t>>(local, stats_chunk_elems<grad_t>, "local statistics");
    if (world_ > 1) stats_mean_ = device_table<grad_entry<grad_t>>(mean, stats_chunk_elems<grad_t>, "statistics");
    stats_grid_ = stats_grid(chunks);
    partial_sum_ = device_buffer<double>(stats_grid_, "statistics partial sums");
    partial_flag_ = device_buffer<int>(stats_grid_, "statistics partial flags");
    if constexpr (!is_lamb) {  // 1-bit LAMB's exact steps take segments (init_lamb)
      const std::uint32_t chunk = std::uint32_t(block_threads) * update_vector_width<Prec> * 4;
      exact_ = device_table<entry_type>(entries, chunk, "exact update");
      exact_grid_ = exact_.empty() ? 0u
                                   : grid_for(resident_blocks(update_kernel<adam, Prec, 2, 2>, "exact update"),
                                              exact_.map().total_chunks);
    }
  }

  // The exact update's entry for elements [begin, begin + n) of group g: the mean grads, exp_avg and exp_avg_sq.
  entry_type exact_entry(std::size_t g, std::size_t begin, std::size_t n) const {
    const group_storage& grp = groups_[g];
    entry_type e{};
    e.param = grp.spec.params + begin;
    e.master = grp.master() + begin;
    e.grad = grp.mean_grads() + begin;
    e.states[0] = grp.states[0].get() + begin;
    e.states[1] = grp.states[1].get() + begin;
    e.n = n;
    e.group = std::uint32_t(g);
    e.first_index = begin;
    const bool aligned = is_aligned(e.master, vector_bytes) && is_aligned(e.grad, vector_bytes) &&
                         (!Prec::separate_master || is_aligned(e.param, vector_bytes)) &&
                         is_aligned(e.states[0], vector_bytes) && is_aligned(e.states[1], vector_bytes);
    e.vector_ok = aligned ? 1u : 0u;
    return e;
  }

  // 1-bit LAMB's buffers, per-tensor state and tables: the segments (zero::grid_segments at
  // per_tensor_segment_elems) of every group in group order, each one entry of the exact update and one of the
  // compressed kernels.
  void init_lamb(std::size_t total, cudaStream_t stream) {
    lamb_storage& l = lamb_;
    l.layout = compressed_layout::make(total, world_);
    l.errors = error_feedback(l.layout, stream);
    l.fused = device_buffer<float>(total, "1-bit LAMB fused momentum");
    l.prev = device_buffer<float>(total, "1-bit LAMB previous momentum");
    std::vector<args_type> args;
    std::vector<std::uint32_t> tensor_group, entry_tensor;
    std::vector<std::uint64_t> tensor_begin{0}, slots, elements;
    std::vector<entry_type> warmup;
    std::size_t fused_offset = 0;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const group_storage& grp = groups_[g];
      args.push_back(grp.spec.hparams);
      const std::vector<std::size_t> offsets = mpopt::detail::tensor_offsets(grp.spec);
      const std::size_t base = tensor_group.size();
      l.tensor_base.push_back(base);
      for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
        tensor_group.push_back(std::uint32_t(g));
        elements.push_back(offsets[t + 1] - offsets[t]);
      }
      std::vector<std::uint64_t> per_tensor(offsets.size() - 1, 0);
      for (const zero::segment& seg :
           zero::grid_segments(zero::range{0, grp.spec.size}, offsets, per_tensor_segment_elems)) {
        const std::size_t n = seg.end - seg.begin;
        const std::uint32_t tensor = std::uint32_t(base + seg.tensor);
        ++per_tensor[seg.tensor];
        slots.push_back(slots.size());
        entry_tensor.push_back(tensor);
        warmup.push_back(exact_entry(g, seg.begin, n));
        detail::lamb_segment<Prec> d{};
        d.master = grp.master() + seg.begin;
        d.param = grp.spec.params + seg.begin;
        d.m = grp.states[0].get() + seg.begin;
        d.v = grp.states[1].get() + seg.begin;
        d.fresh = grp.states[2].get() + seg.begin;
        d.grad = grp.spec.grads + seg.begin;
        d.fused = l.fused.get() + fused_offset + seg.begin;
        d.prev = l.prev.get() + fused_offset + seg.begin;
        d.n = n;
        d.group = std::uint32_t(g);
        d.tensor = tensor;
        l.host_segments.push_back(d);
      }
      for (std::uint64_t c : per_tensor) tensor_begin.push_back(tensor_begin.back() + c);
      fused_offset += grp.spec.size;
    }
    l.tensor_base.push_back(tensor_group.size());
    const std::size_t tensors = tensor_group.size();
    l.args = cuda::detail::upload(args, "1-bit LAMB hyper-parameters");
    l.tensors = cuda::detail::upload(std::vector<onebit_lamb::tensor_state>(tensors), "1-bit LAMB tensor state");
    l.tensor_begin = cuda::detail::upload(tensor_begin, "1-bit LAMB segment index");
    l.slot = cuda::detail::upload(slots, "1-bit LAMB segment slots");
    l.elements = cuda::detail::upload(elements, "1-bit LAMB tensor sizes");
    l.tensor_group = cuda::detail::upload(tensor_group, "1-bit LAMB tensor groups");
    l.entry_tensor = cuda::detail::upload(entry_tensor, "1-bit LAMB segment tensors");
    l.segments = tensor_segments{l.tensor_begin.get(), l.slot.get(), l.tensor_group.get(), std::uint32_t(tensors)};
    l.partial = device_buffer<double>(detail::lamb_partials * slots.size(), "1-bit LAMB segment sums");
    l.rms = device_buffer<double>(tensors, "1-bit LAMB momentum RMS");
    // 1: the trust ratio of a step with no segment at all (every tensor empty), as the host's.
    l.coeff = cuda::detail::upload(std::vector<compute_t>(tensors, compute_t(1)), "1-bit LAMB coefficients");
    l.warmup = device_table<entry_type>(warmup, per_tensor_segment_elems, "1-bit LAMB exact update");
    const std::uint64_t segments = slots.size();
    if (segments > 0) {
      l.warmup_grid =
          grid_for(resident_blocks(per_tensor_phase1_kernel<lamb, Prec, 2>, "1-bit LAMB exact update"), segments);
      l.segment_grid = grid_for(
          resident_blocks(detail::lamb_segment_kernel<lamb_pass::moments, Prec>, "1-bit LAMB segments"), segments);
    }
    l.ratio_grid = std::uint32_t(std::min<std::uint64_t>(tensors, 4096));
    l.segs = lamb_segment_table();
  }

  // The compressed kernels' segment table on the device, pointing at each group's momentum mask, group g's (if any)
  // being mask_g (device memory; null for none).
  device_buffer<detail::lamb_segment<Prec>> lamb_segment_table(std::size_t g = std::size_t(-1),
                                                               const std::uint8_t* mask_g = nullptr) const {
    std::vector<detail::lamb_segment<Prec>> segs = lamb_.host_segments;
    for (detail::lamb_segment<Prec>& d : segs) {
      const group_storage& grp = groups_[d.group];
      const std::uint8_t* mask = d.group == g ? mask_g : grp.mask.get();
      d.mask = mask != nullptr ? mask + (d.master - grp.master()) : nullptr;
    }
    return cuda::detail::upload(segs, "1-bit LAMB segments");
  }

  comm::communicator* comm_ = nullptr;  // null: one GPU
  int world_ = 1;
  std::vector<group_storage> groups_;
  scaler_args scaler_args_;
  step_options step_options_;
  mpopt::onebit::options options_;
  status last_error_;

  // Host view of the schedule: applied steps, as the host optimizer counts them.
  std::int64_t step_ = 0;
  schedule schedule_;
  pending_step pending_;
  std::vector<double> pending_lr_;  // each group's lr when the pending step was enqueued
  pinned_buffer<std::int32_t> applied_h_;
  ordering_event done_;

  cuda::detail::grad_mean<reduce_type> mean_;
  std::optional<compressed_allreduce> allreduce_;
  device_buffer<double> any_flag_;

  device_buffer<exact_args> args_d_;
  device_buffer<coeffs_type> coeffs_d_;
  device_buffer<device_options> options_d_;
  device_buffer<scalars_type> scalars_;

  device_table<grad_entry<grad_t>> stats_local_, stats_mean_;
  std::uint32_t stats_grid_ = 0;
  device_buffer<double> partial_sum_;
  device_buffer<int> partial_flag_;
  device_table<entry_type> exact_;
  std::uint32_t exact_grid_ = 0;
  lamb_storage lamb_;
};

}  // namespace mpopt::cuda::onebit
