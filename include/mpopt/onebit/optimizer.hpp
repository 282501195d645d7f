// mpopt::onebit::optimizer: 1-bit Adam, 0/1 Adam and 1-bit LAMB (rule/onebit.hpp) on the host, data-parallel over a
// host-memory communicator. step() takes this rank's *local* grads and does the step's communication itself: an
// exact mean all-reduce of the grads, the error-compensated 1-bit allreduce (onebit/compressed_allreduce.hpp) of the
// momentum (or, in 0/1 Adam, of the grads or of the accumulated local update), or nothing. next_communication() says
// which, before the step, so a framework can plan around it; DeepSpeed instead flips its engine's backward
// all-reduce from inside the optimizer.
//
// Differences from DeepSpeed (runtime/fp16/onebit), each deliberate:
//   - No initialisation call: DeepSpeed's first step() discards its batch to warm up the buffers and its step
//     counter runs one ahead. Here step k is the k-th applied update, so 1-bit Adam takes exactly freeze_step exact
//     steps (DeepSpeed: freeze_step - 1) and 0/1 Adam's variance phase is steps 1..var_freeze_step.
//   - Weight decay is decoupled in the AdamW form, w (1 - lr wd) - lr m / (sqrt(v) + eps), the same value as
//     DeepSpeed's w - lr (m / (sqrt(v) + eps) + wd w) up to rounding, so the exact steps are mpopt::adam bit for bit.
//   - The overflow flag is max-reduced on every step that skips on overflow (DeepSpeed: when its backward all-reduce
//     is off), so all ranks skip together. In compressed and local steps the clipping norm is the local grad norm, as
//     in DeepSpeed; step_result::grad_norm is then this rank's norm.
//   - 1-bit LAMB's per-tensor RMS equaliser treats an all-zero momentum as scale 1 (DeepSpeed divides by zero).
//   - The error buffers are part of the state (errors(i)), saved and restored by a checkpoint of the same world size.
// Not composed with ZeRO (DeepSpeed refuses too): the compressed allreduce needs every rank's whole momentum, so
// sharding would save only the frozen variance and the master. State is replicated on every rank.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../error.hpp"
#include "../host/aligned_buffer.hpp"
#include "../host/executor.hpp"
#include "../numeric/convert.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../rule/onebit.hpp"
#include "../scaler/scalers.hpp"
#include "../zero/partition.hpp"
#include "compressed_allreduce.hpp"
#include "elements.hpp"

