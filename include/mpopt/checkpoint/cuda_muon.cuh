// Checkpoints of mpopt::cuda::muon_optimizer, in the host Muon format (checkpoint/muon.hpp): save() copies the device
// state (every tensor's master, a kahan_summation master's compensation, momentum and AdamW states, the step, the
// scaler state, the hyper-parameters) into a host mpopt::muon_optimizer of the same policy, scaler and Gemm and saves
// that; load() loads into such a host optimizer (every check of muon.hpp, nothing changed on failure) and copies the
// state to the device. So a checkpoint moves between the backends and, through the host optimizer, between world
// sizes and ZeRO stages. With ZeRO the mirror has the optimizer's world size, stage and owners and talks through its
// communicator (detail::staged_host_comm): save and load are collective, on the communicator's stream, and each rank
// writes and reads the tensors it holds. Both wait for `stream` and hold one host copy of the state while they run.
//
// The CUDA optimizer fixes ns_steps and ns_coefficients at construction (its GEMM batches): a checkpoint whose
// hyper-parameters change them is refused by load() with restore_hparams, before anything on the device changes.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cuda/data_parallel.cuh"
#include "../cuda/muon.cuh"
#include "../error.hpp"
#include "../muon.hpp"
#include "checkpoint.hpp"
#include "cuda_staging.cuh"
#include "muon.hpp"

namespace mpopt::checkpoint {

namespace detail {

// A host Muon optimizer holding a copy of a CUDA one's state on this rank: the same world size, stage and owners.
template <class Prec, class Scaler, class Gemm>
struct cuda_muon_mirror {
  using cuda_type = cuda::muon_optimizer<Prec, Scaler, Gemm>;
  using host_type = mpopt::muon_optimizer<Prec, Scaler, Gemm>;
  using param_t = typename Prec::param_t;
  static constexpr bool kahan = std::is_same_v<typename Prec::master_rounding, kahan_summation>;

  std::optional<staged_host_comm> comm;
  std::vector<std::vector<param_t>> matrix_params, aux_params;  // whole groups (every rank has all params)
  std::vector<typename Prec::grad_t> zero_grads;                // shared: the host optimizer wants grads
  std::optional<host_type> host;

  cuda_muon_mirror(const cuda_type& opt, cudaStream_t stream, const char* what) {
    if (opt.communicator() != nullptr) cuda::detail::check_comm_stream(*opt.communicator(), stream, what);
    std::size_t largest = 0;
    for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g) largest = std::max(largest, opt.matrix_group(g).size());
    for (std::size_t g = 0; g < opt.num_aux_groups(); ++g) largest = std::max(largest, opt.aux_group(g).size);
    zero_grads.assign(largest, typename Prec::grad_t{});
    std::vector<muon_group<Prec>> matrices;
    for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g) {
      muon_group<Prec> spec = opt.matrix_group(g);
      matrix_params.push_back(device_to_host(static_cast<const param_t*>(spec.params), spec.size(), "params", stream));
      spec.params = matrix_params.back().data();
      spec.grads = zero_grads.data();
      matrices.push_back(spec);
    }
    std::vector<param_group<adamw, Prec>> aux;
    for (std::size_t g = 0; g < opt.num_aux_groups(); ++g) {
      param_group<adamw, Prec> spec = opt.aux_group(g);
      aux_params.push_back(device_to_host(static_cast<const param_t*>(spec.params), spec.size, "params", stream));
      spec.params = aux_params.back().data();
      spec.grads = zero_grads.data();
      aux.push_back(spec);
    }
    if (opt.communicator() != nullptr) {
      comm.emplace(*opt.communicator());
      host.emplace(std::move(matrices), std::move(aux), *comm, opt.zero(), opt.scaler_arguments(), opt.options());
    } else {
      host.emplace(std::move(matrices), std::move(aux), opt.scaler_arguments(), opt.options());
    }
    for_each_held_tensor(opt, [&](muon_part part, std::size_t g, std::size_t t, std::size_t n) {
      host->set_local_master(part, g, t, device_to_host(opt.master(part, g, t), n, "master", stream).data(), n);
      if constexpr (kahan)
        host->set_local_compensation(part, g, t,
                                     device_to_host(opt.compensation(part, g, t), n, "compensation", stream).data(), n);
      for (int j = 0; j < opt.num_states(part, g); ++j)
        host->set_state(part, g, t, j, device_to_host(opt.state(part, g, t, j), n, "optimizer state", stream).data(),
                        n);
    });
    host->set_step_count(opt.step_count(stream));
    host->set_scaler_state(opt.scaler_state(stream));
  }

