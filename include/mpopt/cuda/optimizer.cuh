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

#include "../error.hpp"
#include "../numeric/convert.hpp"
#include "../numeric/traits.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../rules.hpp"
#include "../scaler/scalers.hpp"
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
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(mpopt::detail::validate_step_options(options_));
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(validate_group(groups[g], g));
    throw_if_cuda_error(cudaGetDevice(&device_), "cudaGetDevice");
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(check_memory(groups[g], g, device_));

    groups_.reserve(groups.size());
    for (std::size_t g = 0; g < groups.size(); ++g) groups_.push_back(make_group(std::move(groups[g]), g, stream));
    build_tables();

    const std::size_t ng = groups_.size();
    args_d_ = device_buffer<args_type>(ng, "hyper-parameters");
    coeffs_d_ = device_buffer<coeffs_type>(ng, "rule coefficients");
    std::vector<args_type> args(ng);
    for (std::size_t g = 0; g < ng; ++g) args[g] = groups_[g].spec.hparams;
    if (ng > 0) copy_to_device(args_d_.get(), args.data(), args_d_.bytes(), "hyper-parameters", stream);
    init_step_state<Scaler>(options_, scaler_args_, options_d_, scalars_, stream);
    throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (optimizer construction)");
  }

  optimizer(const optimizer&) = delete;
  optimizer& operator=(const optimizer&) = delete;
  optimizer(optimizer&&) noexcept = default;
  optimizer& operator=(optimizer&&) noexcept = default;
  ~optimizer() = default;  // device_buffer frees; cudaFree waits for the device to finish with the memory

  // Enqueues one whole step on `stream` (statistics, scalars, update) and returns without synchronising. Call it
  // from the device the optimizer was built on, one stream at a time. Capturable: every launch reads its inputs from
  // device memory. A launch failure is kept in last_error().
  void step(cudaStream_t stream) {
    last_error_ = enqueue_step_scalars<Rule, Scaler, compute_t>(
        stats_, stats_grid_, partial_sum_.get(), partial_flag_.get(), scaler_args_, options_d_.get(), scalars_.get(),
        args_d_.get(), coeffs_d_.get(), std::uint32_t(groups_.size()), stream);
    const step_core* core = reinterpret_cast<const step_core*>(scalars_.get());
    for (const update_part& part : parts_) {
      if constexpr (Rule::per_tensor) {
        note(launch_per_tensor_update<Rule, Prec, MS>(part.table.entries(), part.table.map(), part.grid,
                                                      part.ratio_grid, coeffs_d_.get(), core, w_partial_.get(),
                                                      u_partial_.get(), ratio_.get(), stream),
             "step: launch of the per-tensor update kernels");
      } else {
        dispatch_state_count<counts::min, counts::max>(part.num_states, [&](auto ns) {
          note(launch_update<Rule, Prec, decltype(ns)::value, MS>(part.table.entries(), part.table.map(), part.grid,
                                                                  coeffs_d_.get(), core, stream),
               "step: launch of the update kernel");
        });
      }
    }
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
    scaler_state_type s{};
    copy_from_device(&s, field<scaler_state_type>(offsetof(scalars_type, scaler)), sizeof s, "scaler state", stream);
    return s;
  }
  void set_scaler_state(const scaler_state_type& s, cudaStream_t stream = nullptr) {
    store_scaler_state_kernel<Scaler><<<1, 1, 0, stream>>>(scalars_.get(), s, scaler_args_);
    throw_if_cuda_error(cudaGetLastError(), "set_scaler_state: launch of the store kernel");
    throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (set_scaler_state)");
  }
  std::int64_t step_count(cudaStream_t stream = nullptr) const {
    std::int64_t n = 0;
    copy_from_device(&n, field<std::int64_t>(offsetof(step_core, step)), sizeof n, "step counter", stream);
    return n;
  }

  // Checkpoint restore (checkpoint/cuda.cuh): writes the step counter on `stream` and waits for it.
  void set_step_count(std::int64_t step, cudaStream_t stream = nullptr) {
    if (step < 0) throw error(status::invalid("set_step_count: step must be >= 0, got " + std::to_string(step)));
    store_value_kernel<std::int64_t><<<1, 1, 0, stream>>>(field<std::int64_t>(offsetof(step_core, step)), step);
    throw_if_cuda_error(cudaGetLastError(), "set_step_count: launch of the store kernel");
    throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (set_step_count)");
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
    group_type spec;
    int num_states = 0;
    device_buffer<master_t> master_copy;   // empty when the param buffer is the master
    device_buffer<master_t> compensation;  // kahan_summation only: what rounding dropped, per element
    std::vector<device_buffer<state_t>> states;

    master_t* master() const {
      if constexpr (Prec::separate_master) {
        return master_copy.get();
      } else {
        return spec.params;
      }
    }
  };

  // One update launch: the entries sharing a state count (elementwise rules), or every tensor (LAMB).
  struct update_part {
    int num_states = 0;
    device_table<entry_type> table;
    std::uint32_t grid = 0;
    std::uint32_t ratio_grid = 0;
  };

  template <class T>
  static status check_alignment(const T* p, const char* name, std::size_t g) {
    if (p == nullptr || is_aligned(p, sizeof(T))) return status::success();
    return status::invalid("group " + std::to_string(g) + ": " + name + " " + detail::pointer_text(p) +
                           " is not aligned to its element size (" + std::to_string(sizeof(T)) + " bytes, " +
                           dtype_name<T>() + ")");
  }

  // The host optimizer's checks, in its order and with its messages, then the alignment of params and grads.
  static status validate_group(const group_type& spec, std::size_t g) {
    status s = mpopt::detail::validate_group(spec, g);
    if (!s.ok()) return s;
    const std::string where = "group " + std::to_string(g) + ": ";
    const int ns = Rule::num_states(spec.hparams);
    if (ns < counts::min || ns > counts::max)
      return status{errc::unsupported, where + Rule::name + " with " + std::to_string(ns) +
                                           " states has no CUDA kernel (state_counts<Rule> allows " +
                                           std::to_string(counts::min) + " to " + std::to_string(counts::max) + ")"};
    if (spec.size == 0) return status::success();
    s = check_alignment(spec.params, "params", g);
    if (s.ok()) s = check_alignment(spec.grads, "grads", g);
    return s;
  }

  static status check_memory(const group_type& spec, std::size_t g, int device) {
    if (spec.size == 0) return status::success();
    status s = detail::check_device_pointer(spec.params, "params", g, device);
    if (s.ok()) s = detail::check_device_pointer(spec.grads, "grads", g, device);
    return s;
  }

  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw error(status::invalid("group index " + std::to_string(g) + " out of range (" +
                                  std::to_string(groups_.size()) + " groups)"));
  }

  static void copy_to_device(void* dst, const void* src, std::size_t bytes, const char* what, cudaStream_t stream) {
    // From pageable memory: the runtime stages it before returning, and construction waits for the stream anyway.
    throw_if_cuda_error(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream),
                        std::string("cudaMemcpyAsync(") + what + ", host to device)");
  }

  static void copy_from_device(void* dst, const void* src, std::size_t bytes, const char* what, cudaStream_t stream) {
    throw_if_cuda_error(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream),
                        std::string("cudaMemcpyAsync(") + what + ", device to host)");
    throw_if_cuda_error(cudaStreamSynchronize(stream), std::string("cudaStreamSynchronize (reading the ") + what + ")");
  }

  // A field of the device step scalars, by byte offset (the scalars are never dereferenced on the host).
  template <class T>
  T* field(std::size_t offset) const {
    return reinterpret_cast<T*>(reinterpret_cast<char*>(scalars_.get()) + offset);
  }

  void note(cudaError_t err, const char* what) {
    if (err != cudaSuccess && last_error_.ok()) last_error_ = to_status(err, what);
  }

  static std::uint32_t init_grid(std::size_t n) {
    const std::size_t blocks = (n + block_threads - 1) / block_threads;
    return std::uint32_t(blocks < 4096 ? blocks : 4096);
  }

  static group_storage make_group(group_type spec, std::size_t g, cudaStream_t stream) {
    group_storage grp;
    const std::string where = "group " + std::to_string(g);
    grp.num_states = Rule::num_states(spec.hparams);
    const std::size_t n = spec.size;
    if constexpr (Prec::separate_master) {
      grp.master_copy = device_buffer<master_t>(n, "master of " + where);
      if (n > 0) {
        convert_kernel<master_t, param_t>
            <<<init_grid(n), block_threads, 0, stream>>>(grp.master_copy.get(), spec.params, std::uint64_t(n));
        throw_if_cuda_error(cudaGetLastError(), "launch of the master initialisation of " + where);
      }
    }
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>) {
      grp.compensation = device_buffer<master_t>(n, "compensation of " + where);
      if (n > 0) {
        fill_kernel<master_t><<<init_grid(n), block_threads, 0, stream>>>(grp.compensation.get(), master_t{}, n);
        throw_if_cuda_error(cudaGetLastError(), "launch of the compensation initialisation of " + where);
      }
    }
    for (int j = 0; j < grp.num_states; ++j) {
      grp.states.emplace_back(n, std::string(Rule::state_names[j]) + " of " + where);
      const state_t init = convert<state_t>(compute_t(Rule::initial_state(spec.hparams, j)));
      if (n > 0) {
        fill_kernel<state_t><<<init_grid(n), block_threads, 0, stream>>>(grp.states.back().get(), init, n);
        throw_if_cuda_error(cudaGetLastError(), "launch of the state initialisation of " + where);
      }
    }
    grp.spec = std::move(spec);
    return grp;
  }

  // The entry for elements [offset, offset + n) of group g.
  entry_type make_entry(std::size_t g, std::size_t offset, std::size_t n) const {
    const group_storage& grp = groups_[g];
    entry_type e{};
    e.param = grp.spec.params + offset;
    e.master = grp.master() + offset;
    e.grad = grp.spec.grads + offset;
    bool aligned = is_aligned(e.master, vector_bytes) && is_aligned(e.grad, vector_bytes) &&
                   (!Prec::separate_master || is_aligned(e.param, vector_bytes));
    for (int j = 0; j < grp.num_states; ++j) {
      e.states[j] = grp.states[std::size_t(j)].get() + offset;
      aligned = aligned && is_aligned(e.states[j], vector_bytes);
    }
    e.n = n;
    e.group = std::uint32_t(g);
    e.first_index = offset;
    if (grp.compensation.get() != nullptr) {
      e.compensation = grp.compensation.get() + offset;
      aligned = aligned && is_aligned(e.compensation, vector_bytes);
    }
    e.vector_ok = aligned ? 1u : 0u;
    return e;
  }

  void build_tables() {
    // Statistics: one entry per group; grid and chunks fixed by the sizes, so the sums are reproducible anywhere.
    std::vector<grad_entry<grad_t>> grads;
    for (const group_storage& grp : groups_)
      grads.push_back({grp.spec.grads, grp.spec.size, is_aligned(grp.spec.grads, vector_bytes) ? 1u : 0u});
    stats_ = device_table<grad_entry<grad_t>>(grads, stats_chunk_elems<grad_t>, "statistics");
    stats_grid_ = stats_grid(stats_.map().total_chunks);
    partial_sum_ = device_buffer<double>(stats_grid_, "statistics partial sums");
    partial_flag_ = device_buffer<int>(stats_grid_, "statistics partial flags");

    if constexpr (Rule::per_tensor) {
      // One entry per tensor: the trust ratio is per tensor.
      std::vector<entry_type> entries;
      for (std::size_t g = 0; g < groups_.size(); ++g) {
        const group_type& spec = groups_[g].spec;
        if (spec.tensor_sizes.empty()) {
          entries.push_back(make_entry(g, 0, spec.size));
        } else {
          std::size_t offset = 0;
          for (std::size_t n : spec.tensor_sizes) {
            entries.push_back(make_entry(g, offset, n));
            offset += n;
          }
        }
      }
      update_part part;
      part.num_states = MS;
      part.table = device_table<entry_type>(entries, per_tensor_chunk_elems<Prec>, "per-tensor update");
      if (part.table.empty()) return;
      const std::uint64_t chunks = part.table.map().total_chunks;
      part.grid = grid_for(resident_blocks(per_tensor_phase1_kernel<Rule, Prec, MS>, "per-tensor update"), chunks);
      part.ratio_grid = std::uint32_t(std::min<std::uint64_t>(part.table.map().num_entries, 4096));
      w_partial_ = device_buffer<double>(chunks, "per-tensor |w|^2 partials");
      u_partial_ = device_buffer<double>(chunks, "per-tensor |u|^2 partials");
      ratio_ = device_buffer<compute_t>(part.table.map().num_entries, "per-tensor trust ratios");
      parts_.push_back(std::move(part));
    } else {
      // One entry per group (its whole flat buffer stays on the vector path), one launch per state count.
      for (int ns = counts::min; ns <= counts::max; ++ns) {
        std::vector<entry_type> entries;
        std::uint64_t elements = 0;
        for (std::size_t g = 0; g < groups_.size(); ++g) {
          if (groups_[g].num_states != ns) continue;
          entries.push_back(make_entry(g, 0, groups_[g].spec.size));
          elements += groups_[g].spec.size;
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

  std::vector<group_storage> groups_;
  scaler_args scaler_args_;
  step_options options_;
  int device_ = 0;
  status last_error_;

  device_buffer<args_type> args_d_;
  device_buffer<coeffs_type> coeffs_d_;
  device_buffer<device_options> options_d_;
  device_buffer<scalars_type> scalars_;

  device_table<grad_entry<grad_t>> stats_;
  std::uint32_t stats_grid_ = 0;
  device_buffer<double> partial_sum_;
  device_buffer<int> partial_flag_;

  std::vector<update_part> parts_;
  device_buffer<double> w_partial_, u_partial_;  // per-tensor rules only
  device_buffer<compute_t> ratio_;
};

}  // namespace mpopt::cuda