namespace mpopt::onebit {

// Where a rule is in its schedule. 0/1 Adam's variance-update phase (exact and compressed steps mixed) is its warmup.
enum class phase : std::uint8_t { warmup, compressed, local_steps };
// What step() communicates besides a few scalars.
enum class communication : std::uint8_t { exact_allreduce, compressed_allreduce, none };

inline const char* to_string(phase p) {
  switch (p) {
    case phase::warmup: return "warmup";
    case phase::compressed: return "compressed";
    case phase::local_steps: return "local_steps";
  }
  return "?";
}
inline const char* to_string(communication c) {
  switch (c) {
    case communication::exact_allreduce: return "exact_allreduce";
    case communication::compressed_allreduce: return "compressed_allreduce";
    case communication::none: return "none";
  }
  return "?";
}

struct options {
  // The 1-bit family's convergence is verified only with fp16 params and grads (DeepSpeed's fp16 mode, with an fp32
  // master). Any other precision policy is refused unless the caller opts in here.
  bool accept_unverified_precision = false;
  // Largest piece of an exact all-reduce (bounds its workspace, as zero_options::bucket_elements does).
  std::size_t bucket_elements = std::size_t(1) << 20;
};

// The precision policies the 1-bit optimizers (host and CUDA) take; a static_assert says what to change.
template <class Prec>
constexpr bool supported_policy() {
  static_assert(is_precision<Prec>::value,
                "the 1-bit optimizers' 2nd argument must be an mpopt::precision<param<..>, master<..>, grad<..>, "
                "state<..>>");
  if constexpr (is_precision<Prec>::value) {
    static_assert(std::is_same_v<typename Prec::master_rounding, nearest_rounding>,
                  "stochastic rounding and Kahan summation are not implemented for the 1-bit optimizers; use "
                  "master<T> (round to nearest)");
    static_assert(std::is_same_v<typename Prec::compute_t, float>,
                  "the 1-bit optimizers' compressed allreduce works in fp32; use an fp32 compute type");
  }
  return true;
}

// The checks of `options` every 1-bit optimizer makes, host or CUDA: the precision rule (see options) first.
template <class Prec>
inline constexpr bool verified_precision_v =
    std::is_same_v<typename Prec::param_t, half_t>&& std::is_same_v<typename Prec::grad_t, half_t>;

template <class Rule, class Prec>
status validate_options(const options& o) {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  if (!verified_precision_v<Prec> && !o.accept_unverified_precision)
    return status::invalid(std::string(Rule::name) +
                           ": the 1-bit optimizers are verified for convergence only with fp16 params and grads "
                           "(DeepSpeed's fp16 mode); this policy has " +
                           dtype_name<param_t>() + " params and " + dtype_name<grad_t>() +
                           " grads. Set onebit::options::accept_unverified_precision = true to run it anyway");
  if (o.bucket_elements == 0) return status::invalid("onebit::options.bucket_elements must be > 0, got 0");
  return status::success();
}

// 0/1 Adam's intervals and counters (identical on every rank). Unused by the other rules.
struct schedule {
  std::int64_t var_interval = 1;         // exact (variance) steps happen at multiples of this
  std::int64_t var_counter = 0;          // exact steps taken at the current var_interval
  std::int64_t local_step_interval = 1;  // local phase: synchronise at multiples of this
  std::int64_t local_step_counter = 0;   // local steps taken at the current local_step_interval
};

// set_schedule's check (host and CUDA optimizers).
inline status validate_schedule(const schedule& s) {
  if (s.var_interval < 1 || s.local_step_interval < 1 || s.var_counter < 0 || s.local_step_counter < 0)
    return status::invalid("set_schedule: intervals must be >= 1 and counters >= 0, got var_interval " +
                           std::to_string(s.var_interval) + ", var_counter " + std::to_string(s.var_counter) +
                           ", local_step_interval " + std::to_string(s.local_step_interval) + ", local_step_counter " +
                           std::to_string(s.local_step_counter));
  return status::success();
}

// set_momentum_mask's check of a non-null mask of n values for group g of `size` elements (host and CUDA optimizers).
inline void check_momentum_mask(std::size_t g, std::size_t size, const std::uint8_t* mask, std::size_t n) {
  if (n != size)
    throw error(status::invalid("set_momentum_mask: group " + std::to_string(g) + " has " + std::to_string(size) +
                                " elements, got n = " + std::to_string(n)));
  for (std::size_t i = 0; i < n; ++i)
    if (mask[i] > 1)
      throw error(status::invalid("set_momentum_mask: mask[" + std::to_string(i) + "] must be 0 or 1, got " +
                                  std::to_string(int(mask[i]))));
}

template <class Rule, class Prec, class Scaler = no_scaler>
class optimizer {
  static constexpr bool is_adam = std::is_same_v<Rule, onebit_adam>;
  static constexpr bool is_zero_one = std::is_same_v<Rule, zero_one_adam>;
  static constexpr bool is_lamb = std::is_same_v<Rule, onebit_lamb>;
  static_assert(is_adam || is_zero_one || is_lamb,
                "mpopt::onebit::optimizer: the rule must be mpopt::onebit_adam, mpopt::zero_one_adam or "
                "mpopt::onebit_lamb; other rules go to mpopt::optimizer");
  static_assert(supported_policy<Prec>());

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
  using C = typename Prec::compute_t;
  using group_type = param_group<Rule, Prec>;

  // fp16 params and grads: the precision the 1-bit family is verified with (see options).
  static constexpr bool verified_precision = verified_precision_v<Prec>;

  // Collective over `comm` (host memory; it must outlive the optimizer): every rank constructs with the same group
  // layout (checked) and its own buffers, holding the same initial params. Throws mpopt::error naming the group and
  // field for invalid input, and for a precision policy other than fp16 params and grads unless opted in.
  optimizer(std::vector<group_type> groups, comm::communicator& comm, scaler_args scaler = {},
            step_options step_opts = {}, onebit::options opts = {})
      : comm_(&comm),
        scaler_args_(scaler),
        step_options_(step_opts),
        options_(opts),
        allreduce_(comm, compressed_elements(groups)) {
    if (comm.memory() != comm::memory_space::host)
      throw error(status::invalid(std::string(Rule::name) +
                                  ": the host optimizer needs a host-memory communicator (mpi or single-rank), got " +
                                  comm.name()));
    throw_if_error(validate_options<Rule, Prec>(options_));
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(mpopt::detail::validate_step_options(step_options_));
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(mpopt::detail::validate_group(groups[g], g));
    world_ = comm.size();
    mpopt::detail::check_same_layout(*comm_, -1, groups);
    scaler_state_ = Scaler::init(scaler_args_);
    std::size_t largest = 0, total = 0;
    for (auto& spec : groups) {
      largest = std::max(largest, spec.size);
      groups_.push_back(make_group(std::move(spec), total));
      total += groups_.back().spec.size;
    }
    if (world_ > 1) {
      const std::size_t n = std::min(largest, options_.bucket_elements);
      send_ = host::aligned_buffer<reduce_type>(n);
      recv_ = host::aligned_buffer<reduce_type>(n);
    }
    if constexpr (is_lamb) {
      fused_layout_ = compressed_layout::make(total, world_);
      fused_errors_ = error_feedback(fused_layout_);
      fused_ = host::aligned_buffer<float>(total);
      previous_momentum_ = host::aligned_buffer<float>(total);
    }
  }

