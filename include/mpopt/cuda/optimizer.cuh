// mpopt::cuda::optimizer: rule x precision x scaler on the CUDA backend, with mpopt::optimizer's step() semantics.
//
// A step is three stream-ordered launches and no host synchronisation, so a whole step can be captured in a CUDA
// graph and replayed:
//   1. the statistics pass (reduce.cuh): sum of squares and non-finite flag of every grad, read-only;
//   2. the step-scalars kernel (scalars.cuh): found_inf, Scaler::update, the combined unscale + clip factor, the
//      step counter (advanced only when the step is applied) and Rule::prepare for every group, all on the device;
//   3. the fused update (update.cuh): one launch per state count over a device-memory table with one entry per group
//      (per tensor for LAMB, which adds its ratio kernel and second phase); it returns at once on a skipped step.
//
// A master<bf16_t, stochastic_rounding> or master<bf16_t, kahan_summation> stores exactly the host optimizer's bits
// (policy/rounding.hpp): the same Philox key (step_options.rounding_seed and the group index), counter (element index
// in the group, step counter as advanced by this step) and compensation buffer.
//
// Usage (device pointers in the groups; the stream is the caller's):
//   mpopt::cuda::optimizer<mpopt::adamw, mpopt::bf16_mixed_policy> opt({group}, {}, options, stream);
//   opt.step(stream);                           // enqueues the whole step: no synchronisation, capturable
//   mpopt::step_result r = opt.result(stream);  // optional: copies the outcome back and waits for the stream
//
// ZeRO (stages 0-3, mpopt::zero_options) over a device-memory communicator (comm::nccl), with the host optimizer's
// semantics and layout (zero/partition.hpp): grads are reduce-scattered in fp32 (fp64 for fp32 grads) bucket by
// bucket and averaged, each rank updates its shard, and stages 1-2 all-gather the updated params. The statistics
// partials of every rank are all-gathered before the step-scalars kernel, so every rank sums the same partials in the
// same order and reaches the same decision (overflow skip, clip factor). The collectives are enqueued on the
// communicator's stream, which must be the stream of construction and of every step(): the step stays free of host
// synchronisation and capturable (NCCL supports graph capture). LAMB's per-tensor sums come from fixed segments whose
// sums are all-gathered (update.cuh), so its sharded steps give the single-rank bits too. Stage 3's gathers also run
// on the communicator's stream, but the forward and backward that use them may run on streams of their own: gather()
// makes its stream wait for the range (an event), prefetch() starts a range's gather early so that it overlaps that
// work, and release() returns the memory in stream order after its stream's use.
//
// Errors: construction and the setters throw mpopt::error (bad input: errc::invalid_argument with the host
// optimizer's messages; a CUDA failure: errc::unsupported naming the call). step() cannot throw on a launch failure
// it only learns about later, so it returns nothing and keeps the first failure of its launches in last_error();
// result() reports that, or a failure the stream raised since, in step_result::error.
#pragma once

#include <cuda_runtime.h>

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
#include "../numeric/convert.hpp"
#include "../numeric/traits.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../rules.hpp"
#include "../scaler/scalers.hpp"
#include "../zero/live_gathers.hpp"
#include "../zero/partition.hpp"
#include "data_parallel.cuh"
#include "error.cuh"
#include "launch.cuh"
#include "memory.cuh"
#include "reduce.cuh"
#include "scalars.cuh"
#include "update.cuh"

namespace mpopt::cuda {

// The host optimizer's group description, with device pointers: params (written by step()) and grads (read).
template <class Rule, class Prec>
using param_group = mpopt::param_group<Rule, Prec>;

template <class Rule, class Prec, class Scaler = no_scaler>
class optimizer {
  static_assert(is_precision<Prec>::value,
                "mpopt::cuda::optimizer: the 2nd argument must be an mpopt::precision<param<..>, master<..>, "
                "grad<..>, state<..>>");

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
  using scalars_type = step_scalars<scaler_state_type>;

  // Validates every group as mpopt::optimizer does (same messages), and also that params and grads are aligned to
  // their element size and are memory the current device can use. Allocates the master (when separate), the states
  // and a kahan_summation master's compensation on the current device, initialises them as the host does (master =
  // convert(param), states = Rule::initial_state, compensation = 0) on `stream`, and waits for that: construction is
  // the one place that synchronises. The params must hold their initial values in `stream` order.
  explicit optimizer(std::vector<group_type> groups, scaler_args scaler = {}, step_options options = {},
                     cudaStream_t stream = nullptr)
      : scaler_args_(scaler), options_(options) {
    init(std::move(groups), stream);
  }

