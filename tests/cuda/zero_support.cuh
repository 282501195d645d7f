// Shared by the CUDA ZeRO tests (test_cuda_zero.cu over threaded ranks on one GPU, test_nccl_zero.cu over NCCL at one
// rank): a two-group layout, the grads every rank feeds, and one rank's run of mpopt::cuda::optimizer recorded step
// by step, with ZeRO or (comm == nullptr) without: the reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bitwise_support.cuh"
#include "mpopt/checkpoint/cuda.cuh"
#include "mpopt/cuda/optimizer.cuh"

namespace mpopt_test {

// Two groups: one with a zero-sized and a one-element tensor, one flat; at 3 and 4 ranks some shards are empty.
struct zero_layout {
  std::vector<std::size_t> sizes = {12001, 8229};
  std::vector<std::vector<std::size_t>> tensors = {{3000, 0, 1, 9000}, {}};
  std::size_t num_tensors(std::size_t g) const { return tensors[g].empty() ? 1 : tensors[g].size(); }
  std::vector<std::size_t> offsets(std::size_t g) const {
    std::vector<std::size_t> o{0};
    if (tensors[g].empty()) {
      o.push_back(sizes[g]);
    } else {
      for (std::size_t n : tensors[g]) o.push_back(o.back() + n);
    }
    return o;
  }
};

inline constexpr int num_steps = 6;
inline constexpr int overflow_step = 2;           // dynamic scaler only: an inf on the last rank
inline constexpr std::size_t overflow_at = 5000;  // in group 0
inline constexpr std::size_t bucket = 3000;       // several buckets per group, not aligned with the shards

template <class T>
std::vector<T> seeded_values(std::size_t n, std::uint64_t seed, float scale) {
  rng gen(seed);
  std::vector<T> v(n);
  for (auto& x : v) x = mpopt::convert<T>(gen.signed_value() * scale);
  return v;
}

// What one rank (or the reference) saw after every step.
template <class Prec>
struct zero_trajectory {
  using P = typename Prec::param_t;
  using M = typename Prec::master_t;
  using S = typename Prec::state_t;
  std::vector<mpopt::step_result> results;
  std::vector<std::vector<std::vector<P>>> params;  // [step][group], the full group
  std::vector<std::vector<std::vector<M>>> master;  // [step][group], local_range only
  std::vector<std::vector<std::vector<S>>> state0;  // [step][group], local_range only
  std::vector<mpopt::zero::range> local;            // per group
};

// A stream of the test's own, as a framework's forward pass would use (not the communicator's).
struct consumer_stream {
  cudaStream_t stream = nullptr;
  consumer_stream() { MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream)); }
  consumer_stream(const consumer_stream&) = delete;
  consumer_stream& operator=(const consumer_stream&) = delete;
  ~consumer_stream() { (void)cudaStreamDestroy(stream); }
};

template <class Rule, class Prec, class Scaler>
struct zero_setup {
  using P = typename Prec::param_t;
  using G = typename Prec::grad_t;
  using opt_t = mpopt::cuda::optimizer<Rule, Prec, Scaler>;
  zero_layout shape;
  typename Rule::args hparams{};
  typename Scaler::args scaler{};
  mpopt::step_options options{};
  float grad_scale = 1.0f;

  std::vector<P> initial_params(std::size_t g) const { return seeded_values<P>(shape.sizes[g], 100 + g, 2.0f); }
  // The grads every rank feeds at `step`; `inf` plants the overflow.
  std::vector<G> global_grads(std::size_t g, int step, bool inf) const {
    std::vector<G> v = seeded_values<G>(shape.sizes[g], 1000 * std::uint64_t(step + 1) + g, grad_scale);
    if (inf && g == 0) v[overflow_at] = mpopt::convert<G>(INFINITY);
    return v;
  }
  bool overflow_here(int step, int rank, int world) const {
    return Scaler::skips_on_overflow(scaler) && step == overflow_step && rank == world - 1;
  }

  // A checkpoint in the middle of a run: steps [0, first_step) are skipped and the state loaded from load_dir
  // instead; after step save_after the state is saved to save_dir.
  struct resume {
    int first_step = 0;
    std::string load_dir;
    int save_after = -1;
    std::string save_dir;
  };

