// mpopt::cuda::offload_optimizer: CPU offload (DeepSpeed's ZeRO-Offload, zero_optimization.offload_optimizer.device
// "cpu"). The model's params and grads stay on the device; the master weights and optimizer states live in host
// memory, where the host backend (mpopt::optimizer::step_pipelined) updates them with the same bits as
// mpopt::optimizer::step(). Device memory per param drops to the params and grads alone.
//
// One step, on three streams, in pieces of offload_options::piece_elements:
//   the caller's stream  wrote the grads (backward); the next forward waits on it for the updated params;
//   the d2h stream       copies the grads piece by piece into pinned host memory, after the caller's backward, with an
//                        event per piece;
//   the host             uses each piece as soon as its event completes: the grad statistics first when the step needs
//                        them (overflow check, clipping), then the update; without statistics every piece is updated
//                        as soon as it lands;
//   the h2d stream       copies each updated piece of params back as soon as the host finishes it, while later pieces
//                        still download or update (the copy engines run both directions at once).
// Pinned host memory holds whole copies of the grads and the params, so no piece ever waits for a staging buffer:
// (sizeof(grad_t) + sizeof(param_t)) bytes of pinned memory per param.
//
// step() returns when the host update is done and the uploads are enqueued; the caller's stream waits for them, the
// host does not. Checkpoints go through host(): checkpoint::save(opt.host(), dir); after checkpoint::load(opt.host(),
// dir) call upload_params(stream).
//
// Errors: construction throws mpopt::error (the host optimizer's messages; device pointers checked as
// mpopt::cuda::optimizer does). A CUDA failure during step() comes back in step_result::error: while the grads come
// in, before any update, nothing has changed; when an upload fails the host step has happened, the device params are
// stale, and upload_params() copies them again. With no grad statistics the pieces stream, and a failed download
// stops the update part-way (CUDA failures of that kind are sticky: the device context is lost anyway).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../scaler/scalers.hpp"
#include "error.cuh"
#include "memory.cuh"

namespace mpopt::cuda {

struct offload_options {
  // Elements per copy and per host update piece; a multiple of host::reduce_block (4096). 4 M elements is 8-16 MB a
  // copy, long enough to run the bus at full speed and short enough that the first piece starts updating early.
  std::size_t piece_elements = std::size_t(1) << 22;
};

template <class Rule, class Prec, class Scaler = no_scaler>
class offload_optimizer {
 public:
  using host_type = mpopt::optimizer<Rule, Prec, Scaler>;
  using group_type = param_group<Rule, Prec>;  // params and grads: device pointers
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  using scaler_args = typename Scaler::args;

  // Copies the params' initial values from the device (waiting for the device: construction synchronises), builds
  // the host optimizer over pinned copies, and creates the streams and events.
  explicit offload_optimizer(std::vector<group_type> groups, scaler_args scaler = {}, step_options options = {},
                             offload_options offload = {})
      : offload_(offload) {
    if (offload_.piece_elements == 0 || offload_.piece_elements % host::reduce_block != 0)
      throw error(status::invalid("offload_options.piece_elements must be a positive multiple of " +
                                  std::to_string(host::reduce_block) + ", got " +
                                  std::to_string(offload_.piece_elements)));
    for (std::size_t g = 0; g < groups.size(); ++g) throw_if_error(mpopt::detail::validate_group(groups[g], g));
    // The initial params may still be written on any stream; cudaMemcpy below waits only for the default one.
    throw_if_cuda_error(cudaDeviceSynchronize(), "cudaDeviceSynchronize (offload construction)");
    int device = 0;
    throw_if_cuda_error(cudaGetDevice(&device), "cudaGetDevice");
    std::vector<group_type> host_groups = groups;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const group_type& spec = groups[g];
      if (spec.size > 0) {
        throw_if_error(detail::check_device_pointer(spec.params, "params", g, device));
        throw_if_error(detail::check_device_pointer(spec.grads, "grads", g, device));
      }
      const std::string which = "group " + std::to_string(g);
      host_params_.emplace_back(spec.size, "offload params of " + which);
      host_grads_.emplace_back(spec.size, "offload grads of " + which);
      if (spec.size > 0)
        throw_if_cuda_error(
            cudaMemcpy(host_params_.back().get(), spec.params, spec.size * sizeof(param_t), cudaMemcpyDeviceToHost),
            "cudaMemcpy(initial params of " + which + ", device to host)");
      host_groups[g].params = host_params_.back().get();
      host_groups[g].grads = host_grads_.back().get();
      std::size_t first = pieces_.size();
      for (std::size_t b = 0; b < spec.size; b += offload_.piece_elements) pieces_.push_back(b);
      first_piece_.push_back(first);
    }
    first_piece_.push_back(pieces_.size());
    devices_ = std::move(groups);
    host_.emplace(std::move(host_groups), scaler, options);
    d2h_ = make_nonblocking_stream("offload d2h");
    h2d_ = make_nonblocking_stream("offload h2d");
    grads_in_.reserve(pieces_.size());
    for (std::size_t k = 0; k < pieces_.size(); ++k) grads_in_.push_back(make_ordering_event("offload grads in"));
    backward_done_ = make_ordering_event("offload backward done");
    params_out_ = make_ordering_event("offload params out");
  }