  // One rank (no communication): the compressed allreduce is then the identity, as in DeepSpeed.
  explicit optimizer(std::vector<group_type> groups, scaler_args scaler = {}, step_options step_opts = {},
                     onebit::options opts = {})
      : optimizer(std::move(groups), own_single_rank(), scaler, step_opts, opts) {}

  std::size_t num_groups() const noexcept { return groups_.size(); }
  const args_type& hparams(std::size_t g) const { return at(g).spec.hparams; }
  // Validates before changing anything (an lr schedule, say). The phase boundaries (freeze_step, var_freeze_step)
  // must be the same on every rank.
  void set_hparams(std::size_t g, const args_type& a) {
    check_group_index(g);
    throw_if_error(mpopt::detail::with_group_prefix(Rule::validate(a), g));
    groups_[g].spec.hparams = a;
  }
  const step_options& options() const noexcept { return step_options_; }
  const onebit::options& onebit_options() const noexcept { return options_; }
  comm::communicator& communicator() const noexcept { return *comm_; }

  std::int64_t step_count() const noexcept { return step_; }
  double loss_scale() const { return double(Scaler::scale(scaler_state_, scaler_args_)); }
  const scaler_state_type& scaler_state() const noexcept { return scaler_state_; }
  void set_scaler_state(const scaler_state_type& s) { scaler_state_ = s; }

  // The phase and communication of the next step() (the phase boundaries are group 0's hyper-parameters).
  phase next_phase() const { return phase_of(step_ + 1); }
  communication next_communication() const {
    const std::int64_t s = step_ + 1;
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

  std::size_t size(std::size_t g) const { return at(g).spec.size; }
  // Group g's tensor sizes as constructed (empty: one tensor) and the scaler's arguments: checkpoint metadata.
  const std::vector<std::size_t>& tensor_sizes(std::size_t g) const { return at(g).spec.tensor_sizes; }
  const scaler_args& scaler_arguments() const noexcept { return scaler_args_; }
  const master_t* master(std::size_t g) const { return at(g).master(); }
  int num_states(std::size_t) const noexcept { return Rule::max_states; }
  const state_t* state(std::size_t g, int j) const {
    check_state_index(g, j);
    return groups_[g].states[std::size_t(j)].data();
  }
  // The error-feedback buffers (this rank's; they differ per rank): one per group, or (1-bit LAMB) one for the
  // momentum of all groups fused.
  std::size_t num_error_buffers() const noexcept { return is_lamb ? 1 : groups_.size(); }
  const error_feedback& errors(std::size_t i) const {
    if (i >= num_error_buffers())
      throw error(status::invalid("errors: index " + std::to_string(i) + " out of range (" +
                                  std::to_string(num_error_buffers()) + " error buffers)"));
    if constexpr (is_lamb) {
      return fused_errors_;
    } else {
      return groups_[i].errors;
    }
  }
  error_feedback& errors(std::size_t i) { return const_cast<error_feedback&>(std::as_const(*this).errors(i)); }
  const compressed_layout& error_layout(std::size_t i) const {
    (void)errors(i);
    if constexpr (is_lamb) {
      return fused_layout_;
    } else {
      return groups_[i].layout;
    }
  }

  // 0/1 Adam: the weights at the last synchronisation (group size elements; the same on every rank) and the lr
  // summed over the local steps since; its schedule. DeepSpeed's momentum_accumulator is master(g) - sync_point(g).
  const float* sync_point(std::size_t g) const {
    static_assert(is_zero_one, "sync_point: only mpopt::zero_one_adam takes local steps");
    return at(g).anchor.data();
  }
  double accumulated_lr(std::size_t g) const { return at(g).lr_sum; }
  const schedule& current_schedule() const noexcept { return schedule_; }

  // 1-bit LAMB, per tensor of group g: the frozen EMA of the warm-up trust ratios, the last bounded factor, the
  // momentum equaliser (0 until the first compressed step) and the coefficient of the last step (for logging).
  using lamb_tensor_state = onebit_lamb::tensor_state;
  const std::vector<lamb_tensor_state>& lamb_state(std::size_t g) const {
    static_assert(is_lamb, "lamb_state: only mpopt::onebit_lamb has per-tensor coefficients");
    return at(g).lamb;
  }

  // A 0/1 mask over group g's elements (DeepSpeed's exp_avg_mask): the averaged momentum (0/1 Adam: grads) is
  // multiplied by it, so coordinates whose momentum must stay zero do not collect error feedback. Null clears it.
  void set_momentum_mask(std::size_t g, const std::uint8_t* mask, std::size_t n) {
    check_group_index(g);
    group& grp = groups_[g];
    if (mask == nullptr) {
      grp.mask.clear();
      return;
    }
    check_momentum_mask(g, grp.spec.size, mask, n);
    grp.mask.assign(mask, mask + n);
  }

  // Checkpoint restore: values of every element of group g (the same on every rank, except the error buffers).
  void set_master(std::size_t g, const master_t* values, std::size_t n) {
    check_size(g, n, "set_master");
    group& grp = groups_[g];
    master_t* m = grp.master();
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = values[i];
      if constexpr (Prec::separate_master) grp.spec.params[i] = convert<param_t>(values[i]);
    }
  }
  void set_state(std::size_t g, int j, const state_t* values, std::size_t n) {
    check_state_index(g, j);
    check_size(g, n, "set_state");
    std::copy(values, values + n, groups_[g].states[std::size_t(j)].data());
  }
  void set_step_count(std::int64_t step) {
    if (step < 0) throw error(status::invalid("set_step_count: step must be >= 0, got " + std::to_string(step)));
    step_ = step;
  }
  void set_schedule(const schedule& s) {
    throw_if_error(validate_schedule(s));
    schedule_ = s;
  }
  void set_sync_point(std::size_t g, const float* values, std::size_t n, double lr_sum) {
    static_assert(is_zero_one, "set_sync_point: only mpopt::zero_one_adam takes local steps");
    check_size(g, n, "set_sync_point");
    std::copy(values, values + n, groups_[g].anchor.data());
    groups_[g].lr_sum = lr_sum;
  }
  void set_lamb_state(std::size_t g, const std::vector<lamb_tensor_state>& s) {
    static_assert(is_lamb, "set_lamb_state: only mpopt::onebit_lamb has per-tensor coefficients");
    check_group_index(g);
    if (s.size() != groups_[g].lamb.size())
      throw error(status::invalid("set_lamb_state: group " + std::to_string(g) + " has " +
                                  std::to_string(groups_[g].lamb.size()) + " tensors, got " +
                                  std::to_string(s.size())));
    groups_[g].lamb = s;
  }