  // One rank's run. comm == nullptr: the reference, no ZeRO. Stages 2-3 feed odd steps through reduce_grads(), one
  // tensor at a time, and even steps through param_group::grads. Stage 3 reads the params as a forward pass on a
  // stream of its own would: gathered on that stream, and on odd steps prefetched first. Records steps
  // [first_step, num_steps).
  zero_trajectory<Prec> run(mpopt::comm::communicator* comm, cudaStream_t stream, int stage, int rank, int world,
                            const resume& ckpt = {}) const {
    using M = typename Prec::master_t;
    using S = typename Prec::state_t;
    const std::size_t ng = shape.sizes.size();
    std::vector<device_buffer<P>> params;
    std::vector<device_buffer<G>> grads;
    std::vector<mpopt::param_group<Rule, Prec>> groups;
    for (std::size_t g = 0; g < ng; ++g) {
      params.push_back(to_device(initial_params(g)));
      grads.push_back(device_buffer<G>(shape.sizes[g], "test grads"));
      groups.push_back({params[g].get(), grads[g].get(), shape.sizes[g], shape.tensors[g], hparams});
    }
    mpopt::zero_options zero;
    zero.stage = stage;
    zero.bucket_elements = bucket;
    opt_t opt =
        comm == nullptr ? opt_t(groups, scaler, options, stream) : opt_t(groups, *comm, zero, scaler, options, stream);
    zero_trajectory<Prec> out;
    for (std::size_t g = 0; g < ng; ++g) out.local.push_back(opt.local_range(g));
    const consumer_stream forward;
    if (!ckpt.load_dir.empty()) mpopt::checkpoint::load(opt, ckpt.load_dir, {}, stream);
    for (int step = ckpt.first_step; step < num_steps; ++step) {
      const bool inf = comm == nullptr ? overflow_here(step, world - 1, world) : overflow_here(step, rank, world);
      const bool through_reduce = comm != nullptr && stage >= 2 && step % 2 == 1;
      for (std::size_t g = 0; g < ng; ++g) {
        const std::vector<G> h = global_grads(g, step, inf);
        MPOPT_CUDA_REQUIRE(cudaMemcpy(grads[g].get(), h.data(), h.size() * sizeof(G), cudaMemcpyHostToDevice));
        if (through_reduce) {
          const std::vector<std::size_t> o = shape.offsets(g);
          for (std::size_t t = 0; t + 1 < o.size(); ++t) opt.reduce_grads(g, t, t + 1, grads[g].get() + o[t], stream);
        }
      }
      opt.step(stream);
      REQUIRE(opt.last_error().ok());
      out.results.push_back(opt.result(stream));
      std::vector<std::vector<P>> p;
      std::vector<std::vector<M>> m;
      std::vector<std::vector<S>> s0;
      const bool gathers = comm != nullptr && stage == 3;
      if (gathers && step % 2 == 1)
        for (std::size_t g = 0; g < ng; ++g) CHECK(opt.prefetch(g, 0, shape.num_tensors(g)));
      for (std::size_t g = 0; g < ng; ++g) {
        const std::size_t n = shape.sizes[g];
        if (gathers) {
          const P* full = opt.gather(g, 0, shape.num_tensors(g), forward.stream);
          MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(forward.stream));
          p.push_back(to_host(full, n));
          opt.release(g, 0, shape.num_tensors(g), forward.stream);
        } else {
          MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(stream));
          p.push_back(to_host(params[g].get(), n));
        }
        m.push_back(to_host(opt.master(g), out.local[g].size()));
        s0.push_back(to_host(opt.state(g, 0), out.local[g].size()));
      }
      if (gathers) CHECK(opt.live_elements() == 0);
      out.params.push_back(std::move(p));
      out.master.push_back(std::move(m));
      out.state0.push_back(std::move(s0));
      if (step == ckpt.save_after) mpopt::checkpoint::save(opt, ckpt.save_dir, {}, stream);
    }
    return out;
  }
};

// One rank's run against the reference, bit for bit: step results, the full params, and the master and first state
// over the rank's local range.
// A run resumed at first_step is compared from there.
template <class Rule, class Prec, class Scaler>
void check_same_trajectory(const zero_setup<Rule, Prec, Scaler>& s, const zero_trajectory<Prec>& t,
                           const zero_trajectory<Prec>& ref, int first_step = 0) {
  REQUIRE(t.results.size() == std::size_t(num_steps - first_step));
  for (int step = first_step; step < num_steps; ++step) {
    INFO("step ", step);
    const std::size_t i = std::size_t(step - first_step);
    const mpopt::step_result &a = t.results[i], &b = ref.results[std::size_t(step)];
    CHECK(a.applied == b.applied);
    CHECK(a.reason == b.reason);
    CHECK(a.step == b.step);
    CHECK(a.loss_scale == b.loss_scale);
    CHECK(a.next_loss_scale == b.next_loss_scale);
    for (std::size_t g = 0; g < s.shape.sizes.size(); ++g) {
      INFO("group ", g);
      CHECK_SAME_BITS(t.params[i][g], ref.params[std::size_t(step)][g], "params");
      const mpopt::zero::range r = t.local[g];
      const auto& rm = ref.master[std::size_t(step)][g];
      const auto& rs = ref.state0[std::size_t(step)][g];
      CHECK_SAME_BITS(t.master[i][g],
                      std::vector<typename Prec::master_t>(rm.begin() + std::ptrdiff_t(r.begin),
                                                           rm.begin() + std::ptrdiff_t(r.end)),
                      "master (local range)");
      CHECK_SAME_BITS(
          t.state0[i][g],
          std::vector<typename Prec::state_t>(rs.begin() + std::ptrdiff_t(r.begin), rs.begin() + std::ptrdiff_t(r.end)),
          "state 0 (local range)");
    }
  }
}

// The reference run, on a stream of its own.
template <class Rule, class Prec, class Scaler>
zero_trajectory<Prec> reference_run(const zero_setup<Rule, Prec, Scaler>& s) {
  cudaStream_t stream = nullptr;
  MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream));
  zero_trajectory<Prec> ref = s.run(nullptr, stream, 0, 0, 1);
  MPOPT_CUDA_REQUIRE(cudaStreamDestroy(stream));
  return ref;
}

}  // namespace mpopt_test