  // ZeRO over `comm`, a device-memory communicator (comm::nccl) that outlives the optimizer; `stream` must be the
  // communicator's stream. Collective: every rank constructs with the same group layout (checked: a mismatch throws
  // on every rank) and its own device buffers. Stages 2-3 accept groups without grads (reduce_grads() feeds them).
  optimizer(std::vector<group_type> groups, comm::communicator& comm, zero_options zero, scaler_args scaler = {},
            step_options options = {}, cudaStream_t stream = nullptr)
      : comm_(&comm), zero_(zero), scaler_args_(scaler), options_(options) {
    if (comm.memory() != comm::memory_space::device)
      throw error(status::invalid("the CUDA optimizer needs a device-memory communicator (nccl), got " + comm.name()));
    throw_if_error(mpopt::detail::validate_zero_options(zero_));
    rank_ = comm.rank();
    world_ = comm.size();
    check_stream(stream, "construction");
    init(std::move(groups), stream);
  }

  optimizer(const optimizer&) = delete;
  optimizer& operator=(const optimizer&) = delete;
  optimizer(optimizer&&) noexcept = default;
  optimizer& operator=(optimizer&&) noexcept = default;
  ~optimizer() = default;  // device_buffer frees; cudaFree waits for the device to finish with the memory

  // Enqueues one whole step on `stream` (statistics, scalars, update) and returns without synchronising. Call it
  // from the device the optimizer was built on, one stream at a time. Capturable: every launch reads its inputs from
  // device memory. A launch failure (this step's, or that of the reduce_grads() calls feeding it) is kept in
  // last_error(). With ZeRO it also enqueues the grad reduction (unless reduce_grads() fed this step), the statistics
  // all-gather and, at stages 1-2, the param all-gather, on the communicator's stream (which `stream` must be); it
  // throws mpopt::error when a collective cannot be enqueued. At stages 2-3 whether reduce_grads() fed the step is
  // decided on the host: a captured step keeps the choice made at capture, so replay it fed the same way each time
  // and do not mix replays with uncaptured steps.
  void step(cudaStream_t stream) {
    last_error_ = std::exchange(pending_error_, status::success());
    if (comm_ != nullptr) {
      check_stream(stream, "step");
      for (std::size_t g = 0; g < groups_.size(); ++g) reduce_step_grads(g, stream);
    }
    const std::uint32_t offset = sharded() ? std::uint32_t(rank_) * stats_grid_ : 0u;
    const std::uint32_t count = sharded() ? std::uint32_t(world_) * stats_grid_ : stats_grid_;
    const status scalars_status = enqueue_step_scalars<Rule, Scaler, compute_t>(
        stats_, stats_grid_, stats_partials{partial_sum_.get(), partial_flag_.get(), offset, count}, scaler_args_,
        options_d_.get(), scalars_.get(), args_d_.get(), coeffs_d_.get(), std::uint32_t(groups_.size()), stream, [&] {
          if (!sharded()) return;
          comm_->all_gather_bytes(partial_sum_.get(), stats_grid_ * sizeof(double));
          comm_->all_gather_bytes(partial_flag_.get(), stats_grid_ * sizeof(int));
        });
    if (last_error_.ok()) last_error_ = scalars_status;
    const step_core* core = reinterpret_cast<const step_core*>(scalars_.get());
    for (const update_part& part : parts_) {
      if constexpr (Rule::per_tensor) {
        per_tensor_storage& t = per_tensor_;
        note(launch_per_tensor_update<Rule, Prec, MS>(
                 part.table.entries(), part.table.map(), part.grid, t.entry_tensor.get(), t.segments, part.ratio_grid,
                 coeffs_d_.get(), core, t.sums.get() + 2 * t.first_slot, t.sums.get(), t.ratio.get(), stream,
                 [&] {
                   if (sharded()) comm_->all_gather(t.sums.get(), t.counts);
                 }),
             "step: launch of the per-tensor update kernels");
      } else {
        dispatch_state_count<counts::min, counts::max>(part.num_states, [&](auto ns) {
          note(launch_update<Rule, Prec, decltype(ns)::value, MS>(part.table.entries(), part.table.map(), part.grid,
                                                                  coeffs_d_.get(), core, stream),
               "step: launch of the update kernel");
        });
      }
    }
    if (comm_ == nullptr) return;
    for (group_storage& grp : groups_) {
      // A skipped step gathers unchanged params: cheaper than a host synchronisation to learn that it skipped.
      if ((zero_.stage == 1 || zero_.stage == 2) && world_ > 1)
        mean_.all_gather(grp.part, zero::range{0, grp.spec.size}, grp.spec.params);
      consume_grads(grp, stream);
    }
  }

  // Stages 2 and 3: reduces (mean over ranks) the grads of tensors [first, last) of group g, `grads` (device memory)
  // holding their elements contiguously, and adds them to this rank's shard of the group's grads; the next step()
  // consumes what was reduced. Collective; enqueued on `stream` (the communicator's), after which the caller may
  // reuse `grads` in stream order. G may differ from grad_t (accumulation in the grad role's dtype).
  template <class G>
  void reduce_grads(std::size_t g, std::size_t first, std::size_t last, const G* grads, cudaStream_t stream) {
    static_assert(is_element_type_v<G>,
                  "mpopt::cuda::optimizer::reduce_grads: grads must point to float, double, half_t or bf16_t");
    if (comm_ == nullptr || zero_.stage < 2)
      throw error(status::invalid("reduce_grads: ZeRO stage " + std::to_string(zero_.stage) +
                                  " reduces param_group::grads in step(); reduce_grads is for stages 2 and 3"));
    check_stream(stream, "reduce_grads");
    const zero::range r = tensor_range(g, first, last, "reduce_grads");
    if (!r.empty() && grads == nullptr) throw error(status::invalid("reduce_grads: grads is null"));
    group_storage& grp = groups_[g];
    reduce_range(grp, r, grads, /*accumulate=*/true, pending_error_, stream);
    grp.has_reduced = true;
  }

