// mpopt::cuda::onebit::optimizer (1-bit Adam, 0/1 Adam, 1-bit LAMB) against the host mpopt::onebit::optimizer, bit
// for bit, at one GPU and at 2-4 ranks (threads on one GPU, threaded_comm.cuh). The host optimizer of each rank talks
// through the same device communicator staged to host memory (checkpoint::detail::staged_host_comm), so both see the
// same ranks. Built with --fmad=false (tests/CMakeLists.txt), as the host is with -ffp-contract=off: the same
// operations in the same order give the same bits, through warm-up, compressed, local and synchronisation steps, an
// overflow planted on one rank (every rank must skip, and the error buffers must not move), clipping, and a momentum
// mask. 1-bit LAMB's per-tensor double sums are added in another order on the device (cuda/onebit_lamb.cuh), so its
// per-tensor state is compared to a relative 1e-12; its float buffers are compared bit for bit (a double moved in its
// last bits rounds to the same float unless it lies within that distance of a rounding boundary).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "mpopt/checkpoint/cuda.cuh"
#include "mpopt/cuda/onebit.cuh"
#include "mpopt/onebit/optimizer.hpp"
#include "onebit_support.cuh"
#include "test_cuda_support.cuh"
#include "threaded_comm.cuh"

namespace {

using namespace mpopt_test;
using mpopt::onebit::communication;

constexpr int num_steps = 14;
// 1-based overflow steps: compressed steps of 1-bit Adam and LAMB; 0/1 Adam's first local step (it resets the error
// buffers and the sync point: not on a skipped attempt) and a later local step.
constexpr int overflow_steps[] = {7, 9};
bool overflows_at(int k) {
  return k == overflow_steps[0] || k == overflow_steps[1];
}
// Group 0 has 1-bit LAMB's interesting tensors: one over two segments, an empty one, one that leaves the next at an
// unaligned offset.
const std::size_t sizes[] = {5000, 37};
const std::vector<std::size_t> tensor_sizes[] = {{4500, 0, 3, 497}, {}};

// Rank r's grads at step k (1-based): different on every rank. With `overflow`, an inf on rank 1 (0 at one rank) at
// the overflow steps.
template <class G>
std::vector<G> grads_of(std::size_t g, int rank, int world, int k, float scale, bool overflow) {
  rng r(std::uint64_t(1000 * k + 10 * rank + g));
  std::vector<G> v(sizes[g]);
  for (G& x : v) x = mpopt::convert<G>(r.signed_value() * scale);
  if (overflow && overflows_at(k) && g == 0 && rank == (world > 1 ? 1 : 0)) v[5] = mpopt::convert<G>(INFINITY);
  return v;
}

template <class T>
std::vector<T> initial_params(std::size_t g) {
  rng r(77 + g);
  std::vector<T> v(sizes[g]);
  for (T& x : v) x = mpopt::convert<T>(r.signed_value());
  return v;
}

// What one rank compares after each step; empty when every buffer matched.
template <class Rule, class Prec, class Scaler>
std::string run_rank(mpopt::comm::communicator* comm, cudaStream_t stream, int rank, int world,
                     typename Scaler::args scaler, mpopt::step_options opts) {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  using host_type = mpopt::onebit::optimizer<Rule, Prec, Scaler>;
  using cuda_type = mpopt::cuda::onebit::optimizer<Rule, Prec, Scaler>;
  constexpr std::size_t ng = 2;
  const float grad_scale = Scaler::skips_on_overflow(scaler) ? 1024.0f : 1.0f;

  std::vector<std::vector<param_t>> host_params(ng);
  std::vector<std::vector<grad_t>> host_grads(ng);
  std::vector<device_buffer<param_t>> dev_params;
  std::vector<device_buffer<grad_t>> dev_grads;
  std::vector<mpopt::param_group<Rule, Prec>> hg, dg;
  for (std::size_t g = 0; g < ng; ++g) {
    host_params[g] = initial_params<param_t>(g);
    host_grads[g].assign(sizes[g], grad_t{});
    dev_params.push_back(to_device(host_params[g]));
    dev_grads.push_back(to_device(host_grads[g]));
    mpopt::param_group<Rule, Prec> h;
    h.params = host_params[g].data();
    h.grads = host_grads[g].data();
    h.size = sizes[g];
    h.tensor_sizes = tensor_sizes[g];
    h.hparams = onebit_hparams<Rule>();
    hg.push_back(h);
    mpopt::param_group<Rule, Prec> d = h;
    d.params = dev_params[g].get();
    d.grads = dev_grads[g].get();
    dg.push_back(d);
  }

  std::optional<mpopt::checkpoint::detail::staged_host_comm> staged;
  std::optional<host_type> host;
  std::optional<cuda_type> dev;
  if (comm != nullptr) {
    staged.emplace(*comm);
    host.emplace(hg, *staged, scaler, opts);
    dev.emplace(dg, *comm, scaler, opts, mpopt::onebit::options{}, stream);
  } else {
    host.emplace(hg, scaler, opts);
    dev.emplace(dg, scaler, opts, mpopt::onebit::options{}, stream);
  }
  std::vector<std::uint8_t> mask(sizes[1]);
  for (std::size_t i = 0; i < mask.size(); ++i) mask[i] = i % 3 == 0 ? 0 : 1;
  host->set_momentum_mask(1, mask.data(), mask.size());
  dev->set_momentum_mask(1, mask.data(), mask.size(), stream);

  std::string failures;
  auto fail = [&](int k, const std::string& what) {
    failures += "rank " + std::to_string(rank) + " step " + std::to_string(k) + ": " + what + "\n";
  };
  for (int k = 1; k <= num_steps; ++k) {
    for (std::size_t g = 0; g < ng; ++g) {
      host_grads[g] = grads_of<grad_t>(g, rank, world, k, grad_scale, Scaler::skips_on_overflow(scaler));
      copy_to(dev_grads[g].get(), host_grads[g].data(), sizes[g]);
    }
    if (dev->next_communication() != host->next_communication())
      fail(k, std::string("next_communication: device ") + mpopt::onebit::to_string(dev->next_communication()) +
                  ", host " + mpopt::onebit::to_string(host->next_communication()));
    const mpopt::step_result h = host->step();
    dev->step(stream);
    const mpopt::step_result d = dev->result(stream);
    if (!d.error.ok()) fail(k, "device error: " + d.error.message);
    if (d.applied != h.applied || d.loss_scale != h.loss_scale || d.next_loss_scale != h.next_loss_scale)
      fail(k, "step result differs (applied " + std::to_string(d.applied) + " vs " + std::to_string(h.applied) + ")");
    if (!(d.clip_coef == h.clip_coef || (std::isnan(d.clip_coef) && std::isnan(h.clip_coef))))
      fail(k, "clip coefficient " + std::to_string(d.clip_coef) + " vs " + std::to_string(h.clip_coef));
    if (overflows_at(k) && Scaler::skips_on_overflow(scaler) && d.applied) fail(k, "an overflow step applied");
    for (std::size_t g = 0; g < ng; ++g) {
      const std::string at = "group " + std::to_string(g) + " ";
      if (!same_bits(to_host(dev_params[g].get(), sizes[g]), host_params[g])) fail(k, at + "params");
      if (!same_bits(to_host(dev->master(g), sizes[g]),
                     std::vector<typename Prec::master_t>(host->master(g), host->master(g) + sizes[g])))
        fail(k, at + "master");
      for (int j = 0; j < Rule::max_states; ++j)
        if (!same_bits(to_host(dev->state(g, j), sizes[g]),
                       std::vector<typename Prec::state_t>(host->state(g, j), host->state(g, j) + sizes[g])))
          fail(k, at + "state " + std::to_string(j));
      if constexpr (std::is_same_v<Rule, mpopt::onebit_lamb>) {
        const auto d_state = dev->lamb_state(g, stream);
        const auto& h_state = host->lamb_state(g);
        auto close = [](double a, double b) {
          return std::fabs(a - b) <= 1e-12 * std::fmax(std::fabs(a), std::fabs(b));
        };
        if (d_state.size() != h_state.size()) fail(k, at + "tensor count");
        for (std::size_t t = 0; t < std::min(d_state.size(), h_state.size()); ++t)
          if (!close(d_state[t].coeff_freeze, h_state[t].coeff_freeze) ||
              !close(d_state[t].last_factor, h_state[t].last_factor) ||
              !close(d_state[t].scaling_coeff, h_state[t].scaling_coeff) ||
              !close(d_state[t].last_coeff, h_state[t].last_coeff))
            fail(k, at + "tensor " + std::to_string(t) + "'s coefficients");
      }
      if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
        if (!same_bits(to_host(dev->sync_point(g), sizes[g]),
                       std::vector<float>(host->sync_point(g), host->sync_point(g) + sizes[g])))
          fail(k, at + "sync point");
        if (dev->accumulated_lr(g) != host->accumulated_lr(g)) fail(k, at + "accumulated lr");
      }
    }
    if (dev->num_error_buffers() != host->num_error_buffers()) fail(k, "error buffer count");
    for (std::size_t i = 0; i < std::min(dev->num_error_buffers(), host->num_error_buffers()); ++i) {
      const auto& he = host->errors(i);
      auto& de = dev->errors(i);
      const std::string at = "error buffer " + std::to_string(i) + " ";
      if (!same_bits(to_host(de.worker.get(), de.worker.size()),
                     std::vector<float>(he.worker.data(), he.worker.data() + he.worker.size())))
        fail(k, at + "worker");
      if (!same_bits(to_host(de.server.get(), de.server.size()),
                     std::vector<float>(he.server.data(), he.server.data() + he.server.size())))
        fail(k, at + "server");
    }
    if (dev->step_count() != host->step_count()) fail(k, "step count");
  }
  return failures;
}

