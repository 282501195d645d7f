// mpopt::optimizer: rule x precision x scaler on the host backend, optionally sharded with ZeRO. One step() does
// the whole mixed-precision step: grad reduction across ranks, grad statistics, overflow skip, scale update,
// unscale + clip, the update, the write-back of the low-precision param copy and the param all-gather.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "error.hpp"
#include "host/aligned_buffer.hpp"
#include "host/executor.hpp"
#include "numeric/accumulate.hpp"
#include "numeric/convert.hpp"
#include "numeric/traits.hpp"
#include "policy/precision.hpp"
#include "scaler/scalers.hpp"
#include "scaler/unscale_clip.hpp"
#include "zero/live_gathers.hpp"
#include "zero/partition.hpp"

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
  // Key of the stochastic rounding of a master<T, stochastic_rounding> (policy/rounding.hpp). With the step count it
  // is the whole random state: a resumed run continues the same random sequence.
  std::uint64_t rounding_seed = 0x6d706f7074ull;
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
status validate_group(const param_group<Rule, Prec>& spec, std::size_t g, bool grads_required = true) {
  const std::string where = "group " + std::to_string(g) + ": ";
  if (spec.size > 0 && spec.params == nullptr)
    return status::invalid(where + "params is null but size is " + std::to_string(spec.size));
  if (grads_required && spec.size > 0 && spec.grads == nullptr)
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

// ZeRO: how the optimizer shards its work across the ranks of a communicator (comm/communicator.hpp).
//   stage 0  every rank holds everything; step() all-reduces the grads (mean) and every rank updates all of it.
//   stage 1  master weights and states are sharded (zero/partition.hpp); step() reduce-scatters the caller's full
//            grads, each rank updates its shard, and the updated params are all-gathered into every rank's params.
//   stage 2  as 1, and grads are sharded: reduce_grads() reduce-scatters (and accumulates) a range of tensors as
//            soon as its grads exist, after which the caller may drop them; step() reduces param_group::grads only
//            when reduce_grads() was not called since the last step.
//   stage 3  as 2, and params are sharded: the optimizer keeps each rank's shard; gather() materialises the full
//            params of a range of tensors (forward, backward) and release() frees them, with at most
//            max_live_elements gathered at once. param_group::params only supplies the initial values.
// In every stage the grad statistics (norm, non-finite flag) are global, so all ranks clip and skip alike. Grads
// are averaged over ranks. The reduction travels in fp32 for 16-bit grads and fp64 for fp32 and fp64 grads, so the
// mean of W equal 16-bit or fp32 grads is the grad itself, the norm's block partials are added in one order
// everywhere (zero/partition.hpp), and a sharded run reproduces the single-rank one bit for bit (fp64 grads: to an
// ulp of the mean where W is not a power of two).
struct zero_options {
  int stage = 0;
  // Largest piece reduced or gathered in one collective; bounds the reduction workspace (2 buffers this long).
  // 1 M: OpenMPI's shared-memory reduce-scatter slows down sharply past a few MB (on the CI machine, 4 M doubles
  // took 164 ms in one call and 22 ms in four; bench/RESULTS.md).
  std::size_t bucket_elements = std::size_t(1) << 20;
  // Stage 3: bound on the param elements gathered and not yet released (DeepSpeed's stage3_max_live_parameters).
  std::size_t max_live_elements = 1000000000;
};

// Bytes this rank holds, by role (ZeRO paper, section 3: (2 + 2 + K)·Ψ for fp16 params and grads, with K = 12 for
// an fp32 master and two fp32 Adam states, divided by W for what a stage shards).
struct memory_report {
  std::size_t params = 0;     // the model's param copy: the caller's buffer (stages 0-2) or the shard (stage 3)
  std::size_t grads = 0;      // grads kept until step(): the caller's full buffer (0-1) or the reduced shard (2-3)
  std::size_t master = 0;     // master weights (0 when the param buffer is the master), Kahan compensation included
  std::size_t states = 0;     // optimizer states
  std::size_t workspace = 0;  // reduction buffers and stage 1's reduced shard; stage 3's gathered params
  std::size_t total() const noexcept { return params + grads + master + states + workspace; }
};

namespace detail {

inline status validate_zero_options(const zero_options& z) {
  if (z.stage < 0 || z.stage > 3)
    return status::invalid("zero_options.stage must be 0, 1, 2 or 3, got " + std::to_string(z.stage));
  if (z.bucket_elements == 0) return status::invalid("zero_options.bucket_elements must be > 0, got 0");
  return status::success();
}

// gather() and prefetch() of the host and CUDA optimizers: only stage 3 shards the params.
inline void check_stage3(const zero_options& z, const char* what) {
  if (z.stage != 3)
    throw error(status::invalid(std::string(what) +
                                ": params are sharded only at ZeRO stage 3, this optimizer is at stage " +
                                std::to_string(z.stage)));
}

// memory(): one group's bytes by role, from the group records of the host and CUDA optimizers (the same members).
template <class Prec, class Group>
void add_group_memory(memory_report& m, const Group& grp, int stage) {
  m.params += (stage == 3 ? grp.part.shard : grp.spec.size) * sizeof(typename Prec::param_t);
  if (stage >= 2) {
    m.grads += grp.reduced.size() * sizeof(typename Prec::grad_t);
  } else {
    m.grads += grp.spec.size * sizeof(typename Prec::grad_t);
    m.workspace += grp.reduced.size() * sizeof(typename Prec::grad_t);
  }
  m.master += (grp.master_copy.size() + grp.compensation.size()) * sizeof(typename Prec::master_t);
  m.states += std::size_t(grp.num_states) * grp.held * sizeof(typename Prec::state_t);
}

// The part of step() every backend shares, between the grad statistics and the update: overflow and skip, the
// scaler's state machine, and the combined unscale + clip factor. Advances `state` unless error_at_min fires.
struct step_plan {
  step_result result;
  grad_factor factor{};
};

template <class Scaler>
step_plan plan_step(typename Scaler::state_type& state, const typename Scaler::args& sargs, const step_options& opt,
                    bool need_stats, double sum_sq, bool nonfinite, std::int64_t step) {
  step_plan p;
  step_result& r = p.result;
  r.loss_scale = double(Scaler::scale(state, sargs));
  r.step = step;
  const bool overflow = Scaler::skips_on_overflow(sargs) && nonfinite;
  typename Scaler::state_type next = state;
  r.event = Scaler::update(next, sargs, overflow);
  if (r.event == scale_event::error_at_min) {
    r.reason = skip_reason::scale_at_minimum;
    r.error = status{errc::scale_at_minimum,
                     "loss scale " + std::to_string(r.loss_scale) +
                         " is already at its minimum and the gradients overflowed again (error_at_min is on)"};
    r.next_loss_scale = r.loss_scale;
    r.grad_norm = std::sqrt(sum_sq) / r.loss_scale;
    return p;  // nothing changed, the scaler state included
  }
  state = next;
  r.next_loss_scale = double(Scaler::scale(state, sargs));
  if (overflow) {
    r.reason = skip_reason::nonfinite_grads;
    r.grad_norm = std::sqrt(sum_sq) / r.loss_scale;
    return p;
  }
  const double unscale_by = opt.deepspeed_scale_order ? r.next_loss_scale : r.loss_scale;
  p.factor = need_stats ? combined_grad_factor(sum_sq, float(unscale_by), float(opt.max_grad_norm))
                        : grad_factor{float(1.0 / unscale_by), 0.0f, 1.0f};
  r.grad_norm = need_stats ? std::sqrt(sum_sq) / r.loss_scale : std::nan("");
  r.clip_coef = p.factor.clip_coef;
  r.applied = true;
  r.step = step + 1;
  return p;
}

// Every rank must construct the same groups the same way (tag: e.g. the ZeRO stage); a mismatch would hang or
// corrupt the collectives. A layout's FNV-1a hash as 4 doubles: both 32-bit halves and their negations, so that after
// an all-reduce (max) they agree iff every rank has the same hash.
class layout_hash {
 public:
  void mix(std::uint64_t x) {
    for (int b = 0; b < 8; ++b) h_ = (h_ ^ ((x >> (8 * b)) & 0xff)) * 1099511628211ull;
  }
  void words(double (&v)[4]) const {
    v[0] = double(h_ >> 32);
    v[1] = double(h_ & 0xffffffffu);
    v[2] = -v[0];
    v[3] = -v[1];
  }

 private:
  std::uint64_t h_ = 1469598103934665603ull;
};

template <class Rule, class Prec>
void layout_words(int tag, const std::vector<param_group<Rule, Prec>>& groups, double (&v)[4]) {
  layout_hash h;
  h.mix(std::uint64_t(tag));
  h.mix(groups.size());
  for (const auto& spec : groups) {
    h.mix(spec.size);
    h.mix(spec.tensor_sizes.size());
    for (std::size_t s : spec.tensor_sizes) h.mix(s);
    h.mix(std::uint64_t(Rule::num_states(spec.hparams)));
  }
  h.words(v);
}

// Throws on every rank when the all-reduced layout words disagree; `what` names the layout.
inline void check_layout_words(const double (&v)[4],
                               const char* what =
                                   "the group layout (number of groups, sizes, tensor_sizes, optimizer "
                                   "states or zero_options.stage)") {
  if (v[0] != -v[2] || v[1] != -v[3])
    throw error(status::invalid(std::string("ranks disagree on ") + what + "; every rank must construct the same"));
}

// Collective over a host communicator; throws on every rank when the layouts differ.
template <class Rule, class Prec>
void check_same_layout(comm::communicator& comm, int tag, const std::vector<param_group<Rule, Prec>>& groups) {
  if (comm.size() == 1) return;
  double v[4];
  layout_words(tag, groups, v);
  comm.all_reduce(v, 4, comm::reduce_op::max);
  check_layout_words(v);
}

// A group's tensor boundaries, tensors + 1 offsets (no tensor_sizes: one tensor of the whole group).
template <class Group>
std::vector<std::size_t> tensor_offsets(const Group& spec) {
  std::vector<std::size_t> offsets{0};
  if (spec.tensor_sizes.empty()) {
    offsets.push_back(spec.size);
  } else {
    for (std::size_t n : spec.tensor_sizes) offsets.push_back(offsets.back() + n);
  }
  return offsets;
}

// Tensors [first, last) of group g (boundaries `offsets`) as an element range; `what` names the caller in the error.
inline zero::range tensor_range(const std::vector<std::size_t>& offsets, std::size_t g, std::size_t first,
                                std::size_t last, const char* what) {
  const std::size_t tensors = offsets.size() - 1;
  if (first > last || last > tensors)
    throw error(status::invalid(std::string(what) + ": tensors [" + std::to_string(first) + ", " +
                                std::to_string(last) + ") out of range for group " + std::to_string(g) + " (" +
                                std::to_string(tensors) + " tensors)"));
  return {offsets[first], offsets[last]};
}

// The type grads travel in when reduced across ranks: wide enough that W equal grads sum exactly.
template <class G>
using reduce_t = std::conditional_t<is_16bit_v<G>, float, double>;

}  // namespace detail

// The host optimizer: rule x precision x scaler, optionally sharded with ZeRO over a host-memory communicator.
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

  // One rank, no sharding. Throws mpopt::error naming the group and field when a buffer or hyper-parameter is
  // invalid.
  explicit optimizer(std::vector<group_type> groups, scaler_args scaler = {}, step_options options = {})
      : optimizer(std::move(groups), own_single_rank(), zero_options{}, scaler, options) {}

  // ZeRO over `comm` (host memory; it must outlive the optimizer). Collective: every rank constructs with the same
  // group layout (checked: a mismatch throws on every rank) and its own buffers.
  optimizer(std::vector<group_type> groups, comm::communicator& comm, zero_options zero, scaler_args scaler = {},
            step_options options = {})
      : comm_(&comm), zero_(zero), scaler_args_(scaler), options_(options) {
    if (comm.memory() != comm::memory_space::host)
      throw error(status::invalid("the host optimizer needs a host-memory communicator (mpi or single-rank), got " +
                                  comm.name()));
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(detail::validate_step_options(options_));
    throw_if_error(detail::validate_zero_options(zero_));
    for (std::size_t g = 0; g < groups.size(); ++g)
      throw_if_error(detail::validate_group(groups[g], g, /*grads_required=*/zero_.stage < 2));
    rank_ = comm.rank();
    world_ = comm.size();
    detail::check_same_layout(*comm_, zero_.stage, groups);
    scaler_state_ = Scaler::init(scaler_args_);
    groups_.reserve(groups.size());
    std::size_t largest = 0;
    for (auto& spec : groups) {
      largest = std::max(largest, spec.size);
      groups_.push_back(make_group(std::move(spec)));
    }
    step_grads_.resize(groups_.size());
    counts_.reserve(std::size_t(world_));
    if (world_ > 1 || zero_.stage >= 2) {
      const std::size_t n = std::min(largest, zero_.bucket_elements);
      send_ = host::aligned_buffer<reduce_type>(n);
      recv_ = host::aligned_buffer<reduce_type>(n);
    }
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
  const zero_options& zero() const noexcept { return zero_; }
  comm::communicator& communicator() const noexcept { return *comm_; }

  std::int64_t step_count() const noexcept { return step_; }
  double loss_scale() const { return double(Scaler::scale(scaler_state_, scaler_args_)); }
  const scaler_state_type& scaler_state() const noexcept { return scaler_state_; }
  void set_scaler_state(const scaler_state_type& s) { scaler_state_ = s; }

  // The elements of group g this rank updates and whose master and states it holds: the whole group at stage 0,
  // the rank's shard otherwise. master(g) and state(g, j) point at element local_range(g).begin.
  zero::range local_range(std::size_t g) const { return groups_.at(g).local; }
  const zero::partition& layout(std::size_t g) const { return groups_.at(g).part; }
  const master_t* master(std::size_t g) const { return groups_.at(g).master(); }
  const state_t* state(std::size_t g, int j) const {
    check_state_index(g, j);
    return groups_[g].states[std::size_t(j)].data();
  }
  int num_states(std::size_t g) const { return groups_.at(g).num_states; }
  // kahan_summation: the local compensation of group g (what rounding dropped, per element); null otherwise.
  const master_t* compensation(std::size_t g) const {
    const group& grp = groups_.at(g);
    return grp.compensation.size() > 0 ? grp.compensation.data() : nullptr;
  }

  // Full copies of group g's master weights, state j and params in `out` (group size elements). Collective.
  void gather_master(std::size_t g, master_t* out) { gather_full(g, master(g), out); }
  void gather_state(std::size_t g, int j, state_t* out) { gather_full(g, state(g, j), out); }
  void gather_params(std::size_t g, param_t* out) {
    check_group_index(g);
    group& grp = groups_[g];
    if (zero_.stage < 3) {
      std::copy(grp.spec.params, grp.spec.params + grp.spec.size, out);
    } else {
      gather_full(g, grp.param_shard.data(), out);
    }
  }

  // Sets the master weights of group g from `values` (all group elements, the same on every rank; rounded once to
  // the master type) and rewrites the param copy from them. For callers whose reference weights are wider than the
  // param type.
  template <class T>
  void set_master(std::size_t g, const T* values, std::size_t n) {
    check_group_index(g);
    group& grp = groups_[g];
    if (n != grp.spec.size)
      throw error(status::invalid("set_master: group " + std::to_string(g) + " has " + std::to_string(grp.spec.size) +
                                  " elements, got " + std::to_string(n)));
    master_t* m = grp.master();
    param_t* p = grp.local_params();
    for (std::size_t i = grp.local.begin; i < grp.local.end; ++i) {
      const master_t v = convert<master_t>(values[i]);
      m[i - grp.local.begin] = v;
      if constexpr (Prec::separate_master) p[i - grp.local.begin] = convert<param_t>(v);
    }
    if (zero_.stage < 3) {  // the rest of the caller's param copy, which other ranks own
      for (std::size_t i = 0; i < n; ++i)
        if (i < grp.local.begin || i >= grp.local.end)
          grp.spec.params[i] = convert<param_t>(convert<master_t>(values[i]));
    }
  }

  // Checkpoint restore (checkpoint/checkpoint.hpp). `values` holds local_range(g) (n = its size), as master(g) and
  // state(g, j) do. set_local_master also rewrites the param copy: the local range, then at stages 1-2 the other
  // ranks' ranges by all-gather, so it is collective there (every rank calls it for the same g).
  void set_local_master(std::size_t g, const master_t* values, std::size_t n) {
    check_local_size(g, n, "set_local_master");
    group& grp = groups_[g];
    master_t* m = grp.master();
    param_t* p = grp.local_params();
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = values[i];
      if constexpr (Prec::separate_master) p[i] = convert<param_t>(values[i]);
    }
    publish_params(grp);
  }
  void set_state(std::size_t g, int j, const state_t* values, std::size_t n) {
    check_state_index(g, j);
    check_local_size(g, n, "set_state");
    std::copy(values, values + n, groups_[g].states[std::size_t(j)].data());
  }
  // kahan_summation: group g's compensation over local_range(g), as compensation(g) holds it. Not collective.
  void set_local_compensation(std::size_t g, const master_t* values, std::size_t n) {
    check_local_size(g, n, "set_local_compensation");
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>) {
      std::copy(values, values + n, groups_[g].compensation.data());
    } else {
      throw error(status::invalid(
          "set_local_compensation: only a master<T, kahan_summation> keeps a compensation buffer, this optimizer's "
          "master rounds by another rule"));
    }
  }
  // Group g's tensor sizes as constructed (empty: one tensor), and the scaler's arguments: saved as metadata.
  const std::vector<std::size_t>& tensor_sizes(std::size_t g) const { return groups_.at(g).spec.tensor_sizes; }
  const scaler_args& scaler_arguments() const noexcept { return scaler_args_; }
  void set_step_count(std::int64_t step) {
    if (step < 0) throw error(status::invalid("set_step_count: step must be >= 0, got " + std::to_string(step)));
    step_ = step;
  }

 private:
  void check_local_size(std::size_t g, std::size_t n, const char* what) const {
    check_group_index(g);
    if (n != groups_[g].local.size())
      throw error(status::invalid(std::string(what) + ": group " + std::to_string(g) + " has " +
                                  std::to_string(groups_[g].local.size()) +
                                  " local elements on this rank, got n = " + std::to_string(n)));
  }

 public:
  // Stages 2 and 3: reduces (mean over ranks) the grads of tensors [first, last) of group g, `grads` holding their
  // elements contiguously, and adds them to this rank's shard of the group's grads. Collective; afterwards the
  // caller may reuse `grads`. step() consumes what was reduced. G may differ from grad_t: micro-batch grads in the
  // model's dtype accumulate in the grad role's dtype (grad_accumulation.hpp).
  template <class G>
  void reduce_grads(std::size_t g, std::size_t first, std::size_t last, const G* grads) {
    static_assert(is_element_type_v<G>,
                  "mpopt::optimizer::reduce_grads: grads must point to float, double, half_t or bf16_t");
    if (zero_.stage < 2)
      throw error(status::invalid("reduce_grads: ZeRO stage " + std::to_string(zero_.stage) +
                                  " reduces param_group::grads in step(); reduce_grads is for stages 2 and 3"));
    const zero::range r = tensor_range(g, first, last, "reduce_grads");
    if (!r.empty() && grads == nullptr) throw error(status::invalid("reduce_grads: grads is null"));
    group& grp = groups_[g];
    reduce_range(grp, r, grads, /*accumulate=*/true);
    grp.has_reduced = true;
  }

  // Stage 3: the full params of tensors [first, last) of group g, contiguous; valid until the matching release().
  // Collective. Gathering a range already gathered (or prefetched) returns the same buffer and counts one more use.
  const param_t* gather(std::size_t g, std::size_t first, std::size_t last) {
    detail::check_stage3(zero_, "gather");
    const zero::range r = tensor_range(g, first, last, "gather");
    return live_.acquire(g, first, last, r.size(), zero_.max_live_elements, [&] { return gather_range(groups_[g], r); })
        .data();
  }

  // Stage 3: gathers tensors [first, last) of group g ahead of their gather() (DeepSpeed's prefetch), holding them
  // with no use until then; returns false and does nothing when they are already gathered or do not fit under
  // max_live_elements beside what is (the same answer on every rank). Collective. The host communicators' collectives
  // block, so the all-gather runs here (cuda::optimizer's overlaps later work); a release() frees the range even if
  // gather() never used it.
  bool prefetch(std::size_t g, std::size_t first, std::size_t last) {
    detail::check_stage3(zero_, "prefetch");
    const zero::range r = tensor_range(g, first, last, "prefetch");
    return live_.prefetch(g, first, last, r.size(), zero_.max_live_elements,
                          [&] { return gather_range(groups_[g], r); });
  }

  // One use of a gathered range fewer; its memory goes with the last.
  void release(std::size_t g, std::size_t first, std::size_t last) { live_.release(g, first, last); }
  std::size_t live_elements() const noexcept { return live_.elements(); }

  memory_report memory() const {
    memory_report m;
    for (const group& grp : groups_) detail::add_group_memory<Prec>(m, grp, zero_.stage);
    m.workspace += (send_.size() + recv_.size()) * sizeof(reduce_type) + live_.elements() * sizeof(param_t);
    return m;
  }

  step_result step() {
    const bool need_stats = Scaler::skips_on_overflow(scaler_args_) || options_.max_grad_norm > 0;
    std::vector<const grad_t*>& grads = step_grads_;  // sized at construction: a step allocates nothing
    for (std::size_t g = 0; g < groups_.size(); ++g) grads[g] = reduced_grads(g);

    double sum_sq = 0.0;
    bool nonfinite = false;
    if (need_stats) {
      for (std::size_t g = 0; g < groups_.size(); ++g) {
        const double s = group_sum_sq(groups_[g], grads[g]);
        sum_sq += s;
        nonfinite = nonfinite || !std::isfinite(s);
      }
    }
    const step_result r = plan_and_apply(need_stats, sum_sq, nonfinite, [&](compute_t factor) {
      for (std::size_t g = 0; g < groups_.size(); ++g) update_group(groups_[g], grads[g], factor);
      for (group& grp : groups_) publish_params(grp);
    });
    for (group& grp : groups_) consume_grads(grp);  // applied or skipped, this step's grads are spent
    return r;
  }

  // step() in pieces, for a caller that moves grads in and params out while the step runs (CPU offload,
  // cuda/offload.cuh); the same result and bits as step(). Each group is taken in pieces of piece_elements (a
  // multiple of host::reduce_block, so the norm's blocks are step()'s); rules with per-tensor ratios (LAMB) update a
  // group whole. For every piece [begin, end) of group g:
  //   grads_ready(g, begin, end)   once, before the step reads those grads: wait for them to arrive;
  //   params_ready(g, begin, end)  once, after those params hold their final values; only when the step applies.
  // With grad statistics (overflow check or clipping) every grad is read before any update; without, the pieces
  // stream: piece k is updated and handed back while piece k + 1 arrives. One rank, ZeRO stage 0.
  template <class GradsReady, class ParamsReady>
  step_result step_pipelined(std::size_t piece_elements, GradsReady&& grads_ready, ParamsReady&& params_ready) {
    if (world_ != 1 || zero_.stage != 0)
      throw error(status::invalid("step_pipelined: one rank at ZeRO stage 0 only, this optimizer has " +
                                  std::to_string(world_) + " ranks at stage " + std::to_string(zero_.stage)));
    if (piece_elements == 0 || piece_elements % host::reduce_block != 0)
      throw error(status::invalid("step_pipelined: piece_elements must be a positive multiple of " +
                                  std::to_string(host::reduce_block) + ", got " + std::to_string(piece_elements)));
    for (std::size_t g = 0; g < groups_.size(); ++g)
      if (groups_[g].spec.grads == nullptr && groups_[g].spec.size > 0)
        throw error(status::invalid("step_pipelined: group " + std::to_string(g) + " has no grads"));
    auto for_each_piece = [&](std::size_t g, auto&& f) {
      const std::size_t n = groups_[g].spec.size;
      for (std::size_t b = 0; b < n; b += piece_elements) f(zero::range{b, std::min(n, b + piece_elements)});
    };
    const bool need_stats = Scaler::skips_on_overflow(scaler_args_) || options_.max_grad_norm > 0;
    double sum_sq = 0.0;
    bool nonfinite = false;
    if (need_stats) {
      for (std::size_t g = 0; g < groups_.size(); ++g) {
        group& grp = groups_[g];
        for_each_piece(g, [&](zero::range r) {
          grads_ready(g, r.begin, r.end);
          host::reduce_grad_partials(grp.spec.grads + r.begin, r.size(),
                                     grp.stat_partials.data() + r.begin / host::reduce_block);
        });
        const double s = host::sum_in_order(grp.stat_partials.data(), grp.stat_partials.size());
        sum_sq += s;
        nonfinite = nonfinite || !std::isfinite(s);
      }
    }
    return plan_and_apply(need_stats, sum_sq, nonfinite, [&](compute_t factor) {
      for (std::size_t g = 0; g < groups_.size(); ++g) {
        group& grp = groups_[g];
        if constexpr (Rule::per_tensor) {
          if (!need_stats) for_each_piece(g, [&](zero::range r) { grads_ready(g, r.begin, r.end); });
          update_group(grp, grp.spec.grads, factor);
          for_each_piece(g, [&](zero::range r) { params_ready(g, r.begin, r.end); });
        } else {
          for_each_piece(g, [&](zero::range r) {
            if (!need_stats) grads_ready(g, r.begin, r.end);
            update_group(grp, grp.spec.grads, factor, r);
            params_ready(g, r.begin, r.end);
          });
        }
      }
    });
  }

 private:
  using view_type = host::group_view<Prec, Rule::max_states>;
  using reduce_type = detail::reduce_t<grad_t>;

  struct group {
    group_type spec;
    std::vector<std::size_t> offsets;  // tensor boundaries, size tensors + 1
    zero::partition part;
    zero::range local;                            // the elements this rank updates
    std::size_t held = 0;                         // elements of master and states held (the shard, padding included)
    host::aligned_buffer<master_t> master_copy;   // empty when the param buffer is the master
    host::aligned_buffer<master_t> compensation;  // kahan_summation: what rounding dropped, per held element
    host::aligned_buffer<param_t> param_shard;    // stage 3: this rank's params
    host::aligned_buffer<grad_t> reduced;         // the reduced grads of `local` (none at world size 1, stages 0-1)
    bool has_reduced = false;                     // stages 2-3: `reduced` holds grads no step has consumed
    std::vector<host::aligned_buffer<state_t>> states;
    int num_states = 0;
    zero::partition reduce_part;              // how grads are reduce-scattered (stage 0: over all ranks)
    std::vector<zero::segment> all_segments;  // per-tensor rules: the group's grid segments
    std::vector<zero::segment> my_segments;   // this rank's run of all_segments (first_segment onwards)
    std::size_t first_segment = 0;
    std::vector<std::size_t> block_counts;  // per rank: grad-statistics blocks it owns
    // Step workspace, sized at construction so that a step allocates nothing.
    std::vector<double> stat_partials;                // one per statistics block of the group
    std::vector<double> segment_partials;             // 2 per segment: |w|^2, |u|^2
    std::vector<std::size_t> segment_partial_counts;  // per rank: 2 per segment it owns
    std::vector<double> tensor_sums;                  // 2 per tensor
    std::vector<compute_t> trust_ratio;               // 1 per tensor

    param_t* local_params() { return param_shard.size() > 0 ? param_shard.data() : spec.params + local.begin; }
    master_t* master() {
      if constexpr (Prec::separate_master) {
        return master_copy.data();
      } else {
        return local_params();
      }
    }
    const master_t* master() const { return const_cast<group*>(this)->master(); }
  };

  static comm::communicator& own_single_rank() {
    static comm::single_rank one;  // stateless apart from its traffic counters, which stay zero
    return one;
  }

  bool sharded() const noexcept { return zero_.stage >= 1 && world_ > 1; }

  // The scaler's decision on this step's grad statistics; when it applies the step, the step counter advances and
  // apply(factor) runs the update with the combined unscale + clip factor.
  template <class Apply>
  step_result plan_and_apply(bool need_stats, double sum_sq, bool nonfinite, Apply&& apply) {
    const detail::step_plan plan =
        detail::plan_step<Scaler>(scaler_state_, scaler_args_, options_, need_stats, sum_sq, nonfinite, step_);
    if (plan.result.applied) {
      ++step_;
      apply(compute_t(plan.factor.factor));
    }
    return plan.result;
  }

  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw error(status::invalid("group index " + std::to_string(g) + " out of range (" +
                                  std::to_string(groups_.size()) + " groups)"));
  }
  void check_state_index(std::size_t g, int j) const {
    check_group_index(g);
    if (j < 0 || j >= groups_[g].num_states)
      throw error(status::invalid("state index " + std::to_string(j) + " out of range for group " + std::to_string(g) +
                                  " (" + std::to_string(groups_[g].num_states) + " states)"));
  }

  zero::range tensor_range(std::size_t g, std::size_t first, std::size_t last, const char* what) const {
    check_group_index(g);
    return detail::tensor_range(groups_[g].offsets, g, first, last, what);
  }

  group make_group(group_type spec) {
    group grp;
    grp.offsets = detail::tensor_offsets(spec);
    grp.part = zero::make_partition(spec.size, zero_.stage == 0 ? 1 : world_);
    grp.local = zero_.stage == 0 ? zero::range{0, spec.size} : grp.part.owned(rank_);
    grp.held = zero_.stage == 0 ? spec.size : grp.part.shard;
    grp.num_states = Rule::num_states(spec.hparams);
    if (zero_.stage == 3) {
      grp.param_shard = host::aligned_buffer<param_t>(grp.held);
      std::copy(spec.params + grp.local.begin, spec.params + grp.local.end, grp.param_shard.data());
    }
    if (world_ > 1 || zero_.stage >= 2) grp.reduced = host::aligned_buffer<grad_t>(grp.held);
    if constexpr (Prec::separate_master) {
      grp.master_copy = host::aligned_buffer<master_t>(grp.held);
      for (std::size_t i = grp.local.begin; i < grp.local.end; ++i)
        grp.master_copy[i - grp.local.begin] = convert<master_t>(spec.params[i]);
    }
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>) {
      grp.compensation = host::aligned_buffer<master_t>(grp.held);
      std::fill(grp.compensation.data(), grp.compensation.data() + grp.held, master_t{});
    }
    for (int j = 0; j < grp.num_states; ++j) {
      grp.states.emplace_back(grp.held);
      const state_t init = convert<state_t>(compute_t(Rule::initial_state(spec.hparams, j)));
      for (std::size_t i = 0; i < grp.local.size(); ++i) grp.states.back()[i] = init;
    }
    const int ranks = zero_.stage == 0 ? 1 : world_;
    for (int q = 0; q < ranks; ++q) {
      const zero::range o = grp.part.owned(q);
      grp.block_counts.push_back((o.size() + host::reduce_block - 1) / host::reduce_block);
      if constexpr (Rule::per_tensor)
        grp.segment_partial_counts.push_back(2 * zero::grid_segments(o, grp.offsets, host::reduce_block).size());
    }
    grp.reduce_part = zero::make_partition(spec.size, world_);
    std::size_t blocks = 0;
    for (std::size_t c : grp.block_counts) blocks += c;
    grp.stat_partials.resize(blocks);
    if constexpr (Rule::per_tensor) {
      grp.all_segments = zero::grid_segments(zero::range{0, spec.size}, grp.offsets, host::reduce_block);
      for (int q = 0; q < rank_ && sharded(); ++q) grp.first_segment += grp.segment_partial_counts[std::size_t(q)] / 2;
      const std::size_t mine = sharded() ? grp.segment_partial_counts[std::size_t(rank_)] / 2 : grp.all_segments.size();
      grp.my_segments.assign(grp.all_segments.begin() + std::ptrdiff_t(grp.first_segment),
                             grp.all_segments.begin() + std::ptrdiff_t(grp.first_segment + mine));
      grp.segment_partials.resize(2 * grp.all_segments.size());
      grp.tensor_sums.resize(2 * (grp.offsets.size() - 1));
      grp.trust_ratio.resize(grp.offsets.size() - 1);
    }
    if (zero_.stage == 3) spec.params = nullptr;  // only the initial values: the shard is the params from now on
    grp.spec = std::move(spec);
    return grp;
  }

  // Pieces of at most bucket_elements.
  template <class F>
  void for_each_bucket(zero::range r, F&& f) const {
    for (std::size_t b = r.begin; b < r.end; b += zero_.bucket_elements)
      f(zero::range{b, std::min(r.end, b + zero_.bucket_elements)});
  }

  // Reduces grads g[0, r.size()) (group elements r) over the ranks: each rank receives the mean of the elements of
  // `local` and stores it in `reduced` (or adds it). Stage 0 then all-gathers the rounded means, so every replica
  // holds the same bits (an all-reduce need not give every rank the same rounding).
  template <class G>
  void reduce_range(group& grp, zero::range r, const G* g, bool accumulate) {
    const zero::partition& part = grp.reduce_part;
    for_each_bucket(r, [&](zero::range piece) {
      for (std::size_t i = piece.begin; i < piece.end; ++i)
        send_[i - piece.begin] = convert<reduce_type>(g[i - r.begin]);
      part.counts(piece, counts_);
      comm_->reduce_scatter(send_.data(), recv_.data(), counts_, comm::reduce_op::sum);
      const zero::range mine = zero::intersect(piece, part.owned(rank_));
      grad_t* out = grp.reduced.data();  // element i of the group is out[i - local.begin]
      const reduce_type world = reduce_type(world_);
      for (std::size_t i = mine.begin; i < mine.end; ++i) {
        grad_t& o = out[i - grp.local.begin];
        o = store_mean(o, recv_[i - mine.begin], world, accumulate);
      }
      if (zero_.stage == 0) comm_->all_gather(out + piece.begin, counts_);  // local.begin is 0; the same counts
    });
  }

  // The grads step() reads for group g's local range: the caller's own when nothing needs reducing.
  const grad_t* reduced_grads(std::size_t g) {
    group& grp = groups_[g];
    if (zero_.stage >= 2) {
      if (!grp.has_reduced) {
        if (grp.spec.grads == nullptr && grp.spec.size > 0)
          throw error(status::invalid("step: group " + std::to_string(g) +
                                      " has no grads: call reduce_grads() or set param_group::grads"));
        if (world_ == 1) return grp.spec.grads;
        reduce_range(grp, zero::range{0, grp.spec.size}, grp.spec.grads, false);
        grp.has_reduced = true;  // consumed (zeroed) after the step, so a later reduce_grads() starts from zero
      }
      return grp.reduced.data();
    }
    if (world_ == 1) return grp.spec.grads;
    reduce_range(grp, zero::range{0, grp.spec.size}, grp.spec.grads, false);
    return grp.reduced.data();
  }

  void consume_grads(group& grp) {
    if (zero_.stage >= 2 && grp.has_reduced) std::fill(grp.reduced.data(), grp.reduced.data() + grp.held, grad_t{});
    grp.has_reduced = false;
  }

  // The group's sum of squares, the same bits on every rank and world size: per-block partials, all-gathered when
  // sharded, added in block order.
  double group_sum_sq(group& grp, const grad_t* g) {
    std::vector<double>& partial = grp.stat_partials;
    std::size_t offset = 0;
    for (int q = 0; q < rank_ && sharded(); ++q) offset += grp.block_counts[std::size_t(q)];
    host::reduce_grad_partials(g, grp.local.size(), partial.data() + offset);
    if (sharded()) comm_->all_gather(partial.data(), grp.block_counts);
    return host::sum_in_order(partial.data(), partial.size());
  }

  // Updates local elements r of the group (all of them by default; elementwise rules only for a part), g holding
  // the grads of the whole local range.
  void update_group(group& grp, const grad_t* g, compute_t factor, zero::range r = {0, ~std::size_t(0)}) {
    r.end = std::min(r.end, grp.local.size());
    view_type v;
    v.param = grp.local_params() + r.begin;
    v.master = grp.master() + r.begin;
    v.grad = g + r.begin;
    v.n = r.size();
    for (int j = 0; j < grp.num_states; ++j) v.states[j] = grp.states[std::size_t(j)].data() + r.begin;
    v.rounding = make_master_store_ctx(group_rounding_key(options_.rounding_seed, std::uint64_t(&grp - groups_.data())),
                                       std::uint64_t(step_), grp.local.begin + r.begin,
                                       grp.compensation.size() > 0 ? grp.compensation.data() + r.begin : nullptr);
    const auto k = Rule::template prepare<compute_t>(grp.spec.hparams, step_);
    if constexpr (Rule::per_tensor) {
      // Each rank's segments are a run of the group's; their partials, all-gathered, add up as single-rank ones.
      double* partial = grp.segment_partials.data();
      host::per_tensor_partials<Rule, Prec>(v, k, grp.my_segments, grp.local.begin, factor,
                                            partial + 2 * grp.first_segment);
      if (sharded()) comm_->all_gather(partial, grp.segment_partial_counts);
      host::trust_ratios<Rule>(k, grp.all_segments, partial, grp.offsets.size() - 1, grp.tensor_sums.data(),
                               grp.trust_ratio.data());
      host::per_tensor_apply<Rule, Prec>(v, k, grp.my_segments, grp.local.begin, grp.trust_ratio.data());
    } else {
      host::update_elementwise<Rule, Prec>(v, k, grp.num_states, factor);
    }
  }

  // Stages 1-2: every rank's updated shard into every rank's params.
  void publish_params(group& grp) {
    if (zero_.stage == 1 || zero_.stage == 2) {
      if (world_ > 1) all_gather_range(grp, zero::range{0, grp.spec.size}, grp.spec.params);
    }
  }

  // Stage 3: a new buffer holding the full params of group elements r.
  host::aligned_buffer<param_t> gather_range(const group& grp, zero::range r) {
    host::aligned_buffer<param_t> full(r.size());
    const zero::range mine = zero::intersect(r, grp.local);
    if (!mine.empty())
      std::copy(grp.param_shard.data() + (mine.begin - grp.local.begin),
                grp.param_shard.data() + (mine.end - grp.local.begin), full.data() + (mine.begin - r.begin));
    all_gather_range(grp, r, full.data());
    return full;
  }

  // In place: buf holds group elements r, this rank's own already in place.
  template <class T>
  void all_gather_range(const group& grp, zero::range r, T* buf) {
    for_each_bucket(r, [&](zero::range piece) {
      grp.part.counts(piece, counts_);
      comm_->all_gather(buf + (piece.begin - r.begin), counts_);
    });
  }

  // A full copy of a sharded per-element buffer (local range at `local`) into out[0, size).
  template <class T>
  void gather_full(std::size_t g, const T* local, T* out) {
    group& grp = groups_.at(g);
    std::copy(local, local + grp.local.size(), out + grp.local.begin);
    if (sharded()) all_gather_range(grp, zero::range{0, grp.spec.size}, out);
  }

  comm::communicator* comm_;
  int rank_ = 0, world_ = 1;
  zero_options zero_;
  std::vector<group> groups_;
  scaler_args scaler_args_;
  scaler_state_type scaler_state_{};
  step_options options_;
  std::int64_t step_ = 0;
  std::vector<const grad_t*> step_grads_;
  host::aligned_buffer<reduce_type> send_, recv_;  // reduction workspace, bucket_elements each at most
  std::vector<std::size_t> counts_;                // per-rank counts of one collective (workspace)
  zero::live_gathers<host::aligned_buffer<param_t>> live_;
};

}  // namespace mpopt
