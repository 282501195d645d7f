// Checkpoints of mpopt::cuda::optimizer, in the host optimizer's format (checkpoint.hpp): save() copies the device
// state (master, a kahan_summation master's compensation, states, step, scaler state, hyper-parameters, step options
// with the rounding seed) into a host mpopt::optimizer of the same rule, policy, scaler and ZeRO layout and saves
// that; load() loads into such a host optimizer (every check, conversion and reshard of checkpoint.hpp, nothing
// changed on failure) and copies the state to the device. So a checkpoint moves freely between the backends, world
// sizes and ZeRO stages.
//
// A CUDA optimizer with ZeRO gets a host mirror with its world size and stage, whose collectives go through the
// optimizer's device communicator (staged through device memory, detail::staged_host_comm): then save and load are
// collective, every rank calls them with the communicator's stream, and each rank holds its shard. Both synchronise
// `stream` and hold one host copy of the rank's state while they run (master, states and params, plus one group's
// worth of zero grads that the host optimizer requires and never reads).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../comm/communicator.hpp"
#include "../cuda/error.cuh"
#include "../cuda/memory.cuh"
#include "../cuda/optimizer.cuh"
#include "../optimizer.hpp"
#include "checkpoint.hpp"

namespace mpopt::checkpoint {

namespace detail {

// A host-memory communicator over a device one: every collective copies its host buffers to device scratch, runs
// there on the device communicator's stream, copies back and waits. For the few small or one-off collectives of a
// checkpoint, not for a training step.
class staged_host_comm final : public comm::communicator {
 public:
  explicit staged_host_comm(comm::communicator& device) : device_(device) {}
  int rank() const override { return device_.rank(); }
  int size() const override { return device_.size(); }
  comm::memory_space memory() const override { return comm::memory_space::host; }
  std::string name() const override { return "host staging over " + device_.name(); }

  void all_reduce(void* buf, std::size_t count, dtype t, comm::reduce_op op) override {
    scratch d(count * comm::dtype_size(t), buf, stream());
    device_.all_reduce(d.get(), count, t, op);
    d.back(buf);
  }
  void reduce_scatter(const void* send, void* recv, const std::size_t* counts, dtype t, comm::reduce_op op) override {
    const std::size_t es = comm::dtype_size(t), total = std::accumulate(counts, counts + size(), std::size_t(0));
    scratch in(total * es, send, stream()), out(counts[rank()] * es, nullptr, stream());
    device_.reduce_scatter(in.get(), out.get(), counts, t, op);
    out.back(recv);
  }
  void all_gather(void* buf, const std::size_t* counts, dtype t) override {
    scratch d(std::accumulate(counts, counts + size(), std::size_t(0)) * comm::dtype_size(t), buf, stream());
    device_.all_gather(d.get(), counts, t);
    d.back(buf);
  }
  void broadcast(void* buf, std::size_t count, dtype t, int root) override {
    scratch d(count * comm::dtype_size(t), buf, stream());
    device_.broadcast(d.get(), count, t, root);
    d.back(buf);
  }
  void barrier() override { device_.barrier(); }
  void all_to_all_bytes(const void* send, void* recv, std::size_t bytes_per_rank) override {
    check_all_to_all(send, recv, bytes_per_rank);
    const std::size_t total = bytes_per_rank * std::size_t(size());
    scratch in(total, send, stream()), out(total, nullptr, stream());
    device_.all_to_all_bytes(in.get(), out.get(), bytes_per_rank);
    out.back(recv);
  }
  void all_gather_bytes(void* buf, std::size_t bytes_per_rank) override {
    scratch d(bytes_per_rank * std::size_t(size()), buf, stream());
    device_.all_gather_bytes(d.get(), bytes_per_rank);
    d.back(buf);
  }
  using communicator::all_gather;
  using communicator::all_reduce;
  using communicator::broadcast;
  using communicator::reduce_scatter;