  step_result step() {
    const std::int64_t s = step_ + 1;
    const phase ph = phase_of(s);
    const communication c = next_communication();
    const bool need_stats = Scaler::skips_on_overflow(scaler_args_) || step_options_.max_grad_norm > 0;

    // Exact steps average the grads first and take statistics of the mean; the others take local statistics.
    for (group& grp : groups_) grp.step_grads = grp.spec.grads;
    if (c == communication::exact_allreduce && world_ > 1)
      for (group& grp : groups_) grp.step_grads = exact_mean(grp);
    double sum_sq = 0.0;
    bool nonfinite = false;
    if (need_stats) {
      for (group& grp : groups_) {
        nonfinite = host::reduce_grad_partials(grp.step_grads, grp.spec.size, grp.stat_partials.data()) || nonfinite;
        sum_sq += host::sum_in_order(grp.stat_partials.data(), grp.stat_partials.size());
      }
      nonfinite = nonfinite || !std::isfinite(sum_sq);
      if (c != communication::exact_allreduce && world_ > 1 && Scaler::skips_on_overflow(scaler_args_)) {
        double flag = nonfinite ? 1.0 : 0.0;
        comm_->all_reduce(&flag, 1, comm::reduce_op::max);
        nonfinite = flag != 0.0;
      }
    }
    mpopt::detail::step_plan plan = mpopt::detail::plan_step<Scaler>(scaler_state_, scaler_args_, step_options_,
                                                                     need_stats, sum_sq, nonfinite, step_);
    if (!plan.result.applied) return plan.result;
    const C factor = C(plan.factor.factor);
    if constexpr (is_adam) {
      for (group& grp : groups_) ph == phase::warmup ? exact_adam(grp, factor) : compressed_adam(grp, factor);
    } else if constexpr (is_zero_one) {
      if (!groups_.empty()) step_zero_one(s, ph, c, factor);
    } else {
      if (!groups_.empty()) ph == phase::warmup ? warmup_lamb(s, factor) : compressed_lamb(factor);
    }
    step_ = s;
    return plan.result;
  }

 private:
  using reduce_type = mpopt::detail::reduce_t<grad_t>;
  using adam_view = host::group_view<Prec, adam::max_states>;
  using lamb_view = host::group_view<Prec, lamb::max_states>;