  // f(part, g, t, size) for every tensor this rank holds.
  template <class F>
  static void for_each_held_tensor(const cuda_type& opt, F&& f) {
    for (muon_part part : {muon_part::matrices, muon_part::aux}) {
      const std::size_t groups = part == muon_part::matrices ? opt.num_matrix_groups() : opt.num_aux_groups();
      for (std::size_t g = 0; g < groups; ++g)
        for (std::size_t t = 0; t < opt.num_tensors(part, g); ++t)
          if (opt.holds(part, g, t)) f(part, g, t, opt.tensor_size(part, g, t));
    }
  }
};

}  // namespace detail

// Saves a CUDA Muon optimizer's state: one GPU's, or with ZeRO every rank's tensors (collective; `stream` is then the
// communicator's). Waits for `stream`. Throws mpopt::error.
template <class Prec, class Scaler, class Gemm>
void save(cuda::muon_optimizer<Prec, Scaler, Gemm>& opt, const std::string& dir, const save_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_muon_mirror<Prec, Scaler, Gemm> m(opt, stream, "checkpoint save");
  save(std::as_const(*m.host), dir, options);
}

// Loads a Muon checkpoint (either backend, any world size and stage 0-2) into a CUDA Muon optimizer; collective with
// ZeRO. Throws mpopt::error, and then the device state is unchanged (a CUDA failure while copying back is the
// exception: the device may then hold part of the new state).
template <class Prec, class Scaler, class Gemm>
void load(cuda::muon_optimizer<Prec, Scaler, Gemm>& opt, const std::string& dir, const load_options& options = {},
          cudaStream_t stream = nullptr) {
  using mirror = detail::cuda_muon_mirror<Prec, Scaler, Gemm>;
  mirror m(opt, stream, "checkpoint load");
  load(*m.host, dir, options);  // ends with the params all-gathered from their owners
  const auto& host = *m.host;
  if (options.restore_hparams)
    for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g)
      if (!mpopt::detail::same_newton_schulz(host.matrix_hparams(g), opt.matrix_hparams(g)))
        throw error(status{errc::unsupported,
                           dir + ": matrix group " + std::to_string(g) +
                               " was saved with other ns_steps or ns_coefficients; the CUDA optimizer fixes them at "
                               "construction: construct it with the saved ones, or load with restore_hparams = false"});
  mirror::for_each_held_tensor(opt, [&](muon_part part, std::size_t g, std::size_t t, std::size_t n) {
    detail::host_to_device(opt.master(part, g, t), host.master(part, g, t), n, "master", stream);
    if constexpr (mirror::kahan)
      detail::host_to_device(opt.compensation(part, g, t), host.compensation(part, g, t), n, "compensation", stream);
    for (int j = 0; j < opt.num_states(part, g); ++j)
      detail::host_to_device(opt.state(part, g, t, j), host.state(part, g, t, j), n, "optimizer state", stream);
  });
  for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g)
    detail::host_to_device(opt.matrix_group(g).params, m.matrix_params[g].data(), m.matrix_params[g].size(), "params",
                           stream);
  for (std::size_t g = 0; g < opt.num_aux_groups(); ++g)
    detail::host_to_device(opt.aux_group(g).params, m.aux_params[g].data(), m.aux_params[g].size(), "params", stream);
  if (options.restore_hparams) {
    for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g) opt.set_matrix_hparams(g, host.matrix_hparams(g), stream);
    for (std::size_t g = 0; g < opt.num_aux_groups(); ++g) opt.set_aux_hparams(g, host.aux_hparams(g), stream);
  }
  opt.set_step_count(host.step_count(), stream);
  opt.set_scaler_state(host.scaler_state(), stream);  // synchronises `stream`: the copies above are done
}

}  // namespace mpopt::checkpoint