  // Stage 3: the full params of tensors [first, last) of group g, contiguous in device memory, valid in `stream`
  // order until the matching release(). Collective. The all-gather runs on the communicator's stream and `stream`
  // (any stream of this device) waits for it; a range already gathered or prefetched is not gathered again, and
  // counts one more use.
  const param_t* gather(std::size_t g, std::size_t first, std::size_t last, cudaStream_t stream) {
    mpopt::detail::check_stage3(zero_, "gather");
    const zero::range r = tensor_range(g, first, last, "gather");
    const gathered_range& range =
        live_.acquire(g, first, last, r.size(), zero_.max_live_elements, [&] { return gather_range(g, r); });
    throw_if_cuda_error(cudaStreamWaitEvent(stream, range.ready.get(), 0), "gather: cudaStreamWaitEvent");
    return range.data.get();
  }

  // Stage 3: enqueues the all-gather of tensors [first, last) of group g on the communicator's stream now, so that it
  // overlaps the work on other streams until gather() takes the range (DeepSpeed's prefetch); the range holds no use
  // until then. Returns false and does nothing when the range is already gathered or does not fit under
  // max_live_elements beside what is (the same answer on every rank). Collective.
  bool prefetch(std::size_t g, std::size_t first, std::size_t last) {
    mpopt::detail::check_stage3(zero_, "prefetch");
    const zero::range r = tensor_range(g, first, last, "prefetch");
    return live_.prefetch(g, first, last, r.size(), zero_.max_live_elements, [&] { return gather_range(g, r); });
  }

  // One use of a gathered range fewer; with the last (or for a prefetched range nothing used) its memory goes back.
  // The stream that gathered it (the communicator's then) first waits for the work enqueued on `stream` so far, at
  // every release, so the free (stream-ordered, on that stream) comes after every user's work: no host
  // synchronisation.
  void release(std::size_t g, std::size_t first, std::size_t last, cudaStream_t stream) {
    if (const gathered_range* range = live_.find(g, first, last)) {
      throw_if_cuda_error(cudaEventRecord(released_.get(), stream), "release: cudaEventRecord");
      throw_if_cuda_error(cudaStreamWaitEvent(range->data.stream(), released_.get(), 0),
                          "release: cudaStreamWaitEvent");
    }
    live_.release(g, first, last);  // throws when the range is not gathered
  }
  // The range was used on the communicator's stream.
  void release(std::size_t g, std::size_t first, std::size_t last) { release(g, first, last, comm_stream()); }
  std::size_t live_elements() const noexcept { return live_.elements(); }

  // Device bytes this rank holds, by role, as mpopt::optimizer::memory() counts them.
  memory_report memory() const {
    memory_report m;
    for (const group_storage& grp : groups_) mpopt::detail::add_group_memory<Prec>(m, grp, zero_.stage);
    m.workspace += mean_.bytes() + live_.elements() * sizeof(param_t);
    return m;
  }

  const zero_options& zero() const noexcept { return zero_; }
  // ZeRO's communicator; null when constructed without one.
  comm::communicator* communicator() const noexcept { return comm_; }
  // The elements of group g this rank updates and whose master and states it holds: the whole group at stage 0 or
  // on one rank, the rank's shard otherwise. master(g), state(g, j), compensation(g) and local_params(g) point at
  // element local_range(g).begin.
  zero::range local_range(std::size_t g) const {
    check_group_index(g);
    return groups_[g].local;
  }
  const zero::partition& layout(std::size_t g) const {
    check_group_index(g);
    return groups_[g].part;
  }
  // The param copy of local_range(g): the stage-3 shard, else the caller's params at local_range(g).begin.
  param_t* local_params(std::size_t g) const {
    check_group_index(g);
    return groups_[g].local_params();
  }

  // The first failure of the latest step()'s launches (ok when they were all enqueued). It comes from
  // cudaGetLastError, which is per host thread: an unchecked failed launch of the caller's own shows up here too.
  const status& last_error() const noexcept { return last_error_; }

  // The outcome of the latest step() enqueued on `stream`: copies the step scalars back and waits for the stream.
  // This is the opt-in convenience that synchronises. Before any step: applied == false, step == 0.
  step_result result(cudaStream_t stream) const { return read_step_result(scalars_.get(), last_error_, stream); }