  struct group {
    group_type spec;
    std::vector<std::size_t> offsets;  // tensor boundaries, tensors + 1
    std::size_t fused_offset = 0;      // 1-bit LAMB: where the group's momentum sits in the fused buffer
    host::aligned_buffer<master_t> master_copy;
    std::vector<host::aligned_buffer<state_t>> states;
    host::aligned_buffer<grad_t> reduced;  // exact steps at world size > 1: the mean grads
    host::aligned_buffer<float> work;      // the fp32 values the 1-bit allreduce averages (not 1-bit LAMB)
    compressed_layout layout;
    error_feedback errors;
    std::vector<std::uint8_t> mask;
    zero::partition reduce_part;
    std::vector<double> stat_partials;
    const grad_t* step_grads = nullptr;
    // 0/1 Adam
    host::aligned_buffer<float> anchor;  // the weights at the last synchronisation
    double lr_sum = 0.0;
    // 1-bit LAMB
    std::vector<lamb_tensor_state> lamb;
    std::vector<zero::segment> segments;
    std::vector<double> segment_partials;
    std::vector<double> tensor_sums;
    std::vector<C> trust_ratio;

    master_t* master() {
      if constexpr (Prec::separate_master) {
        return master_copy.data();
      } else {
        return spec.params;
      }
    }
    const master_t* master() const { return const_cast<group*>(this)->master(); }
    float masked(std::size_t i, float v) const { return mask.empty() || mask[i] ? v : 0.0f; }
  };

  // The most elements one compressed allreduce carries: the largest group, or (1-bit LAMB) all of them fused.
  static std::size_t compressed_elements(const std::vector<group_type>& groups) {
    std::size_t largest = 0, total = 0;
    for (const group_type& g : groups) {
      largest = std::max(largest, g.size);
      total += g.size;
    }
    return is_lamb ? total : largest;
  }

  static comm::communicator& own_single_rank() {
    static comm::single_rank one;
    return one;
  }

  const group& at(std::size_t g) const {
    check_group_index(g);
    return groups_[g];
  }
  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw error(status::invalid("group index " + std::to_string(g) + " out of range (" +
                                  std::to_string(groups_.size()) + " groups)"));
  }
  void check_state_index(std::size_t g, int j) const {
    check_group_index(g);
    if (j < 0 || j >= Rule::max_states)
      throw error(status::invalid("state index " + std::to_string(j) + " out of range for group " + std::to_string(g) +
                                  " (" + std::to_string(Rule::max_states) + " states)"));
  }
  void check_size(std::size_t g, std::size_t n, const char* what) const {
    check_group_index(g);
    if (n != groups_[g].spec.size)
      throw error(status::invalid(std::string(what) + ": group " + std::to_string(g) + " has " +
                                  std::to_string(groups_[g].spec.size) + " elements, got n = " + std::to_string(n)));
  }

  phase phase_of(std::int64_t s) const {
    if (groups_.empty()) return phase::warmup;
    const args_type& a = groups_[0].spec.hparams;
    if constexpr (is_zero_one) {
      return s <= a.var_freeze_step ? phase::warmup : phase::local_steps;
    } else {
      return s <= a.freeze_step ? phase::warmup : phase::compressed;
    }
  }

  group make_group(group_type spec, std::size_t fused_offset) {
    group grp;
    grp.offsets = mpopt::detail::tensor_offsets(spec);
    const std::size_t n = spec.size;
    grp.fused_offset = fused_offset;
    if constexpr (Prec::separate_master) {
      grp.master_copy = host::aligned_buffer<master_t>(n);
      for (std::size_t i = 0; i < n; ++i) grp.master_copy[i] = convert<master_t>(spec.params[i]);
    }
    for (int j = 0; j < Rule::max_states; ++j) grp.states.emplace_back(n);  // zero: every initial state is 0
    if (world_ > 1) grp.reduced = host::aligned_buffer<grad_t>(n);
    grp.reduce_part = zero::make_partition(n, world_);
    grp.stat_partials.resize((n + host::reduce_block - 1) / host::reduce_block);
    if constexpr (is_lamb) {
      const std::size_t tensors = grp.offsets.size() - 1;
      grp.lamb.resize(tensors);
      grp.segments = zero::grid_segments(zero::range{0, n}, grp.offsets, host::reduce_block);
      grp.segment_partials.resize(2 * grp.segments.size());
      grp.tensor_sums.resize(2 * tensors);
      grp.trust_ratio.resize(tensors);
    } else {
      grp.layout = compressed_layout::make(n, world_);
      grp.errors = error_feedback(grp.layout);
      grp.work = host::aligned_buffer<float>(n);
    }
    if constexpr (is_zero_one) grp.anchor = host::aligned_buffer<float>(n);
    grp.spec = std::move(spec);
    return grp;
  }