 private:
  cudaStream_t stream() const { return static_cast<cudaStream_t>(device_.device_stream()); }

  // `bytes` of device memory holding a copy of `from` (unless null), in the device communicator's stream order.
  class scratch {
   public:
    scratch(std::size_t bytes, const void* from, cudaStream_t stream)
        : data_(bytes, "checkpoint collective scratch"), stream_(stream) {
      if (from != nullptr && bytes > 0)
        cuda::throw_if_cuda_error(cudaMemcpyAsync(data_.get(), from, bytes, cudaMemcpyHostToDevice, stream_),
                                  "checkpoint: cudaMemcpyAsync(collective input, host to device)");
    }
    void* get() const noexcept { return data_.get(); }
    // Copies the result to `to` and waits for it.
    void back(void* to) const {
      if (data_.size() > 0)
        cuda::throw_if_cuda_error(cudaMemcpyAsync(to, data_.get(), data_.size(), cudaMemcpyDeviceToHost, stream_),
                                  "checkpoint: cudaMemcpyAsync(collective result, device to host)");
      cuda::throw_if_cuda_error(cudaStreamSynchronize(stream_), "checkpoint: cudaStreamSynchronize (collective)");
    }

   private:
    cuda::device_buffer<unsigned char> data_;
    cudaStream_t stream_;
  };

  comm::communicator& device_;
};

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
      if (opt.zero().stage < 3) {
        params.push_back(to_host(opt.params(g), opt.size(g), "params", stream));
      } else {  // the host optimizer takes only its own range from a stage-3 group's initial params
        const zero::range r = opt.local_range(g);
        const std::vector<param_t> local = to_host(opt.local_params(g), r.size(), "params", stream);
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

// Saves a CUDA optimizer's state: one rank's checkpoint, or with ZeRO every rank's shard (collective). Throws
// mpopt::error.
template <class Rule, class Prec, class Scaler>
void save(cuda::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const save_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_mirror<Rule, Prec, Scaler> m(opt, stream);
  save(*m.host, dir, options);
}

// Loads any checkpoint of this rule (any world size and stage, either backend) into a CUDA optimizer; collective with
// ZeRO. Throws mpopt::error, and then the device state is unchanged (a CUDA failure while copying back is the
// exception: the device may then hold part of the new state).
template <class Rule, class Prec, class Scaler>
void load(cuda::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const load_options& options = {},
          cudaStream_t stream = nullptr) {
  detail::cuda_mirror<Rule, Prec, Scaler> m(opt, stream);
  load(*m.host, dir, options);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const zero::range r = opt.local_range(g);
    detail::copy_to_device(opt.master(g), m.host->master(g), r.size(), "master", stream);
    // The host rewrote its param copy from the loaded master (every rank's range at stages 1-2; gathering is
    // collective at stage 3, a copy otherwise).
    std::vector<typename Prec::param_t> params(opt.size(g));
    m.host->gather_params(g, params.data());
    if (opt.zero().stage == 3) {
      detail::copy_to_device(opt.local_params(g), params.data() + r.begin, r.size(), "params", stream);
    } else {
      detail::copy_to_device(opt.params(g), params.data(), opt.size(g), "params", stream);
    }
    if constexpr (detail::cuda_mirror<Rule, Prec, Scaler>::kahan)
      detail::copy_to_device(opt.compensation(g), m.host->compensation(g), r.size(), "compensation", stream);
    for (int j = 0; j < opt.num_states(g); ++j)
      detail::copy_to_device(opt.state(g, j), m.host->state(g, j), r.size(), "optimizer state", stream);
    if (options.restore_hparams) opt.set_hparams(g, m.host->hparams(g), stream);
  }
  opt.set_step_count(m.host->step_count(), stream);
  opt.set_scaler_state(m.host->scaler_state(), stream);  // synchronises `stream`: the copies above are done
}

}  // namespace mpopt::checkpoint
