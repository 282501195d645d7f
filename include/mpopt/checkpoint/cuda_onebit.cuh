// Checkpoints of mpopt::cuda::onebit::optimizer (1-bit Adam, 0/1 Adam, 1-bit LAMB on the GPU), in the host 1-bit
// optimizer's format (checkpoint/onebit.hpp): save() copies the device state (master, states, error-feedback buffers,
// 0/1 Adam's sync point, lr sum and schedule, 1-bit LAMB's per-tensor coefficients, step, scaler state,
// hyper-parameters) into a host mpopt::onebit::optimizer of the
// same rule, policy, scaler and world size and saves that; load() loads into such a host optimizer (every check of
// onebit.hpp, nothing changed on failure) and copies the state to the device. So a checkpoint moves between the
// backends, and between world sizes with onebit.hpp's rules (the error buffers are zeroed at another world size).
//
// With a communicator, save and load are collective: every rank calls them with the communicator's stream, and the
// host mirror's collectives go through the device communicator (detail::staged_host_comm). Both wait for `stream`
// and hold one host copy of the rank's state while they run. Momentum masks are configuration, not saved (as on the
// host).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../cuda/data_parallel.cuh"
#include "../cuda/onebit.cuh"
#include "../error.hpp"
#include "../onebit/optimizer.hpp"
#include "checkpoint.hpp"
#include "cuda_staging.cuh"
#include "onebit.hpp"

namespace mpopt::checkpoint {

namespace detail {

// A host 1-bit optimizer holding a copy of a CUDA one's state on this rank.
template <class Rule, class Prec, class Scaler>
struct cuda_onebit_mirror {
  using cuda_type = cuda::onebit::optimizer<Rule, Prec, Scaler>;
  using host_type = mpopt::onebit::optimizer<Rule, Prec, Scaler>;
  using param_t = typename Prec::param_t;
  static constexpr bool is_zero_one = std::is_same_v<Rule, zero_one_adam>;
  static constexpr bool is_lamb = std::is_same_v<Rule, onebit_lamb>;
  std::optional<staged_host_comm> comm;
  std::vector<std::vector<param_t>> params;
  std::vector<typename Prec::grad_t> zero_grads;  // shared by every group: the host optimizer wants grads
  std::optional<host_type> host;

  cuda_onebit_mirror(cuda_type& opt, cudaStream_t stream, const char* what) {
    if (opt.communicator() != nullptr) cuda::detail::check_comm_stream(*opt.communicator(), stream, what);
    std::size_t largest = 0;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) largest = std::max(largest, opt.size(g));
    zero_grads.assign(largest, typename Prec::grad_t{});
    std::vector<param_group<Rule, Prec>> groups;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      params.push_back(device_to_host(opt.params(g), opt.size(g), "params", stream));
      groups.push_back({params.back().data(), zero_grads.data(), opt.size(g), opt.tensor_sizes(g), opt.hparams(g)});
    }
    if (opt.communicator() != nullptr) {
      comm.emplace(*opt.communicator());
      host.emplace(std::move(groups), *comm, opt.scaler_arguments(), opt.options(), opt.onebit_options());
    } else {
      host.emplace(std::move(groups), opt.scaler_arguments(), opt.options(), opt.onebit_options());
    }
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      const std::size_t n = opt.size(g);
      host->set_master(g, device_to_host(opt.master(g), n, "master", stream).data(), n);
      for (int j = 0; j < opt.num_states(g); ++j)
        host->set_state(g, j, device_to_host(opt.state(g, j), n, "optimizer state", stream).data(), n);
      if constexpr (is_zero_one)
        host->set_sync_point(g, device_to_host(opt.sync_point(g), n, "sync point", stream).data(), n,
                             opt.accumulated_lr(g));
      if constexpr (is_lamb) host->set_lamb_state(g, opt.lamb_state(g, stream));
    }
    if (host->num_error_buffers() != opt.num_error_buffers())
      throw error(status::invalid("checkpoint: the CUDA optimizer has " + std::to_string(opt.num_error_buffers()) +
                                  " error buffers, its host mirror " + std::to_string(host->num_error_buffers())));
    for (std::size_t i = 0; i < opt.num_error_buffers(); ++i) {
      mpopt::onebit::error_feedback& he = host->errors(i);
      const cuda::onebit::error_feedback& de = opt.errors(i);
      if (he.worker.size() != de.worker.size() || he.server.size() != de.server.size())
        throw error(status::invalid("checkpoint: error buffer " + std::to_string(i) +
                                    " differs in size between the CUDA optimizer (" + std::to_string(de.worker.size()) +
                                    ", " + std::to_string(de.server.size()) + ") and its host mirror (" +
                                    std::to_string(he.worker.size()) + ", " + std::to_string(he.server.size()) + ")"));
      const auto worker = device_to_host(de.worker.get(), de.worker.size(), "worker error", stream);
      const auto server = device_to_host(de.server.get(), de.server.size(), "server error", stream);
      std::copy(worker.begin(), worker.end(), he.worker.data());
      std::copy(server.begin(), server.end(), he.server.data());
    }
    if constexpr (is_zero_one) host->set_schedule(opt.current_schedule());
    host->set_step_count(opt.step_count());
    host->set_scaler_state(opt.scaler_state(stream));
  }
};

}  // namespace detail