  std::size_t num_groups() const noexcept { return groups_.size(); }
  const args_type& hparams(std::size_t g) const {
    check_group_index(g);
    return groups_[g].spec.hparams;
  }
  // Validates first (the host optimizer's messages), then writes the device copy on `stream`: later steps on that
  // stream use it, and a captured graph picks it up at its next replay. Throws mpopt::error.
  void set_hparams(std::size_t g, const args_type& a, cudaStream_t stream) {
    check_group_index(g);
    throw_if_error(mpopt::detail::with_group_prefix(Rule::validate(a), g));
    if (Rule::num_states(a) != groups_[g].num_states)
      throw error(status::invalid("group " + std::to_string(g) +
                                  ": changing the number of optimizer states (e.g. amsgrad or momentum on/off) "
                                  "after construction is not supported"));
    store_value_kernel<args_type><<<1, 1, 0, stream>>>(args_d_.get() + g, a);
    throw_if_cuda_error(cudaGetLastError(), "set_hparams: launch of the store kernel");
    groups_[g].spec.hparams = a;
  }

  // max_grad_norm, deepspeed_scale_order and rounding_seed (the key of a stochastic_rounding master) as the host's.
  const step_options& options() const noexcept { return options_; }
  // Validated, then written on `stream` (store_step_options).
  void set_options(const step_options& o, cudaStream_t stream) {
    store_step_options(options_d_.get(), o, stream);
    options_ = o;
  }
  const scaler_args& scaler_arguments() const noexcept { return scaler_args_; }

  // Synchronising accessors (they wait for `stream`).
  scaler_state_type scaler_state(cudaStream_t stream = nullptr) const {
    return read_scaler_state(scalars_.get(), stream);
  }
  void set_scaler_state(const scaler_state_type& s, cudaStream_t stream = nullptr) {
    write_scaler_state<Scaler>(scalars_.get(), s, scaler_args_, stream);
  }
  std::int64_t step_count(cudaStream_t stream = nullptr) const { return read_step_count(scalars_.get(), stream); }

  // Checkpoint restore (checkpoint/cuda.cuh): writes the step counter on `stream` and waits for it.
  void set_step_count(std::int64_t step, cudaStream_t stream = nullptr) {
    write_step_count(scalars_.get(), step, stream);
  }

  // Group g as constructed: its element count, tensor sizes (empty: one tensor) and the device params.
  std::size_t size(std::size_t g) const {
    check_group_index(g);
    return groups_[g].spec.size;
  }
  const std::vector<std::size_t>& tensor_sizes(std::size_t g) const {
    check_group_index(g);
    return groups_[g].spec.tensor_sizes;
  }
  param_t* params(std::size_t g) const {
    check_group_index(g);
    return groups_[g].spec.params;
  }

  // Device pointers. The master of group g is the param buffer itself when the policy has no separate master.
  master_t* master(std::size_t g) const {
    check_group_index(g);
    return groups_[g].master();
  }
  state_t* state(std::size_t g, int j) const {
    check_group_index(g);
    if (j < 0 || j >= groups_[g].num_states)
      throw error(status::invalid("state index " + std::to_string(j) + " out of range for group " + std::to_string(g) +
                                  " (" + std::to_string(groups_[g].num_states) + " states)"));
    return groups_[g].states[std::size_t(j)].get();
  }
  int num_states(std::size_t g) const {
    check_group_index(g);
    return groups_[g].num_states;
  }
  // kahan_summation: group g's compensation (what rounding dropped, per element; size(g) elements, device memory);
  // null otherwise.
  master_t* compensation(std::size_t g) const {
    check_group_index(g);
    return groups_[g].compensation.get();
  }
  // The step scalars in device memory, for callers that act on a step's outcome without synchronising.
  const scalars_type* device_scalars() const noexcept { return scalars_.get(); }
  // The loss scale for the next backward, in device memory (1 without a scaler): multiply the loss by it on the
  // device to keep a dynamic-scaling loop free of synchronisation.
  const float* device_loss_scale() const noexcept { return field<float>(offsetof(step_core, next_loss_scale)); }

 private:
  static constexpr int MS = Rule::max_states;
  using counts = state_counts<Rule>;
  using entry_type = tensor_entry<Prec, MS>;
  using coeffs_type = typename Rule::template coeffs<compute_t>;

  static_assert(std::is_standard_layout_v<scalars_type> && offsetof(scalars_type, core) == 0,
                "step_scalars must start with its step_core: the update kernels read it through a step_core*");

  struct group_storage {
    group_type spec;  // spec.params is null at stage 3 after construction: the shard is the params
    int num_states = 0;
    std::vector<std::size_t> offsets;      // tensor boundaries, tensors + 1 entries
    zero::partition part;                  // shards of master and states (world 1 at stage 0)
    zero::partition reduce_part;           // how grads are reduce-scattered: over every rank, at every stage
    zero::range local;                     // the elements this rank updates
    std::size_t held = 0;                  // elements of master, states and reduced grads held (padding included)
    device_buffer<master_t> master_copy;   // empty when the param buffer is the master
    device_buffer<master_t> compensation;  // kahan_summation only: what rounding dropped, per element
    device_buffer<param_t> param_shard;    // stage 3: this rank's params
    device_buffer<grad_t> reduced;         // the reduced grads of `local` (ZeRO on several ranks, or stages 2-3)
    bool has_reduced = false;              // stages 2-3: `reduced` holds grads no step has consumed
    bool sharded_params = false;           // stage 3
    std::vector<device_buffer<state_t>> states;

