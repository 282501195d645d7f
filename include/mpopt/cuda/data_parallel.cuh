// What the CUDA optimizers that talk to other ranks share: the exact grad mean over a device-memory communicator
// (mpopt::optimizer::reduce_range on the device: ZeRO's grad reduction, the 1-bit optimizers' exact steps), bucketed
// collectives, and the check that the step's kernels and the collectives are ordered on one stream.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "../comm/communicator.hpp"
#include "../error.hpp"
#include "../numeric/accumulate.hpp"
#include "../optimizer.hpp"
#include "../zero/partition.hpp"
#include "error.cuh"
#include "memory.cuh"
#include "update.cuh"

namespace mpopt::cuda::detail {

// The collectives are ordered on the communicator's stream: the optimizer's launches must be too.
inline void check_comm_stream(const comm::communicator& comm, cudaStream_t stream, const char* what) {
  if (static_cast<void*>(stream) == comm.device_stream()) return;
  throw error(status::invalid(std::string(what) + ": stream " + pointer_text(stream) +
                              " is not the communicator's stream " + pointer_text(comm.device_stream()) +
                              " (the collectives and the step's kernels must be ordered on one stream)"));
}

// Max-reduces a layout's words (mpopt::detail::layout_hash) through device memory and throws on every rank when they
// differ (`what` names the layout; null: the groups'). Waits for `stream`.
inline void check_same_words(comm::communicator& comm, double (&v)[4], const char* what, cudaStream_t stream) {
  device_buffer<double> d(4, "layout check");
  copy_to_device(d.get(), v, sizeof v, "layout check", stream);
  comm.all_reduce(d.get(), 4, comm::reduce_op::max);
  copy_from_device(v, d.get(), sizeof v, "layout check", stream);
  if (what == nullptr) {
    mpopt::detail::check_layout_words(v);
  } else {
    mpopt::detail::check_layout_words(v, what);
  }
}

// mpopt::detail::check_same_layout through device memory: throws on every rank when the ranks' group layouts (tagged
// with `tag`, the ZeRO stage or -1) differ. Waits for `stream`.
template <class Rule, class Prec>
void check_same_layout(comm::communicator& comm, int tag, const std::vector<param_group<Rule, Prec>>& groups,
                       cudaStream_t stream) {
  if (comm.size() == 1) return;
  double v[4];
  mpopt::detail::layout_words(tag, groups, v);
  check_same_words(comm, v, nullptr, stream);
}

// The workspace of bucketed grad means and gathers over one communicator: grads widened to R (fp32, fp64 for fp32
// grads) in pieces of at most bucket_elements.
template <class R>
class grad_mean {
 public:
  grad_mean() = default;
  // `largest`: the most elements one call reduces (0: gathers only, no workspace).
  grad_mean(comm::communicator& comm, std::size_t largest, std::size_t bucket_elements)
      : comm_(&comm), bucket_(bucket_elements) {
    const std::size_t n = std::min(largest, bucket_elements);
    send_ = device_buffer<R>(n, "grad reduction send buffer");
    recv_ = device_buffer<R>(n, "grad reduction receive buffer");
  }

  // Grads g[0, r.size()) (group elements r, split over the ranks by `part`) widened, reduce-scattered over every rank
  // and this rank's part averaged into out (group element i at out[i - out_begin]), or added to what is there
  // (store_mean). With gather_means (out_begin 0) the rounded means are all-gathered, so every rank holds the same
  // bits. Launch failures go to `kept`; a collective that cannot be enqueued throws.
  template <class G, class Out>
  void reduce(const zero::partition& part, zero::range r, const G* g, Out* out, std::size_t out_begin, bool accumulate,
              bool gather_means, status& kept, cudaStream_t stream) {
    const int rank = comm_->rank();
    for_each_bucket(r, [&](zero::range piece) {
      keep_first_error(kept, launch_convert(send_.get(), g + (piece.begin - r.begin), piece.size(), stream),
                       "step: launch of the grad widening kernel");
      part.counts(piece, counts_);
      comm_->reduce_scatter(send_.get(), recv_.get(), counts_, comm::reduce_op::sum);
      const zero::range mine = zero::intersect(piece, part.owned(rank));
      keep_first_error(kept,
                       launch_store_mean(out + (mine.begin - out_begin), recv_.get(), mine.size(), R(comm_->size()),
                                         accumulate, stream),
                       "step: launch of the grad averaging kernel");
      if (gather_means) comm_->all_gather(out + piece.begin, counts_);
    });
  }

  // In place: buf holds group elements r, this rank's own (by `part`) already in place.
  template <class T>
  void all_gather(const zero::partition& part, zero::range r, T* buf) {
    for_each_bucket(r, [&](zero::range piece) {
      part.counts(piece, counts_);
      comm_->all_gather(buf + (piece.begin - r.begin), counts_);
    });
  }

  // Device bytes of the workspace.
  std::size_t bytes() const noexcept { return send_.bytes() + recv_.bytes(); }

 private:
  template <class F>
  void for_each_bucket(zero::range r, F&& f) const {
    for (std::size_t b = r.begin; b < r.end; b += bucket_) f(zero::range{b, std::min(r.end, b + bucket_)});
  }

  comm::communicator* comm_ = nullptr;
  std::size_t bucket_ = 1;
  device_buffer<R> send_, recv_;
  std::vector<std::size_t> counts_;  // per-rank counts of one collective
};

}  // namespace mpopt::cuda::detail
