// Checkpoints of mpopt::cuda::optimizer, in the host optimizer's format (checkpoint.hpp): save() copies the device
// state (master, a kahan_summation master's compensation, states, step, scaler state, hyper-parameters, step options
// with the rounding seed) into a one-rank host mpopt::optimizer of the same rule, policy and scaler and saves that;
// load() loads into such a host optimizer (every check and conversion of checkpoint.hpp, nothing changed on failure)
// and copies the state to the device. So a checkpoint moves freely between the backends, and between one GPU and any
// world size and ZeRO stage of the host optimizer.
//
// A CUDA optimizer sharded by ZeRO over several ranks is refused (errc::unsupported): the mirror holds one rank.
// Both synchronise `stream` and hold one host copy of the state while they run (master, states and params, plus
// one group's worth of zero grads that the host optimizer requires and never reads).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../cuda/error.cuh"
#include "../cuda/optimizer.cuh"
#include "../optimizer.hpp"
#include "checkpoint.hpp"

namespace mpopt::checkpoint {

namespace detail {

// A one-rank host optimizer holding a copy of a CUDA optimizer's state.
template <class Rule, class Prec, class Scaler>
struct cuda_mirror {
  using cuda_type = cuda::optimizer<Rule, Prec, Scaler>;
  static constexpr bool kahan = std::is_same_v<typename Prec::master_rounding, kahan_summation>;
  std::vector<std::vector<typename Prec::param_t>> params;
  std::vector<typename Prec::grad_t> zero_grads;  // shared by every group: the host optimizer wants grads
  std::optional<mpopt::optimizer<Rule, Prec, Scaler>> host;

  template <class T>
  static std::vector<T> to_host(const T* device, std::size_t n, const char* what, cudaStream_t stream) {
    std::vector<T> v(n);
    if (n > 0)
      cuda::throw_if_cuda_error(cudaMemcpyAsync(v.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost, stream),
                                std::string("checkpoint: cudaMemcpyAsync(") + what + ", device to host)");
    cuda::throw_if_cuda_error(cudaStreamSynchronize(stream), "checkpoint: cudaStreamSynchronize");
    return v;
  }

  cuda_mirror(const cuda_type& opt, cudaStream_t stream) {
    std::size_t largest = 0;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) largest = std::max(largest, opt.size(g));
    zero_grads.assign(largest, typename Prec::grad_t{});
    std::vector<param_group<Rule, Prec>> groups;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      if (opt.local_range(g).size() != opt.size(g))
        throw error(status{errc::unsupported,
                           "checkpoint: group " + std::to_string(g) + " is sharded over " +
                               std::to_string(opt.layout(g).world) + " ranks (ZeRO stage " +
                               std::to_string(opt.zero().stage) +
                               "); checkpoints of a sharded CUDA optimizer are not implemented yet (one rank, or "
                               "stage 0, saves and loads)"});
      params.push_back(to_host(opt.local_params(g), opt.size(g), "params", stream));
      groups.push_back({params.back().data(), zero_grads.data(), opt.size(g), opt.tensor_sizes(g), opt.hparams(g)});
    }
    host.emplace(std::move(groups), opt.scaler_arguments(), opt.options());
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      const std::size_t n = opt.size(g);
      const auto master = to_host(opt.master(g), n, "master", stream);
      host->set_local_master(g, master.data(), n);
      if constexpr (kahan) {
        const auto compensation = to_host(opt.compensation(g), n, "compensation", stream);
        host->set_local_compensation(g, compensation.data(), n);
      }
      for (int j = 0; j < opt.num_states(g); ++j) {
        const auto state = to_host(opt.state(g, j), n, "optimizer state", stream);
        host->set_state(g, j, state.data(), n);
      }
    }
    host->set_step_count(opt.step_count(stream));
    host->set_scaler_state(opt.scaler_state(stream));
  }
};

template <class T>
void copy_to_device(T* device, const T* host, std::size_t n, const char* what, cudaStream_t stream) {
  if (n == 0) return;
  cuda::throw_if_cuda_error(cudaMemcpyAsync(device, host, n * sizeof(T), cudaMemcpyHostToDevice, stream),
                            std::string("checkpoint: cudaMemcpyAsync(") + what + ", host to device)");
}

}  // namespace detail

// Saves a CUDA optimizer's state as a single-rank host checkpoint. Throws mpopt::error.
template <class Rule, class Prec, class Scaler>
void save(cuda::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const save_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_mirror<Rule, Prec, Scaler> m(opt, stream);
  save(*m.host, dir, options);
}

// Loads any checkpoint of this rule (any world size and stage, either backend) into a CUDA optimizer. Throws
// mpopt::error, and then the device state is unchanged (a CUDA failure while copying back is the exception: the
// device may then hold part of the new state).
template <class Rule, class Prec, class Scaler>
void load(cuda::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const load_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_mirror<Rule, Prec, Scaler> m(opt, stream);
  load(*m.host, dir, options);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::size_t n = opt.size(g);
    detail::copy_to_device(opt.master(g), m.host->master(g), n, "master", stream);
    if constexpr (Prec::separate_master)  // the host rewrote its param copy from the loaded master
      detail::copy_to_device(opt.local_params(g), m.params[g].data(), n, "params", stream);
    if constexpr (detail::cuda_mirror<Rule, Prec, Scaler>::kahan)
      detail::copy_to_device(opt.compensation(g), m.host->compensation(g), n, "compensation", stream);
    for (int j = 0; j < opt.num_states(g); ++j)
      detail::copy_to_device(opt.state(g, j), m.host->state(g, j), n, "optimizer state", stream);
    if (options.restore_hparams) opt.set_hparams(g, m.host->hparams(g), stream);
  }
  opt.set_step_count(m.host->step_count(), stream);
  opt.set_scaler_state(m.host->scaler_state(), stream);  // synchronises `stream`: the copies above are done
}

}  // namespace mpopt::checkpoint