    param_t* local_params() const { return sharded_params ? param_shard.get() : spec.params + local.begin; }
    master_t* master() const {
      if constexpr (Prec::separate_master) {
        return master_copy.get();
      } else {
        return local_params();
      }
    }
    // What the statistics pass and the update read.
    const grad_t* step_grads() const { return reduced.size() > 0 ? reduced.get() : spec.grads; }
  };

  // Stage 3: a gathered param range, allocated and freed in order on the communicator's stream, and the event its
  // users wait for.
  struct gathered_range {
    stream_ordered_buffer<param_t> data;
    ordering_event ready;
    std::size_t size() const noexcept { return data.size(); }
  };

  cudaStream_t comm_stream() const { return static_cast<cudaStream_t>(comm_->device_stream()); }

  // Enqueues the gather of group elements r on the communicator's stream: this rank's own elements copied, the others
  // all-gathered; `ready` is recorded after.
  gathered_range gather_range(std::size_t g, zero::range r) {
    const group_storage& grp = groups_[g];
    gathered_range out{
        stream_ordered_buffer<param_t>(r.size(), comm_stream(), "gathered params of group " + std::to_string(g)),
        make_ordering_event("a gathered param range")};
    const zero::range mine = zero::intersect(r, grp.local);
    if (!mine.empty())
      throw_if_cuda_error(cudaMemcpyAsync(out.data.get() + (mine.begin - r.begin),
                                          grp.param_shard.get() + (mine.begin - grp.local.begin),
                                          mine.size() * sizeof(param_t), cudaMemcpyDeviceToDevice, comm_stream()),
                          "gather: cudaMemcpyAsync(own params)");
    mean_.all_gather(grp.part, r, out.data.get());
    throw_if_cuda_error(cudaEventRecord(out.ready.get(), comm_stream()), "gather: cudaEventRecord");
    return out;
  }

  // One update launch: the entries sharing a state count (elementwise rules), or every segment (LAMB).
  struct update_part {
    int num_states = 0;
    device_table<entry_type> table;
    std::uint32_t grid = 0;
    std::uint32_t ratio_grid = 0;
  };

  // LAMB's segment tables (update.cuh): every rank's segments, numbered rank by rank (then group, then element), own
  // one slot each in `sums`; this rank's are slots [first_slot, first_slot + its entries), all-gathered each step.
  struct per_tensor_storage {
    device_buffer<std::uint32_t> entry_tensor;  // this rank's segment -> tensor (numbered over all groups)
    device_buffer<std::uint64_t> tensor_begin, slot;
    device_buffer<std::uint32_t> tensor_group;
    tensor_segments segments;
    device_buffer<double> sums;  // 2 per slot: |w|^2, |u|^2
    std::size_t first_slot = 0;
    std::vector<std::size_t> counts;  // doubles per rank, for the all-gather
    device_buffer<compute_t> ratio;   // per tensor
  };

  // The host optimizer's checks, in its order and with its messages, then the alignment of params and grads.
  status validate_group(const group_type& spec, std::size_t g) const {
    status s = mpopt::detail::validate_group(spec, g, /*grads_required=*/zero_.stage < 2);
    if (!s.ok()) return s;
    const std::string where = "group " + std::to_string(g) + ": ";
    const int ns = Rule::num_states(spec.hparams);
    if (ns < counts::min || ns > counts::max)
      return status{errc::unsupported, where + Rule::name + " with " + std::to_string(ns) +
                                           " states has no CUDA kernel (state_counts<Rule> allows " +
                                           std::to_string(counts::min) + " to " + std::to_string(counts::max) + ")"};
    if (spec.size == 0) return status::success();
    return detail::check_group_buffers(spec, g);
  }

  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw error(status::invalid("group index " + std::to_string(g) + " out of range (" +
                                  std::to_string(groups_.size()) + " groups)"));
  }

  // A field of the device step scalars, by byte offset (the scalars are never dereferenced on the host).
  template <class T>
  T* field(std::size_t offset) const {
    return reinterpret_cast<T*>(reinterpret_cast<char*>(scalars_.get()) + offset);
  }

  void note(cudaError_t err, const char* what) { detail::keep_first_error(last_error_, err, what); }

  bool sharded() const noexcept { return comm_ != nullptr && zero_.stage >= 1 && world_ > 1; }

  // The collectives are ordered on the communicator's stream: the optimizer's launches must be too.
  void check_stream(cudaStream_t stream, const char* what) const {
    if (comm_ != nullptr) detail::check_comm_stream(*comm_, stream, what);
  }