template <class Rule, class Prec, class Scaler>
void check_against_host(typename Scaler::args scaler, mpopt::step_options opts) {
  {
    INFO("one GPU, no communicator");
    CHECK(run_rank<Rule, Prec, Scaler>(nullptr, nullptr, 0, 1, scaler, opts) == "");
  }
  for (int world = 1; world <= 4; ++world) {
    std::vector<std::string> failures(static_cast<std::size_t>(world));
    run_ranks(world, [&](int rank, threaded_device_comm& comm) {
      failures[std::size_t(rank)] = run_rank<Rule, Prec, Scaler>(&comm, comm.stream(), rank, world, scaler, opts);
    });
    for (int rank = 0; rank < world; ++rank) {
      INFO("world ", world, ", rank ", rank);
      CHECK(failures[std::size_t(rank)] == "");
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda 1-bit Adam, 0/1 Adam and 1-bit LAMB match the host optimizer (dynamic scaler, overflow)", Rule,
                   mpopt::onebit_adam, mpopt::zero_one_adam, mpopt::onebit_lamb) {
  mpopt::dynamic_scaler::args scaler;
  scaler.init_scale = 1024.0f;
  check_against_host<Rule, fp16_mixed, mpopt::dynamic_scaler>(scaler, {});
}

TEST_CASE_TEMPLATE("cuda 1-bit Adam, 0/1 Adam and 1-bit LAMB match the host optimizer (clipping, no scaler)", Rule,
                   mpopt::onebit_adam, mpopt::zero_one_adam, mpopt::onebit_lamb) {
  mpopt::step_options opts;
  opts.max_grad_norm = 0.05;
  check_against_host<Rule, fp16_mixed, mpopt::no_scaler>({}, opts);
}

TEST_CASE("cuda compressed allreduce: a disabled call leaves the buffer and the error feedback as they were") {
  namespace cob = mpopt::cuda::onebit;
  std::vector<std::string> failures(2);
  run_ranks(2, [&](int rank, threaded_device_comm& comm) {
    const std::size_t n = 300;
    const auto layout = mpopt::onebit::compressed_layout::make(n, 2);
    cob::compressed_allreduce allreduce(comm, n, comm.stream());
    cob::error_feedback err(layout, comm.stream());
    rng r(5 + std::uint64_t(rank));
    std::vector<float> x(n);
    for (float& v : x) v = r.signed_value();
    device_buffer<float> buf = to_device(x);
    allreduce(buf.get(), layout, err);  // enabled: moves the error feedback
    MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(comm.stream()));
    const std::vector<float> out = to_host(buf.get(), n), worker = to_host(err.worker.get(), err.worker.size()),
                             server = to_host(err.server.get(), err.server.size());
    const std::int32_t off = 0;
    device_buffer<std::int32_t> flag = to_device(std::vector<std::int32_t>{off});
    allreduce(buf.get(), layout, err, flag.get());
    MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(comm.stream()));
    std::string& f = failures[std::size_t(rank)];
    if (out == x) f += "the enabled call changed nothing; ";
    if (!same_bits(to_host(buf.get(), n), out)) f += "buffer moved; ";
    if (!same_bits(to_host(err.worker.get(), err.worker.size()), worker)) f += "worker error moved; ";
    if (!same_bits(to_host(err.server.get(), err.server.size()), server)) f += "server error moved; ";
  });
  CHECK(failures[0] == "");
  CHECK(failures[1] == "");
}

