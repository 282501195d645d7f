// Checkpoints of mpopt::cuda::optimizer, in the host optimizer's format (checkpoint.hpp): save() copies the device
// state (master, a kahan_summation master's compensation, states, step, scaler state, hyper-parameters, step options
// with the rounding seed) into a host mpopt::optimizer of the same rule, policy, scaler and ZeRO layout and saves
// that; load() loads into such a host optimizer (every check, conversion and reshard of checkpoint.hpp, nothing
// changed on failure) and copies the state to the device. So a checkpoint moves freely between the backends, world
// sizes and ZeRO stages.
//
// A CUDA optimizer with ZeRO gets a host mirror with its world size and stage, whose collectives go through the
// optimizer's device communicator (staged through device memory: detail::staged_host_comm, cuda_staging.cuh): then save
// and load are collective, every rank calls them with the communicator's stream, and each rank holds its shard. Both
// synchronise `stream` and hold one host copy of the rank's state while they run (master, states and params, plus one
// group's worth of zero grads that the host optimizer requires and never reads).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../cuda/data_parallel.cuh"
#include "../cuda/optimizer.cuh"
#include "../optimizer.hpp"
#include "checkpoint.hpp"
#include "cuda_staging.cuh"

namespace mpopt::checkpoint {

namespace detail {

// A host optimizer holding a copy of a CUDA optimizer's state on this rank: the same world size, stage and shard.
template <class Rule, class Prec, class Scaler>
struct cuda_mirror {
  using cuda_type = cuda::optimizer<Rule, Prec, Scaler>;
  using param_t = typename Prec::param_t;
  static constexpr bool kahan = std::is_same_v<typename Prec::master_rounding, kahan_summation>;
  std::optional<staged_host_comm> comm;
  std::vector<std::vector<param_t>> params;       // full groups; at stage 3 only the local range is meaningful
  std::vector<typename Prec::grad_t> zero_grads;  // shared by every group: the host optimizer wants grads
  std::optional<mpopt::optimizer<Rule, Prec, Scaler>> host;

  cuda_mirror(const cuda_type& opt, cudaStream_t stream, const char* what) {
    if (opt.communicator() != nullptr) cuda::detail::check_comm_stream(*opt.communicator(), stream, what);
    std::size_t largest = 0;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) largest = std::max(largest, opt.size(g));
    zero_grads.assign(largest, typename Prec::grad_t{});
    std::vector<param_group<Rule, Prec>> groups;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      if (opt.zero().stage < 3) {
        params.push_back(device_to_host(opt.params(g), opt.size(g), "params", stream));
      } else {  // the host optimizer takes only its own range from a stage-3 group's initial params
        const zero::range r = opt.local_range(g);
        const std::vector<param_t> local = device_to_host(opt.local_params(g), r.size(), "params", stream);
        params.emplace_back(opt.size(g));
        std::copy(local.begin(), local.end(), params.back().begin() + std::ptrdiff_t(r.begin));
      }
      groups.push_back({params.back().data(), zero_grads.data(), opt.size(g), opt.tensor_sizes(g), opt.hparams(g)});
    }
    if (opt.communicator() != nullptr) {
      comm.emplace(*opt.communicator());
      host.emplace(std::move(groups), *comm, opt.zero(), opt.scaler_arguments(), opt.options());
    } else {
      host.emplace(std::move(groups), opt.scaler_arguments(), opt.options());
    }
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      const std::size_t n = opt.local_range(g).size();
      const auto master = device_to_host(opt.master(g), n, "master", stream);
      host->set_local_master(g, master.data(), n);
      if constexpr (kahan) {
        const auto compensation = device_to_host(opt.compensation(g), n, "compensation", stream);
        host->set_local_compensation(g, compensation.data(), n);
      }
      for (int j = 0; j < opt.num_states(g); ++j) {
        const auto state = device_to_host(opt.state(g, j), n, "optimizer state", stream);
        host->set_state(g, j, state.data(), n);
      }
    }
    host->set_step_count(opt.step_count(stream));
    host->set_scaler_state(opt.scaler_state(stream));
  }
};

}  // namespace detail

// Saves a CUDA optimizer's state: one rank's checkpoint, or with ZeRO every rank's shard (collective; `stream` must
// then be the communicator's). Throws mpopt::error.
template <class Rule, class Prec, class Scaler>
void save(cuda::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const save_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_mirror<Rule, Prec, Scaler> m(opt, stream, "checkpoint save");
  save(*m.host, dir, options);
}

// Loads any checkpoint of this rule (any world size and stage, either backend) into a CUDA optimizer; collective with
// ZeRO. Throws mpopt::error, and then the device state is unchanged (a CUDA failure while copying back is the
// exception: the device may then hold part of the new state).
template <class Rule, class Prec, class Scaler>
void load(cuda::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const load_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_mirror<Rule, Prec, Scaler> m(opt, stream, "checkpoint load");
  load(*m.host, dir, options);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const zero::range r = opt.local_range(g);
    detail::host_to_device(opt.master(g), m.host->master(g), r.size(), "master", stream);
    // The host rewrote its param copy from the loaded master (every rank's range at stages 1-2; gathering is
    // collective at stage 3, a copy otherwise).
    std::vector<typename Prec::param_t> params(opt.size(g));
    m.host->gather_params(g, params.data());
    if (opt.zero().stage == 3) {
      detail::host_to_device(opt.local_params(g), params.data() + r.begin, r.size(), "params", stream);
    } else {
      detail::host_to_device(opt.params(g), params.data(), opt.size(g), "params", stream);
    }
    if constexpr (detail::cuda_mirror<Rule, Prec, Scaler>::kahan)
      detail::host_to_device(opt.compensation(g), m.host->compensation(g), r.size(), "compensation", stream);
    for (int j = 0; j < opt.num_states(g); ++j)
      detail::host_to_device(opt.state(g, j), m.host->state(g, j), r.size(), "optimizer state", stream);
    if (options.restore_hparams) opt.set_hparams(g, m.host->hparams(g), stream);
  }
  opt.set_step_count(m.host->step_count(), stream);
  opt.set_scaler_state(m.host->scaler_state(), stream);  // synchronises `stream`: the copies above are done
}

}  // namespace mpopt::checkpoint
