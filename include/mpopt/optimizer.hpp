// mpopt::optimizer: rule x precision x scaler on the host backend. One step() does the whole
// mixed-precision step: grad statistics, overflow skip, scale update, unscale + clip, the update,
// and the write-back of the low-precision param copy.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.hpp"
#include "host/aligned_buffer.hpp"
#include "host/executor.hpp"
#include "numeric/convert.hpp"
#include "policy/precision.hpp"
#include "scaler/scalers.hpp"
#include "scaler/unscale_clip.hpp"

namespace mpopt {

// Caller-owned buffers and hyper-parameters of one parameter group. The params are the model's copy
// (written by step()), the grads are read. tensor_sizes splits the flat buffers into per-tensor views;
// empty means one tensor of `size` elements.
template <class Rule, class Prec>
struct param_group {
  typename Prec::param_t* params = nullptr;
  const typename Prec::grad_t* grads = nullptr;
  std::size_t size = 0;
  std::vector<std::size_t> tensor_sizes;
  typename Rule::args hparams{};
};

struct step_options {
  // Clip the global grad L2 norm (after unscaling) to this; <= 0 disables. Honoured in every precision.
  double max_grad_norm = 0.0;
  // DeepSpeed compatibility: unscale with the scale *after* this step's update (DeepSpeed updates the scale
  // first, which halves the gradient on every growth step). Off: unscale with the scale that produced the grads.
  bool deepspeed_scale_order = false;
};

enum class skip_reason : std::uint8_t { none, nonfinite_grads, scale_at_minimum };

inline const char* to_string(skip_reason r) {
  switch (r) {
    case skip_reason::none: return "none";
    case skip_reason::nonfinite_grads: return "non-finite gradients";
    case skip_reason::scale_at_minimum: return "loss scale already at its minimum";
  }
  return "?";
}

struct step_result {
  bool applied = false;
  skip_reason reason = skip_reason::none;
  double grad_norm = 0.0;        // global L2 norm of the unscaled gradients before clipping (inf/NaN on overflow)
  double clip_coef = 1.0;        // factor clipping applied to the unscaled gradients (1: no clipping)
  double loss_scale = 1.0;       // the scale the gradients were produced with
  double next_loss_scale = 1.0;  // the scale to use for the next backward
  scale_event event = scale_event::unchanged;
  std::int64_t step = 0;  // applied steps so far, this one included
  status error;           // not ok only for skip_reason::scale_at_minimum (error_at_min)
};

namespace detail {

inline status with_group_prefix(status s, std::size_t g) {
  if (!s.ok()) s.message = "group " + std::to_string(g) + ": " + s.message;
  return s;
}

inline status validate_step_options(const step_options& o) {
  if (!std::isfinite(o.max_grad_norm))
    return status::invalid("step_options.max_grad_norm must be finite, got " + std::to_string(o.max_grad_norm));
  return status::success();
}

// The checks every backend makes of a group, with the messages the tests pin.
template <class Rule, class Prec>
status validate_group(const param_group<Rule, Prec>& spec, std::size_t g) {
  const std::string where = "group " + std::to_string(g) + ": ";
  if (spec.size > 0 && spec.params == nullptr)
    return status::invalid(where + "params is null but size is " + std::to_string(spec.size));
  if (spec.size > 0 && spec.grads == nullptr)
    return status::invalid(where + "grads is null but size is " + std::to_string(spec.size));
  if (!spec.tensor_sizes.empty()) {
    std::size_t total = 0;
    for (std::size_t s : spec.tensor_sizes) total += s;
    if (total != spec.size)
      return status::invalid(where + "tensor_sizes add up to " + std::to_string(total) + " but size is " +
                             std::to_string(spec.size));
  }
  return with_group_prefix(Rule::validate(spec.hparams), g);
}

}  // namespace detail

template <class Rule, class Prec, class Scaler = no_scaler>
class optimizer {
  static_assert(is_precision<Prec>::value,
                "mpopt::optimizer: the 2nd argument must be an mpopt::precision<param<..>, master<..>, grad<..>, "
                "state<..>>");

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
  using group_type = param_group<Rule, Prec>;