  // The mean over ranks of the group's grads, the same bits on every rank: each element is reduced once, on the
  // rank that owns it (in the wide reduce type, as the ZeRO optimizer does), and the rounded means are all-gathered.
  const grad_t* exact_mean(group& grp) {
    const zero::partition& part = grp.reduce_part;
    const grad_t* g = grp.spec.grads;
    grad_t* out = grp.reduced.data();
    for (std::size_t b = 0; b < grp.spec.size; b += options_.bucket_elements) {
      const zero::range piece{b, std::min(grp.spec.size, b + options_.bucket_elements)};
      for (std::size_t i = piece.begin; i < piece.end; ++i) send_[i - piece.begin] = convert<reduce_type>(g[i]);
      const std::vector<std::size_t> counts = part.counts(piece);
      comm_->reduce_scatter(send_.data(), recv_.data(), counts, comm::reduce_op::sum);
      const zero::range mine = zero::intersect(piece, part.owned(comm_->rank()));
      for (std::size_t i = mine.begin; i < mine.end; ++i)
        out[i] = convert<grad_t>(recv_[i - mine.begin] / reduce_type(world_));
      comm_->all_gather(out + piece.begin, counts);
    }
    return out;
  }

  adam_view view_of(group& grp) {
    adam_view v;
    v.param = grp.spec.params;
    v.master = grp.master();
    v.grad = grp.step_grads;
    v.n = grp.spec.size;
    v.states[0] = grp.states[0].data();
    v.states[1] = grp.states[1].data();
    return v;
  }

  // Writes w (compute type) as the master and the param copy of element i.
  static void store(group& grp, std::size_t i, C w) {
    const master_t m = convert<master_t>(w);
    grp.master()[i] = m;
    if constexpr (Prec::separate_master) grp.spec.params[i] = convert<param_t>(m);
  }
  static C load_state(const group& grp, int j, std::size_t i) { return convert<C>(grp.states[std::size_t(j)][i]); }
  // Stores a state and returns it as stored, so the rest of the step uses the rounded value (as the exact rules do).
  static C store_state(group& grp, int j, std::size_t i, C v) {
    grp.states[std::size_t(j)][i] = convert<state_t>(v);
    return load_state(grp, j, i);
  }

  template <class F>
  static void parallel_for(std::size_t n, F&& f) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(n) > host::parallel_threshold)