  offload_optimizer(const offload_optimizer&) = delete;
  offload_optimizer& operator=(const offload_optimizer&) = delete;

  // One step over the grads `stream` has written. Blocks the calling thread for the host update; `stream` then
  // waits for the uploaded params, so the next forward enqueued on it sees them.
  step_result step(cudaStream_t stream) {
    first_failure fail;
    // Every download is enqueued first: the copy engine runs ahead of the host. The downloads also wait for the
    // previous step's uploads, so the host never rewrites a param piece that is still being copied, even when this
    // step's stream is not the last one's.
    bool enqueued = fail(cudaEventRecord(backward_done_.get(), stream), "step: cudaEventRecord(backward done)") &&
                    fail(cudaStreamWaitEvent(d2h_.get(), backward_done_.get(), 0), "step: cudaStreamWaitEvent(d2h)") &&
                    fail(cudaStreamWaitEvent(d2h_.get(), params_out_.get(), 0), "step: cudaStreamWaitEvent(d2h)");
    for (std::size_t g = 0; g < devices_.size() && enqueued; ++g) {
      for (std::size_t k = first_piece_[g]; k < first_piece_[g + 1] && enqueued; ++k) {
        const zero::range r = piece(g, k);
        enqueued = fail(cudaMemcpyAsync(host_grads_[g].get() + r.begin, devices_[g].grads + r.begin,
                                        r.size() * sizeof(grad_t), cudaMemcpyDeviceToHost, d2h_.get()),
                        "step: cudaMemcpyAsync(grads of group " + std::to_string(g) + ", device to host)") &&
                   fail(cudaEventRecord(grads_in_[k].get(), d2h_.get()), "step: cudaEventRecord(grads in)");
      }
    }
    if (!enqueued) return failed(fail.first);
    struct download_failed {};
    bool uploads_ok = true, updated = false;
    step_result result;
    try {
      result = host().step_pipelined(
          offload_.piece_elements,
          [&](std::size_t g, std::size_t begin, std::size_t) {
            if (!fail(cudaEventSynchronize(grads_in_[first_piece_[g] + begin / offload_.piece_elements].get()),
                      "step: cudaEventSynchronize(grads of group " + std::to_string(g) + ")"))
              throw download_failed{};
          },
          [&](std::size_t g, std::size_t begin, std::size_t end) {
            updated = true;
            if (uploads_ok) uploads_ok = upload(g, zero::range{begin, end}, fail);
          });
    } catch (const download_failed&) {
      hand_params_to(stream, fail, "step");  // the uploads enqueued before the failure come before `stream`'s work
      if (!updated) return failed(fail.first);
      // Without grad statistics the host updates each piece as it arrives: the ones before the failure were.
      result.error = status{fail.first.code, fail.first.message +
                                                 " (the step was applied to the pieces downloaded before the failure "
                                                 "only: load a checkpoint)"};
      return result;
    }
    hand_params_to(stream, fail, "step");
    if (!fail.first.ok())
      result.error = status{fail.first.code, fail.first.message +
                                                 " (the host step was applied; the device params are "
                                                 "stale until upload_params() succeeds)"};
    return result;
  }