// Saves a CUDA 1-bit optimizer (collective with a communicator; `stream` is then the communicator's). Throws
// mpopt::error on every rank if any rank fails, and then the directory does not load.
template <class Rule, class Prec, class Scaler>
void save(cuda::onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const save_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_onebit_mirror<Rule, Prec, Scaler> m(opt, stream, "checkpoint save");
  save(std::as_const(*m.host), dir, options);
}

// Loads a 1-bit checkpoint of this rule (either backend, any world size: onebit.hpp's rules) into a CUDA 1-bit
// optimizer; collective with a communicator. Throws mpopt::error, and then the device state is unchanged (a CUDA
// failure while copying back is the exception: the device may then hold part of the new state).
template <class Rule, class Prec, class Scaler>
onebit_load_result load(cuda::onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir,
                        const load_options& options = {}, cudaStream_t stream = nullptr) {
  detail::cuda_onebit_mirror<Rule, Prec, Scaler> m(opt, stream, "checkpoint load");
  const onebit_load_result r = load(*m.host, dir, options);
  const auto& host = *m.host;
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::size_t n = opt.size(g);
    detail::host_to_device(opt.master(g), host.master(g), n, "master", stream);
    // set_master rewrote the mirror's params from the loaded master.
    if constexpr (Prec::separate_master) detail::host_to_device(opt.params(g), m.params[g].data(), n, "params", stream);
    for (int j = 0; j < opt.num_states(g); ++j)
      detail::host_to_device(opt.state(g, j), host.state(g, j), n, "optimizer state", stream);
    if constexpr (detail::cuda_onebit_mirror<Rule, Prec, Scaler>::is_zero_one) {
      detail::host_to_device(opt.sync_point(g), host.sync_point(g), n, "sync point", stream);
      opt.set_accumulated_lr(g, host.accumulated_lr(g));
    }
    if constexpr (detail::cuda_onebit_mirror<Rule, Prec, Scaler>::is_lamb)
      opt.set_lamb_state(g, host.lamb_state(g), stream);
    if (options.restore_hparams) opt.set_hparams(g, host.hparams(g), stream);
  }
  for (std::size_t i = 0; i < opt.num_error_buffers(); ++i) {
    const mpopt::onebit::error_feedback& he = host.errors(i);
    cuda::onebit::error_feedback& de = opt.errors(i);
    detail::host_to_device(de.worker.get(), he.worker.data(), de.worker.size(), "worker error", stream);
    detail::host_to_device(de.server.get(), he.server.data(), de.server.size(), "server error", stream);
  }
  if constexpr (detail::cuda_onebit_mirror<Rule, Prec, Scaler>::is_zero_one) opt.set_schedule(host.current_schedule());
  opt.set_step_count(host.step_count(), stream);
  opt.set_scaler_state(host.scaler_state(), stream);  // synchronises `stream`: the copies above are done
  return r;
}

}  // namespace mpopt::checkpoint