#endif
    for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(n); ++i) f(std::size_t(i));
  }

  // Exact Adam (no bias correction) on the mean grads: the rule mpopt::optimizer runs, through the same loop.
  void exact_adam(group& grp, C factor) {
    const auto k = adam::prepare<C>(Rule::exact(grp.spec.hparams), step_ + 1);
    host::update_elementwise<adam, Prec>(view_of(grp), k, 2, factor);
  }

  // 1-bit Adam's compressed step: local momentum, its 1-bit average, then Adam with the frozen variance.
  void compressed_adam(group& grp, C factor) {
    const auto k = adam::prepare<C>(Rule::exact(grp.spec.hparams), step_ + 1);
    const grad_t* g = grp.step_grads;
    float* m = grp.work.data();
    state_t* mom = grp.states[0].data();
    const state_t* var = grp.states[1].data();
    parallel_for(grp.spec.size, [&](std::size_t i) { m[i] = element::local_momentum<Prec>(k, mom[i], g[i], factor); });
    allreduce_(m, grp.layout, grp.errors);
    master_t* w = grp.master();
    parallel_for(grp.spec.size, [&](std::size_t i) {
      element::apply_momentum<Prec>(k, w[i], grp.spec.params[i], mom[i], var[i], C(grp.masked(i, m[i])));
    });
  }

  void step_zero_one(std::int64_t s, phase ph, communication c, C factor) {
    if (ph == phase::warmup) {
      if (c == communication::exact_allreduce) {
        for (group& grp : groups_) exact_adam(grp, factor);
      } else {
        for (group& grp : groups_) compressed_grad_step(grp, factor);
      }
      if (s % schedule_.var_interval == 0 && ++schedule_.var_counter == groups_[0].spec.hparams.var_update_scaler) {
        schedule_.var_counter = 0;
        schedule_.var_interval *= 2;
      }
      return;
    }
    // The first local step: the errors so far were of grads, from now on they are of accumulated updates; the
    // weights are where the ranks last agreed.
    if (s == groups_[0].spec.hparams.var_freeze_step + 1) {
      for (group& grp : groups_) {
        grp.errors.reset();
        const master_t* w = grp.master();
        for (std::size_t i = 0; i < grp.spec.size; ++i) grp.anchor[i] = convert<float>(w[i]);
      }
    }
    for (group& grp : groups_) local_step(grp, factor, c == communication::compressed_allreduce);
    const zero_one_adam::args& a = groups_[0].spec.hparams;
    if (++schedule_.local_step_counter == a.local_step_scaler) {
      schedule_.local_step_counter = 0;
      schedule_.local_step_interval = std::min(a.local_step_clipper, 2 * schedule_.local_step_interval);
    }
  }

  // 0/1 Adam between exact steps: grads averaged by the 1-bit allreduce update the momentum only.
  void compressed_grad_step(group& grp, C factor) {
    const auto k = adam::prepare<C>(Rule::exact(grp.spec.hparams), step_ + 1);
    const grad_t* g = grp.step_grads;
    float* avg = grp.work.data();
    parallel_for(grp.spec.size, [&](std::size_t i) { avg[i] = element::scaled_grad<Prec>(g[i], factor); });
    allreduce_(avg, grp.layout, grp.errors);
    master_t* w = grp.master();
    state_t* mom = grp.states[0].data();
    const state_t* var = grp.states[1].data();
    parallel_for(grp.spec.size, [&](std::size_t i) {
      element::apply_averaged_grad<Prec>(k, w[i], grp.spec.params[i], mom[i], var[i], C(grp.masked(i, avg[i])));
    });
  }

  // 0/1 Adam's local step: momentum from the local grads and the frozen-variance update. On a synchronisation step
  // each rank's update since the last one (weights - sync point), in momentum units, is averaged with the 1-bit
  // allreduce and applied to the sync point, and the momentum becomes that average over the lr spent. DeepSpeed
  // accumulates the update in a separate buffer and subtracts it again, which leaves the ranks' weights differing
  // by rounding; applying the average to the stored sync point gives every rank the same bits.
  void local_step(group& grp, C factor, bool synchronise) {
    const zero_one_adam::args& a = grp.spec.hparams;
    const auto k = adam::prepare<C>(Rule::exact(a), step_ + 1);
    const grad_t* g = grp.step_grads;
    grp.lr_sum += a.lr;
    master_t* w = grp.master();
    state_t* mom = grp.states[0].data();
    const state_t* var = grp.states[1].data();
    parallel_for(grp.spec.size, [&](std::size_t i) {
      element::apply_momentum<Prec>(k, w[i], grp.spec.params[i], mom[i], var[i],
                                    element::local_momentum<Prec>(k, mom[i], g[i], factor));
    });
    if (!synchronise) return;
    float* x = grp.work.data();
    float* anchor = grp.anchor.data();
    parallel_for(grp.spec.size,
                 [&](std::size_t i) { x[i] = element::accumulated_update<Prec>(k, w[i], anchor[i], var[i]); });
    allreduce_(x, grp.layout, grp.errors);
    const double lr_sum = grp.lr_sum;
    parallel_for(grp.spec.size, [&](std::size_t i) {
      element::apply_synchronised<Prec>(k, w[i], grp.spec.params[i], mom[i], var[i], anchor[i], C(grp.masked(i, x[i])),
                                        lr_sum);
    });
    grp.lr_sum = 0.0;
  }

  // 1-bit LAMB warm-up: exact LAMB on the mean grads (the per-tensor machinery of mpopt::optimizer<lamb>), keeping
  // the EMA of the trust ratios, and at freeze_step the fresh variance starts from the variance.
  void warmup_lamb(std::int64_t s, C factor) {
    for (group& grp : groups_) {
      const onebit_lamb::args& a = grp.spec.hparams;
      const auto k = lamb::prepare<C>(Rule::exact(a), s);
      lamb_view v;
      v.param = grp.spec.params;
      v.master = grp.master();
      v.grad = grp.step_grads;
      v.n = grp.spec.size;
      v.states[0] = grp.states[0].data();
      v.states[1] = grp.states[1].data();
      host::per_tensor_partials<lamb, Prec>(v, k, grp.segments, 0, factor, grp.segment_partials.data());
      host::trust_ratios<lamb>(k, grp.segments, grp.segment_partials.data(), grp.lamb.size(), grp.tensor_sums.data(),
                               grp.trust_ratio.data());
      for (std::size_t t = 0; t < grp.lamb.size(); ++t)
        onebit_lamb::record_warmup_ratio(a, grp.lamb[t], double(grp.trust_ratio[t]));
      host::per_tensor_apply<lamb, Prec>(v, k, grp.segments, 0, grp.trust_ratio.data());
      if (s == a.freeze_step)
        std::copy(grp.states[1].data(), grp.states[1].data() + grp.spec.size, grp.states[2].data());
    }
  }

  // 1-bit LAMB compressed step (see rule/onebit.hpp).
  void compressed_lamb(C factor) {
    if (groups_[0].lamb.empty() || groups_[0].lamb[0].scaling_coeff == 0.0) equalise_momentum();
    float* fused = fused_.data();
    float* prev = previous_momentum_.data();
    for (group& grp : groups_) {
      const auto k = lamb::prepare<C>(Rule::exact(grp.spec.hparams), step_ + 1);
      const grad_t* g = grp.step_grads;
      for (std::size_t t = 0; t + 1 < grp.offsets.size(); ++t) {
        const C scale = C(grp.lamb[t].scaling_coeff);
        for (std::size_t i = grp.offsets[t]; i < grp.offsets[t + 1]; ++i) {
          const C m_old = load_state(grp, 0, i);
          prev[grp.fused_offset + i] = m_old;
          fused[grp.fused_offset + i] = element::lamb_fused_momentum<Prec>(k, m_old, g[i], factor, scale);
        }
      }
    }
    allreduce_(fused, fused_layout_, fused_errors_);
    for (group& grp : groups_) compressed_lamb_group(grp);
  }

  void compressed_lamb_group(group& grp) {
    const onebit_lamb::args& a = grp.spec.hparams;
    const auto k = lamb::prepare<C>(Rule::exact(a), step_ + 1);
    const float* fused = fused_.data() + grp.fused_offset;
    const float* prev = previous_momentum_.data() + grp.fused_offset;
    for (std::size_t t = 0; t + 1 < grp.offsets.size(); ++t) {
      lamb_tensor_state& ts = grp.lamb[t];
      const C scale = C(ts.scaling_coeff);
      double u0_sq = 0.0, u_sq = 0.0, max_ratio = 0.0;
      for (std::size_t i = grp.offsets[t]; i < grp.offsets[t + 1]; ++i) {
        const element::lamb_terms<C> e =
            element::lamb_moments<Prec>(k, grp.master()[i], grp.states[0][i], grp.states[1][i], grp.states[2][i],
                                        C(grp.masked(i, fused[i] / scale)), C(prev[i]));
        u0_sq += double(e.u0) * double(e.u0);
        u_sq += double(e.u) * double(e.u);
        max_ratio = std::max(max_ratio, double(e.ratio));
      }
      onebit_lamb::record_compressed_factor(a, ts, max_ratio, std::sqrt(u0_sq), std::sqrt(u_sq));
      const C coeff = C(ts.last_coeff);
      for (std::size_t i = grp.offsets[t]; i < grp.offsets[t + 1]; ++i)
        element::lamb_apply<Prec>(k, grp.master()[i], grp.spec.params[i], grp.states[0][i], grp.states[1][i], coeff);
    }
  }

  // Once, at the first compressed step: per tensor, the factor that brings its momentum's RMS to the mean RMS of all
  // tensors, so that the fused buffer's one scale does not crush small layers.
  void equalise_momentum() {
    std::vector<double> rms;
    std::size_t nonempty = 0;
    for (const group& grp : groups_) {
      for (std::size_t t = 0; t + 1 < grp.offsets.size(); ++t) {
        double sq = 0.0;
        for (std::size_t i = grp.offsets[t]; i < grp.offsets[t + 1]; ++i) {
          const double m = double(load_state(grp, 0, i));
          sq += m * m;
        }
        const std::size_t n = grp.offsets[t + 1] - grp.offsets[t];
        rms.push_back(n > 0 ? std::sqrt(sq / double(n)) : 0.0);
        if (n > 0) ++nonempty;
      }
    }
    double united = 0.0;
    for (double r : rms) united += r;  // empty tensors add 0 and are not counted (DeepSpeed drops them)
    united = nonempty > 0 ? united / double(nonempty) : 0.0;
    std::size_t at = 0;
    for (group& grp : groups_)
      for (lamb_tensor_state& ts : grp.lamb) {
        ts.scaling_coeff = onebit_lamb::equaliser(rms[at++], united);
      }
  }

  comm::communicator* comm_;
  int world_ = 1;
  std::vector<group> groups_;
  scaler_args scaler_args_;
  scaler_state_type scaler_state_{};
  step_options step_options_;
  onebit::options options_;
  std::int64_t step_ = 0;
  schedule schedule_;
  host::aligned_buffer<reduce_type> send_, recv_;
  compressed_allreduce allreduce_;
  // 1-bit LAMB: the momentum of every group, fused for one compressed allreduce, and its value before the step.
  compressed_layout fused_layout_;
  error_feedback fused_errors_;
  host::aligned_buffer<float> fused_, previous_momentum_;
};

}  // namespace mpopt::onebit