  // Throws mpopt::error naming the group and field when a buffer or hyper-parameter is invalid.
  explicit optimizer(std::vector<group_type> groups, scaler_args scaler = {}, step_options options = {})
      : scaler_args_(scaler), options_(options) {
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(detail::validate_step_options(options_));
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(detail::validate_group(groups[g], g));
    scaler_state_ = Scaler::init(scaler_args_);
    groups_.reserve(groups.size());
    for (auto& spec : groups) groups_.push_back(make_group(std::move(spec)));
  }

  std::size_t num_groups() const noexcept { return groups_.size(); }
  const args_type& hparams(std::size_t g) const { return groups_.at(g).spec.hparams; }
  // Validates before changing anything (e.g. an lr schedule); throws mpopt::error naming the field.
  void set_hparams(std::size_t g, const args_type& a) {
    check_group_index(g);
    throw_if_error(detail::with_group_prefix(Rule::validate(a), g));
    if (Rule::num_states(a) != groups_[g].num_states)
      throw error(status::invalid("group " + std::to_string(g) +
                                  ": changing the number of optimizer states (e.g. amsgrad or momentum on/off) "
                                  "after construction is not supported"));
    groups_[g].spec.hparams = a;
  }

  const step_options& options() const noexcept { return options_; }
  void set_options(const step_options& o) {
    throw_if_error(detail::validate_step_options(o));
    options_ = o;
  }

  std::int64_t step_count() const noexcept { return step_; }
  double loss_scale() const { return double(Scaler::scale(scaler_state_, scaler_args_)); }
  const scaler_state_type& scaler_state() const noexcept { return scaler_state_; }
  void set_scaler_state(const scaler_state_type& s) { scaler_state_ = s; }

  // The master weights of group g (the param buffer itself when the policy has no separate master).
  const master_t* master(std::size_t g) const { return groups_.at(g).master(); }
  const state_t* state(std::size_t g, int j) const {
    check_group_index(g);
    if (j < 0 || j >= groups_[g].num_states)
      throw error(status::invalid("state index " + std::to_string(j) + " out of range for group " + std::to_string(g) +
                                  " (" + std::to_string(groups_[g].num_states) + " states)"));
    return groups_[g].states[std::size_t(j)].data();
  }
  int num_states(std::size_t g) const { return groups_.at(g).num_states; }

  // Sets the master weights of group g from `values` (rounded once to the master type) and rewrites the
  // param copy from them. For callers whose reference weights are wider than the param type.
  template <class T>
  void set_master(std::size_t g, const T* values, std::size_t n) {
    check_group_index(g);
    auto& grp = groups_[g];
    if (n != grp.spec.size)
      throw error(status::invalid("set_master: group " + std::to_string(g) + " has " + std::to_string(grp.spec.size) +
                                  " elements, got " + std::to_string(n)));
    master_t* m = grp.master();
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = convert<master_t>(values[i]);
      if constexpr (Prec::separate_master) grp.spec.params[i] = convert<param_t>(m[i]);
    }
  }