  zero::range tensor_range(std::size_t g, std::size_t first, std::size_t last, const char* what) const {
    check_group_index(g);
    return mpopt::detail::tensor_range(groups_[g].offsets, g, first, last, what);
  }

  // Construction after the members are set: validation (the host's order), the layout check across ranks, storage,
  // tables, and the device copies of the hyper-parameters, options and step scalars.
  void init(std::vector<group_type> groups, cudaStream_t stream) {
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(mpopt::detail::validate_step_options(options_));
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(validate_group(groups[g], g));
    throw_if_cuda_error(cudaGetDevice(&device_), "cudaGetDevice");
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(detail::check_group_memory(groups[g], g, device_));
    if (comm_ != nullptr) detail::check_same_layout(*comm_, zero_.stage, groups, stream);

    groups_.reserve(groups.size());
    std::size_t largest = 0;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      largest = std::max(largest, groups[g].size);
      groups_.push_back(make_group(std::move(groups[g]), g, stream));
    }
    // Grads are reduced on several ranks, and at stages 2-3 (reduce_grads) on one; the gathers need no workspace.
    const bool reduces = world_ > 1 || zero_.stage >= 2;
    if (comm_ != nullptr) mean_ = detail::grad_mean<reduce_type>(*comm_, reduces ? largest : 0, zero_.bucket_elements);
    if (zero_.stage == 3) released_ = make_ordering_event("stage 3 releases");
    build_tables();