// A 64-element 1-bit Adam group in device memory.
template <class Prec>
struct small_group {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  device_buffer<param_t> params = to_device(std::vector<param_t>(64, mpopt::convert<param_t>(0.5f)));
  device_buffer<grad_t> grads = to_device(std::vector<grad_t>(64, mpopt::convert<grad_t>(0.25f)));
  mpopt::param_group<mpopt::onebit_adam, Prec> spec() const {
    mpopt::param_group<mpopt::onebit_adam, Prec> g;
    g.params = params.get();
    g.grads = grads.get();
    g.size = 64;
    return g;
  }
};

TEST_CASE("cuda 1-bit optimizer: bad input is refused with a message") {
  using opt_type = mpopt::cuda::onebit::optimizer<mpopt::onebit_adam, fp16_mixed>;
  const small_group<fp16_mixed> device_group;
  const mpopt::param_group<mpopt::onebit_adam, fp16_mixed> grp = device_group.spec();

  SUBCASE("a host-memory communicator") {
    mpopt::comm::single_rank host_comm;
    CHECK_THROWS_WITH_AS(opt_type({grp}, host_comm), doctest::Contains("device-memory communicator"), mpopt::error);
  }
  SUBCASE("bf16 without the opt-in, as on the host") {
    using bf16_opt = mpopt::cuda::onebit::optimizer<mpopt::onebit_adam, bf16_mixed>;
    const small_group<bf16_mixed> bf16_group;
    const mpopt::param_group<mpopt::onebit_adam, bf16_mixed> b = bf16_group.spec();
    CHECK_THROWS_WITH_AS(bf16_opt({b}), doctest::Contains("accept_unverified_precision"), mpopt::error);
    mpopt::onebit::options o;
    o.accept_unverified_precision = true;
    CHECK_NOTHROW(bf16_opt({b}, {}, {}, o));
  }
  SUBCASE("host memory as params") {
    std::vector<half_t> host_params(64);
    mpopt::param_group<mpopt::onebit_adam, fp16_mixed> h = grp;
    h.params = host_params.data();
    CHECK_THROWS_WITH_AS(opt_type({h}), doctest::Contains("params"), mpopt::error);
  }
  SUBCASE("a bad mask") {
    opt_type o({grp});
    std::vector<std::uint8_t> m(64, 1);
    CHECK_THROWS_WITH_AS(o.set_momentum_mask(0, m.data(), 63, nullptr), doctest::Contains("n = 63"), mpopt::error);
    m[7] = 2;
    CHECK_THROWS_WITH_AS(o.set_momentum_mask(0, m.data(), 64, nullptr), doctest::Contains("mask[7]"), mpopt::error);
  }
  SUBCASE("a stream other than the communicator's") {
    std::vector<std::string> failures(1);
    run_ranks(1, [&](int, threaded_device_comm& comm) {
      cudaStream_t other = nullptr;
      MPOPT_CUDA_REQUIRE(cudaStreamCreate(&other));
      try {
        opt_type o({grp}, comm, {}, {}, {}, other);
        failures[0] = "constructed on a foreign stream";
      } catch (const mpopt::error& e) {
        if (std::string(e.what()).find("communicator's stream") == std::string::npos) failures[0] = e.what();
      }
      (void)cudaStreamDestroy(other);
    });
    CHECK(failures[0] == "");
  }
}