  step_result step() {
    step_result r;
    r.loss_scale = double(Scaler::scale(scaler_state_, scaler_args_));
    const bool check = Scaler::skips_on_overflow(scaler_args_);
    const bool need_stats = check || options_.max_grad_norm > 0;
    host::grad_stats stats;
    if (need_stats) {
      for (auto& grp : groups_) {
        const host::grad_stats s = host::reduce_grad_stats(grp.spec.grads, grp.spec.size);
        stats.sum_sq += s.sum_sq;
        stats.nonfinite = stats.nonfinite || s.nonfinite;
      }
    }
    const bool overflow = check && stats.nonfinite;

    scaler_state_type next = scaler_state_;
    r.event = Scaler::update(next, scaler_args_, overflow);
    if (r.event == scale_event::error_at_min) {
      r.reason = skip_reason::scale_at_minimum;
      r.error = status{errc::scale_at_minimum,
                       "loss scale " + std::to_string(r.loss_scale) +
                           " is already at its minimum and the gradients overflowed again (error_at_min is on)"};
      r.next_loss_scale = r.loss_scale;
      r.grad_norm = std::sqrt(stats.sum_sq) / r.loss_scale;
      r.step = step_;
      return r;  // nothing changed, the scaler state included
    }
    scaler_state_ = next;
    r.next_loss_scale = double(Scaler::scale(scaler_state_, scaler_args_));
    r.step = step_;
    if (overflow) {
      r.reason = skip_reason::nonfinite_grads;
      r.grad_norm = std::sqrt(stats.sum_sq) / r.loss_scale;
      return r;
    }

    const double unscale_by = options_.deepspeed_scale_order ? r.next_loss_scale : r.loss_scale;
    const grad_factor f = need_stats
                              ? combined_grad_factor(stats.sum_sq, float(unscale_by), float(options_.max_grad_norm))
                              : grad_factor{float(1.0 / unscale_by), 0.0f, 1.0f};
    r.grad_norm = need_stats ? std::sqrt(stats.sum_sq) / r.loss_scale : std::nan("");
    r.clip_coef = f.clip_coef;

    ++step_;
    for (auto& grp : groups_) update_group(grp, compute_t(f.factor));
    r.applied = true;
    r.step = step_;
    return r;
  }

 private:
  using view_type = host::group_view<Prec, Rule::max_states>;

  struct group {
    group_type spec;
    std::vector<std::size_t> offsets;            // tensor boundaries, size tensors + 1
    host::aligned_buffer<master_t> master_copy;  // empty when the param buffer is the master
    std::vector<host::aligned_buffer<state_t>> states;
    int num_states = 0;

    master_t* master() {
      if constexpr (Prec::separate_master) {
        return master_copy.data();
      } else {
        return spec.params;
      }
    }
    const master_t* master() const { return const_cast<group*>(this)->master(); }
  };

  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw error(status::invalid("group index " + std::to_string(g) + " out of range (" +
                                  std::to_string(groups_.size()) + " groups)"));
  }

  static group make_group(group_type spec) {
    group grp;
    grp.offsets.push_back(0);
    if (spec.tensor_sizes.empty()) {
      grp.offsets.push_back(spec.size);
    } else {
      for (std::size_t s : spec.tensor_sizes) grp.offsets.push_back(grp.offsets.back() + s);
    }
    grp.num_states = Rule::num_states(spec.hparams);
    if constexpr (Prec::separate_master) {
      grp.master_copy = host::aligned_buffer<master_t>(spec.size);
      for (std::size_t i = 0; i < spec.size; ++i) grp.master_copy[i] = convert<master_t>(spec.params[i]);
    }
    for (int j = 0; j < grp.num_states; ++j) {
      grp.states.emplace_back(spec.size);
      const state_t init = convert<state_t>(compute_t(Rule::initial_state(spec.hparams, j)));
      for (std::size_t i = 0; i < spec.size; ++i) grp.states.back()[i] = init;
    }
    grp.spec = std::move(spec);
    return grp;
  }

  void update_group(group& grp, compute_t factor) {
    view_type v;
    v.param = grp.spec.params;
    v.master = grp.master();
    v.grad = grp.spec.grads;
    v.n = grp.spec.size;
    for (int j = 0; j < grp.num_states; ++j) v.states[j] = grp.states[std::size_t(j)].data();
    const auto k = Rule::template prepare<compute_t>(grp.spec.hparams, step_);
    if constexpr (Rule::per_tensor) {
      host::update_per_tensor<Rule, Prec>(v, k, grp.offsets, factor);
    } else {
      host::update_elementwise<Rule, Prec>(v, k, grp.num_states, factor);
    }
  }

  std::vector<group> groups_;
  scaler_args scaler_args_;
  scaler_state_type scaler_state_{};
  step_options options_;
  std::int64_t step_ = 0;
};

}  // namespace mpopt