    const std::size_t ng = groups_.size();
    args_d_ = device_buffer<args_type>(ng, "hyper-parameters");
    coeffs_d_ = device_buffer<coeffs_type>(ng, "rule coefficients");
    std::vector<args_type> args(ng);
    for (std::size_t g = 0; g < ng; ++g) args[g] = groups_[g].spec.hparams;
    if (ng > 0) detail::copy_to_device(args_d_.get(), args.data(), args_d_.bytes(), "hyper-parameters", stream);
    init_step_state<Scaler>(options_, scaler_args_, options_d_, scalars_, stream);
    throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (optimizer construction)");
  }

  group_storage make_group(group_type spec, std::size_t g, cudaStream_t stream) const {
    group_storage grp;
    const std::string where = " of group " + std::to_string(g);
    const int ranks = comm_ != nullptr && zero_.stage >= 1 ? world_ : 1;
    grp.offsets = mpopt::detail::tensor_offsets(spec);
    grp.part = zero::make_partition(spec.size, ranks);
    grp.reduce_part = zero::make_partition(spec.size, world_);
    grp.local = ranks == 1 ? zero::range{0, spec.size} : grp.part.owned(rank_);
    grp.held = ranks == 1 ? spec.size : grp.part.shard;
    grp.num_states = Rule::num_states(spec.hparams);
    const param_t* initial = spec.params + grp.local.begin;
    if (comm_ != nullptr && zero_.stage == 3) {
      grp.param_shard = device_buffer<param_t>(grp.held, "param shard" + where);
      if (!grp.local.empty())
        throw_if_cuda_error(cudaMemcpyAsync(grp.param_shard.get(), initial, grp.local.size() * sizeof(param_t),
                                            cudaMemcpyDeviceToDevice, stream),
                            "cudaMemcpyAsync(param shard" + where + ")");
      grp.sharded_params = true;
    }
    if (comm_ != nullptr && (world_ > 1 || zero_.stage >= 2)) {
      grp.reduced = device_buffer<grad_t>(grp.held, "reduced grads" + where);
      if (grp.held > 0)
        throw_if_cuda_error(cudaMemsetAsync(grp.reduced.get(), 0, grp.reduced.bytes(), stream),
                            "cudaMemsetAsync(reduced grads" + where + ")");
    }
    if constexpr (Prec::separate_master)
      grp.master_copy = converted_buffer<master_t>(grp.held, initial, grp.local.size(), "master" + where, stream);
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>)
      grp.compensation = filled_buffer<master_t>(grp.held, master_t{}, "compensation" + where, stream);
    for (int j = 0; j < grp.num_states; ++j) {
      const state_t init = convert<state_t>(compute_t(Rule::initial_state(spec.hparams, j)));
      grp.states.push_back(filled_buffer<state_t>(grp.held, init, std::string(Rule::state_names[j]) + where, stream));
    }
    if (grp.sharded_params) spec.params = nullptr;
    grp.spec = std::move(spec);
    return grp;
  }

  // mpopt::optimizer::reduce_range on the device: grads g[0, r.size()) (group elements r) widened to reduce_type,
  // reduce-scattered over every rank, and this rank's part averaged into `reduced` (or added to it). Stage 0 then
  // all-gathers the rounded means, so every replica holds the same bits.
  // Launch failures go to `errors` (the first kept).
  template <class G>
  void reduce_range(group_storage& grp, zero::range r, const G* g, bool accumulate, status& errors,
                    cudaStream_t stream) {
    // Stage 0: local.begin is 0, and the means are all-gathered with the reduce-scatter's counts.
    mean_.reduce(grp.reduce_part, r, g, grp.reduced.get(), grp.local.begin, accumulate, zero_.stage == 0, errors,
                 stream);
  }

  // The grads of group g for this step: reduced here unless reduce_grads() did it (or nothing needs reducing).
  void reduce_step_grads(std::size_t g, cudaStream_t stream) {
    group_storage& grp = groups_[g];
    if (grp.has_reduced || grp.reduced.size() == 0) return;
    if (grp.spec.grads == nullptr && grp.spec.size > 0)
      throw error(status::invalid("step: group " + std::to_string(g) +
                                  " has no grads: call reduce_grads() or set param_group::grads"));
    reduce_range(grp, zero::range{0, grp.spec.size}, grp.spec.grads, /*accumulate=*/false, last_error_, stream);
    grp.has_reduced = zero_.stage >= 2;  // stages 2-3 accumulate into `reduced`: zeroed after the step
  }

  void consume_grads(group_storage& grp, cudaStream_t stream) {
    if (grp.has_reduced && grp.held > 0)
      note(cudaMemsetAsync(grp.reduced.get(), 0, grp.reduced.bytes(), stream), "step: cudaMemsetAsync(reduced grads)");
    grp.has_reduced = false;
  }

  // The entry for local elements [offset, offset + n) of group g (offset from local_range(g).begin).
  entry_type make_entry(std::size_t g, std::size_t offset, std::size_t n) const {
    const group_storage& grp = groups_[g];
    entry_type e{};
    e.param = grp.local_params() + offset;
    e.master = grp.master() + offset;
    e.grad = grp.step_grads() + offset;
    bool aligned = is_aligned(e.master, vector_bytes) && is_aligned(e.grad, vector_bytes) &&
                   (!Prec::separate_master || is_aligned(e.param, vector_bytes));
    for (int j = 0; j < grp.num_states; ++j) {
      e.states[j] = grp.states[std::size_t(j)].get() + offset;
      aligned = aligned && is_aligned(e.states[j], vector_bytes);
    }
    e.n = n;
    e.group = std::uint32_t(g);
    e.first_index = grp.local.begin + offset;
    if (grp.compensation.get() != nullptr) {
      e.compensation = grp.compensation.get() + offset;
      aligned = aligned && is_aligned(e.compensation, vector_bytes);
    }
    e.vector_ok = aligned ? 1u : 0u;
    return e;
  }

  // Blocks of the statistics pass: fixed by the sizes, and with ZeRO the same on every rank (the largest shard's
  // count), so every rank's partials have one place in the all-gathered array.
  std::uint32_t statistics_grid() const {
    const int ranks = sharded() ? world_ : 1;
    std::uint64_t most = 0;
    for (int q = 0; q < ranks; ++q) {
      std::uint64_t chunks = 0;
      for (const group_storage& grp : groups_) {
        const std::size_t n = sharded() ? grp.part.owned(q).size() : grp.local.size();
        chunks += (n + stats_chunk_elems<grad_t> - 1) / stats_chunk_elems<grad_t>;
      }
      most = std::max(most, chunks);
    }
    return stats_grid(most);
  }

  void build_tables() {
    // Statistics: one entry per group; grid and chunks fixed by the sizes, so the sums are reproducible anywhere.
    std::vector<grad_entry<grad_t>> grads;
    for (const group_storage& grp : groups_)
      grads.push_back({grp.step_grads(), grp.local.size(), is_aligned(grp.step_grads(), vector_bytes) ? 1u : 0u});
    stats_ = device_table<grad_entry<grad_t>>(grads, stats_chunk_elems<grad_t>, "statistics");
    stats_grid_ = statistics_grid();
    const std::size_t partials = std::size_t(stats_grid_) * std::size_t(sharded() ? world_ : 1);
    partial_sum_ = device_buffer<double>(partials, "statistics partial sums");
    partial_flag_ = device_buffer<int>(partials, "statistics partial flags");

    if constexpr (Rule::per_tensor) {
      build_per_tensor_tables();
    } else {
      // One entry per group (its whole flat buffer stays on the vector path), one launch per state count.
      for (int ns = counts::min; ns <= counts::max; ++ns) {
        std::vector<entry_type> entries;
        std::uint64_t elements = 0;
        for (std::size_t g = 0; g < groups_.size(); ++g) {
          if (groups_[g].num_states != ns) continue;
          entries.push_back(make_entry(g, 0, groups_[g].local.size()));
          elements += groups_[g].local.size();
        }
        if (elements == 0) continue;
        dispatch_state_count<counts::min, counts::max>(ns, [&](auto nsc) {
          auto kernel = update_kernel<Rule, Prec, decltype(nsc)::value, MS>;
          const std::uint64_t resident = resident_blocks(kernel, "update");
          // Longer chunks (less per-chunk overhead) while there are still two chunks per resident block.
          std::uint32_t chunk = std::uint32_t(block_threads) * update_vector_width<Prec> * 8;
          while (chunk > std::uint32_t(block_threads) * update_vector_width<Prec> && elements / chunk < 2 * resident)
            chunk /= 2;
          update_part part;
          part.num_states = ns;
          part.table = device_table<entry_type>(entries, chunk, "update");
          part.grid = grid_for(resident, part.table.map().total_chunks);
          parts_.push_back(std::move(part));
        });
      }
    }
  }

  using reduce_type = mpopt::detail::reduce_t<grad_t>;

  // The segments of every group (zero::grid_segments at per_tensor_segment_elems in group coordinates): on every rank
  // the same tensors, slots and order; the entries are this rank's. A rank without elements still has a (empty) part:
  // it takes part in the all-gather of the sums.
  void build_per_tensor_tables() {
    const int ranks = sharded() ? world_ : 1;
    std::vector<std::size_t> tensor_base;  // first tensor number of each group
    std::vector<std::uint32_t> tensor_group;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      tensor_base.push_back(tensor_group.size());
      tensor_group.insert(tensor_group.end(), groups_[g].offsets.size() - 1, std::uint32_t(g));
    }
    std::vector<std::vector<std::uint64_t>> slots_of(tensor_group.size());
    std::vector<entry_type> entries;
    std::vector<std::uint32_t> entry_tensor;
    per_tensor_storage& t = per_tensor_;
    std::uint64_t slot = 0;
    for (int q = 0; q < ranks; ++q) {
      if (q == rank_ || ranks == 1) t.first_slot = slot;
      const std::uint64_t first = slot;
      for (std::size_t g = 0; g < groups_.size(); ++g) {
        const group_storage& grp = groups_[g];
        const zero::range owned = ranks == 1 ? grp.local : grp.part.owned(q);
        for (const zero::segment& seg : zero::grid_segments(owned, grp.offsets, per_tensor_segment_elems)) {
          const std::size_t tensor = tensor_base[g] + seg.tensor;
          slots_of[tensor].push_back(slot++);
          if (ranks > 1 && q != rank_) continue;
          entries.push_back(make_entry(g, seg.begin - grp.local.begin, seg.end - seg.begin));
          entry_tensor.push_back(std::uint32_t(tensor));
        }
      }
      t.counts.push_back(2 * (slot - first));
    }
    std::vector<std::uint64_t> tensor_begin{0}, slots;
    for (const auto& s : slots_of) {
      slots.insert(slots.end(), s.begin(), s.end());
      tensor_begin.push_back(slots.size());
    }
    t.entry_tensor = detail::upload(entry_tensor, "per-tensor entry map");
    t.tensor_begin = detail::upload(tensor_begin, "per-tensor segment index");
    t.slot = detail::upload(slots, "per-tensor segment slots");
    t.tensor_group = detail::upload(tensor_group, "per-tensor groups");
    t.segments =
        tensor_segments{t.tensor_begin.get(), t.slot.get(), t.tensor_group.get(), std::uint32_t(tensor_group.size())};
    t.sums = device_buffer<double>(2 * slot, "per-tensor segment sums");
    t.ratio = device_buffer<compute_t>(tensor_group.size(), "per-tensor trust ratios");

    update_part part;
    part.num_states = MS;
    part.table = device_table<entry_type>(entries, per_tensor_segment_elems, "per-tensor update");
    const std::uint64_t chunks = part.table.map().total_chunks;  // one per entry
    if (chunks > 0)
      part.grid = grid_for(resident_blocks(per_tensor_phase1_kernel<Rule, Prec, MS>, "per-tensor update"), chunks);
    part.ratio_grid = std::uint32_t(std::min<std::uint64_t>(tensor_group.size(), 4096));
    if (chunks > 0 || sharded()) parts_.push_back(std::move(part));
  }

  comm::communicator* comm_ = nullptr;  // ZeRO's; null: one rank, nothing reduced
  zero_options zero_{};
  int rank_ = 0, world_ = 1;
  std::vector<group_storage> groups_;
  detail::grad_mean<reduce_type> mean_;  // grad reduction and param gathers (with a communicator)
  zero::live_gathers<gathered_range> live_;
  ordering_event released_;  // stage 3: marks a releasing stream's work, which the gathering stream waits for
  scaler_args scaler_args_;
  step_options options_;
  int device_ = 0;
  status last_error_;
  status pending_error_;  // reduce_grads' launch failures, reported by the step that consumes them

  device_buffer<args_type> args_d_;
  device_buffer<coeffs_type> coeffs_d_;
  device_buffer<device_options> options_d_;
  device_buffer<scalars_type> scalars_;

  device_table<grad_entry<grad_t>> stats_;
  std::uint32_t stats_grid_ = 0;
  device_buffer<double> partial_sum_;
  device_buffer<int> partial_flag_;

  std::vector<update_part> parts_;
  per_tensor_storage per_tensor_;  // per-tensor rules only
};

}  // namespace mpopt::cuda