  // Copies every param from the host copy to the device (after checkpoint::load(host(), ...), or a failed upload);
  // `stream` waits for the copies. Throws mpopt::error on a CUDA failure.
  void upload_params(cudaStream_t stream) {
    first_failure fail;
    // The h2d stream first waits for whatever `stream` did with the params.
    bool ok = fail(cudaEventRecord(backward_done_.get(), stream), "upload_params: cudaEventRecord") &&
              fail(cudaStreamWaitEvent(h2d_.get(), backward_done_.get(), 0), "upload_params: cudaStreamWaitEvent(h2d)");
    for (std::size_t g = 0; g < devices_.size() && ok; ++g) ok = upload(g, zero::range{0, devices_[g].size}, fail);
    if (ok) hand_params_to(stream, fail, "upload_params");
    throw_if_error(fail.first);
  }

  // The host optimizer: master weights, states, scaler, hyper-parameters, checkpoints. Its param copy is the pinned
  // host copy of the params; after changing it (load, set_master) call upload_params().
  host_type& host() { return *host_; }
  const host_type& host() const { return *host_; }
  const offload_options& options() const noexcept { return offload_; }

  // Bytes by place: the host optimizer's report (its params and grads are the pinned copies) and the device's.
  struct offload_memory {
    memory_report host;
    std::size_t pinned = 0;  // of host.params + host.grads
    std::size_t device = 0;  // the caller's params and grads
  };
  offload_memory memory() const {
    offload_memory m{host().memory(), 0, 0};
    for (std::size_t g = 0; g < devices_.size(); ++g) {
      m.pinned += host_params_[g].bytes() + host_grads_[g].bytes();
      m.device += devices_[g].size * (sizeof(param_t) + sizeof(grad_t));
    }
    return m;
  }

 private:
  zero::range piece(std::size_t g, std::size_t k) const {
    const std::size_t b = pieces_[k];
    return {b, std::min(devices_[g].size, b + offload_.piece_elements)};
  }

  // The first CUDA failure of a sequence of calls (each call's check returns whether it succeeded).
  struct first_failure {
    status first = status::success();
    bool operator()(cudaError_t e, const std::string& what) {
      if (e != cudaSuccess && first.ok()) first = to_status(e, what);
      return e == cudaSuccess;
    }
  };

  // `stream` waits for every copy enqueued on the h2d stream so far.
  bool hand_params_to(cudaStream_t stream, first_failure& fail, const std::string& who) {
    return fail(cudaEventRecord(params_out_.get(), h2d_.get()), who + ": cudaEventRecord(params out)") &&
           fail(cudaStreamWaitEvent(stream, params_out_.get(), 0), who + ": cudaStreamWaitEvent(caller's stream)");
  }

  bool upload(std::size_t g, zero::range r, first_failure& fail) {
    if (r.empty()) return true;
    return fail(cudaMemcpyAsync(devices_[g].params + r.begin, host_params_[g].get() + r.begin,
                                r.size() * sizeof(param_t), cudaMemcpyHostToDevice, h2d_.get()),
                "cudaMemcpyAsync(params of group " + std::to_string(g) + ", host to device)");
  }

  static step_result failed(const status& failure) {
    step_result r;
    r.error = status{failure.code, failure.message + " (nothing was changed)"};
    return r;
  }

  offload_options offload_;
  std::vector<group_type> devices_;                  // the caller's groups: device params and grads
  std::vector<pinned_buffer<param_t>> host_params_;  // per group: the host optimizer's param copy
  std::vector<pinned_buffer<grad_t>> host_grads_;    // per group: where the grads land
  std::vector<std::size_t> pieces_;                  // per piece: its first element in its group
  std::vector<std::size_t> first_piece_;             // per group: its first piece; one more at the end
  std::optional<host_type> host_;                    // built after the pinned buffers it points to
  // Destroyed before the pinned buffers, each stream after its pending copies.
  owned_stream d2h_, h2d_;
  std::vector<ordering_event> grads_in_;  // per piece
  ordering_event backward_done_, params_out_;
};

}  // namespace mpopt::cuda
