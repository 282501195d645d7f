// Shared by the CUDA optimizer tests: device buffers, copies, test data, and the host-vs-device comparison.
//
// Why a tolerance and not bitwise equality: nvcc contracts a * b + c into one fused multiply-add by default and the
// host compiler (no -march) does not, so the same Rule::apply rounds differently in a few places. Each step is
// therefore compared from identical inputs ("lockstep": after every step the device buffers are overwritten with the
// host's), and every element must satisfy
//     |device - host| <= k * ulp_T(max(|device|, |host|)) + 8 * eps_fp32 * scale,
// k = 2 for fp32 buffers and 1 for fp16/bf16 buffers (an fp32 difference flips a 16-bit rounding by at most one
// ulp), and scale = |w| + |g| + g^2 + sum |s| of the element's inputs, which bounds what cancellation can amplify.
// Rule::prepare also runs on the device (pow and sqrt in double, rounded to float), which can move a coefficient by
// one float ulp: inside the same bound. Everything that is device against device (overflow skips, CUDA graphs) or
// free of rounding (scaler sequences) is compared bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gpu_test.cuh"
#include "mpopt/cuda/optimizer.cuh"
#include "mpopt/mpopt.hpp"

namespace mpopt_test {

using mpopt::bf16_t;
using mpopt::half_t;

// Policies the rule tests cover: fp32; bf16 and fp16 params with an fp32 master; bf16 pure with bf16 states;
// fp16 params with an fp16 master (DeepSpeed fp16_master_weights_and_gradients).
using fp32 = mpopt::fp32_policy;
using bf16_mixed = mpopt::bf16_mixed_policy;
using fp16_mixed = mpopt::fp16_mixed_policy;
using bf16_pure = mpopt::bf16_pure_policy;
using fp16_master =
    mpopt::precision<mpopt::param<half_t>, mpopt::master<half_t>, mpopt::grad<half_t>, mpopt::state<float>>;

template <class T>
using device_buffer = mpopt::cuda::device_buffer<T>;

// The copies below wait for the device afterwards: a cudaMemcpy from pageable memory may return before its DMA has
// landed, and work on a non-blocking stream is not ordered after it.
template <class T>
device_buffer<T> to_device(const std::vector<T>& v) {
  device_buffer<T> d(v.size(), "test buffer");
  if (!v.empty()) MPOPT_CUDA_REQUIRE(cudaMemcpy(d.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
  return d;
}

template <class T>
std::vector<T> to_host(const T* p, std::size_t n) {
  std::vector<T> v(n);
  if (n > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

template <class T>
void copy_to(T* device, const T* host, std::size_t n) {
  if (n > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(device, host, n * sizeof(T), cudaMemcpyHostToDevice));
  MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// splitmix64: the same stream on every platform.
struct rng {
  std::uint64_t s;
  explicit rng(std::uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 1) {}
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return float(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
  // Signed values over several decades, as real gradients are.
  float signed_value() {
    // At most 0.5, so that times the default fp16 loss scale (2^16) the value still fits fp16 (65504).
    static const float mags[] = {1e-4f, 1e-3f, 1e-2f, 1e-1f, 0.5f};
    return (uniform() * 2.f - 1.f) * mags[next() % 5];
  }
};

template <class T>
double ulp_of(double x) {
  const double a = std::fabs(x);
  if constexpr (std::is_same_v<T, float>) {
    const float f = float(a);
    return double(std::nextafter(f, INFINITY)) - double(f);
  } else if constexpr (std::is_same_v<T, double>) {
    return std::nextafter(a, INFINITY) - a;
  } else {
    // 16-bit: spacing above a, at least the smallest subnormal.
    constexpr int mant = std::is_same_v<T, half_t> ? 10 : 7;
    constexpr int emin = std::is_same_v<T, half_t> ? -14 : -126;
    const int e = a > 0 ? std::max(std::ilogb(a), emin) : emin;
    return std::ldexp(1.0, e - mant);
  }
}

template <class T>
double as_double(T x) {
  return double(mpopt::convert<float>(x));
}
inline double as_double(double x) {
  return x;
}

// Counts elements outside the lockstep bound (see the top of this file); records the worst in `worst`.
// Elements where `excused` is true are not compared.
template <class T>
std::size_t count_outside(const std::vector<T>& device, const std::vector<T>& host, const std::vector<double>& scale,
                          std::string& worst, const std::vector<bool>& excused = {}) {
  constexpr double k = sizeof(T) == 2 ? 1.0 : 2.0;
  constexpr double eps32 = 1.1920928955078125e-07;
  std::size_t bad = 0;
  double worst_excess = 0;
  for (std::size_t i = 0; i < host.size(); ++i) {
    if (!excused.empty() && excused[i]) continue;
    const double d = as_double(device[i]), h = as_double(host[i]);
    if (std::isnan(d) && std::isnan(h)) continue;
    const double bound = k * ulp_of<T>(std::max(std::fabs(d), std::fabs(h))) + 8 * eps32 * scale[i];
    const double diff = std::fabs(d - h);
    if (!(diff <= bound)) {
      ++bad;
      if (!(diff / bound <= worst_excess)) {
        worst_excess = diff / bound;
        worst = "element " + std::to_string(i) + ": device " + std::to_string(d) + " host " + std::to_string(h) +
                " (diff " + std::to_string(diff) + ", bound " + std::to_string(bound) + ")";
      }
    }
  }
  return bad;
}

inline void check_results(const mpopt::step_result& d, const mpopt::step_result& h, int step) {
  INFO("step ", step);
  CHECK(d.applied == h.applied);
  CHECK(d.reason == h.reason);
  CHECK(d.step == h.step);
  CHECK(d.event == h.event);
  CHECK(d.loss_scale == h.loss_scale);
  CHECK(d.next_loss_scale == h.next_loss_scale);
  CHECK(d.error.code == h.error.code);
  CHECK(d.error.message == h.error.message);
  // The device sums in another order (and squares 16-byte vectors in float): a relative difference of 1e-6 at most.
  if (std::isfinite(h.grad_norm)) {
    CHECK(std::fabs(d.grad_norm - h.grad_norm) <= 2e-6 * std::fabs(h.grad_norm) + 1e-30);
  } else {
    CHECK(std::isfinite(d.grad_norm) == std::isfinite(h.grad_norm));
  }
  CHECK(std::fabs(d.clip_coef - h.clip_coef) <= 2e-6 * std::fabs(h.clip_coef));
}

// One parameter group's description for twin below: its size, its tensor split, and an element offset into its
// allocation (an odd offset makes the buffers 16-byte misaligned: the scalar path).
template <class Rule>
struct group_spec {
  std::size_t size = 0;
  std::vector<std::size_t> tensor_sizes;
  typename Rule::args hparams{};
  std::size_t offset = 0;
};

// The host optimizer and the CUDA optimizer on the same inputs, stepped together.
template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
struct twin {
  using P = typename Prec::param_t;
  using M = typename Prec::master_t;
  using G = typename Prec::grad_t;
  using S = typename Prec::state_t;
  using host_opt = mpopt::optimizer<Rule, Prec, Scaler>;
  using dev_opt = mpopt::cuda::optimizer<Rule, Prec, Scaler>;

  std::vector<group_spec<Rule>> specs;
  std::vector<std::vector<P>> h_params;
  std::vector<std::vector<G>> h_grads;
  std::vector<device_buffer<P>> d_params;  // allocation; the group starts at specs[g].offset
  std::vector<device_buffer<G>> d_grads;
  std::unique_ptr<host_opt> host;
  std::unique_ptr<dev_opt> dev;
  rng gen;
  cudaStream_t stream = nullptr;

  twin(std::vector<group_spec<Rule>> groups, typename Scaler::args scaler = {}, mpopt::step_options options = {},
       std::uint64_t seed = 1)
      : specs(std::move(groups)), gen(seed) {
    MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream));  // blocking: ordered with the legacy-stream copies of the tests
    std::vector<mpopt::param_group<Rule, Prec>> hg, dg;
    for (const auto& s : specs) {
      std::vector<P> p(s.size);
      for (auto& x : p) x = mpopt::convert<P>(gen.uniform() * 2.f - 1.f);
      h_params.push_back(p);
      h_grads.emplace_back(s.size, mpopt::convert<G>(0.f));
      std::vector<P> padded(s.offset + s.size);
      std::copy(p.begin(), p.end(), padded.begin() + std::ptrdiff_t(s.offset));
      d_params.push_back(to_device(padded));
      d_grads.push_back(to_device(std::vector<G>(s.offset + s.size)));
    }
    for (std::size_t g = 0; g < specs.size(); ++g) {
      mpopt::param_group<Rule, Prec> a;
      a.params = h_params[g].data();
      a.grads = h_grads[g].data();
      a.size = specs[g].size;
      a.tensor_sizes = specs[g].tensor_sizes;
      a.hparams = specs[g].hparams;
      hg.push_back(a);
      a.params = dparam(g);
      a.grads = dgrad(g);
      dg.push_back(a);
    }
    host = std::make_unique<host_opt>(hg, scaler, options);
    dev = std::make_unique<dev_opt>(dg, scaler, options, stream);
  }
  ~twin() {
    dev.reset();
    cudaStreamDestroy(stream);
  }

  P* dparam(std::size_t g) { return d_params[g].get() + specs[g].offset; }
  G* dgrad(std::size_t g) { return d_grads[g].get() + specs[g].offset; }

  // New gradients, times `scale` (the loss scale they are "produced" with); `inf_at` >= 0 plants an inf there.
  void new_grads(float scale, long inf_at = -1) {
    for (std::size_t g = 0; g < specs.size(); ++g) {
      for (std::size_t i = 0; i < specs[g].size; ++i) h_grads[g][i] = mpopt::convert<G>(gen.signed_value() * scale);
      if (g == 0 && inf_at >= 0 && std::size_t(inf_at) < specs[g].size)
        h_grads[g][std::size_t(inf_at)] = mpopt::convert<G>(INFINITY);
      copy_to(dgrad(g), h_grads[g].data(), specs[g].size);
    }
  }

  // Steps both; checks the step results; returns the host's.
  mpopt::step_result step(int index) {
    const mpopt::step_result h = host->step();
    dev->step(stream);
    REQUIRE(dev->last_error().ok());
    const mpopt::step_result d = dev->result(stream);
    check_results(d, h, index);
    return h;
  }

  std::vector<M> host_master(std::size_t g) const {
    return std::vector<M>(host->master(g), host->master(g) + specs[g].size);
  }
  std::vector<S> host_state(std::size_t g, int j) const {
    return std::vector<S>(host->state(g, j), host->state(g, j) + specs[g].size);
  }

  // Per-element magnitude of the inputs of the step about to run (see the top of the file).
  std::vector<double> input_scale(std::size_t g, double grad_factor) const {
    std::vector<double> s(specs[g].size);
    const M* m = host->master(g);
    for (std::size_t i = 0; i < s.size(); ++i) {
      const double ge = std::fabs(as_double(h_grads[g][i]) * grad_factor);
      s[i] = std::fabs(as_double(m[i])) + ge + ge * ge;
      for (int j = 0; j < host->num_states(g); ++j) s[i] += std::fabs(as_double(host->state(g, j)[i]));
      if constexpr (std::is_same_v<Rule, mpopt::lion>) {
        // Lion steps by lr * sign(c): where c = b1 * m + (1 - b1) * g cancels to within rounding, a fused
        // multiply-add may flip its sign. Such elements may differ by the whole 2 * lr.
        const auto& a = specs[g].hparams;
        const double m0 = as_double(host->state(g, 0)[i]), g0 = as_double(h_grads[g][i]) * grad_factor;
        const double c = a.beta1 * m0 + (1 - a.beta1) * g0;
        if (std::fabs(c) <= 1e-5 * (std::fabs(a.beta1 * m0) + std::fabs((1 - a.beta1) * g0)))
          s[i] += 2 * a.lr / (8 * 1.1920928955078125e-07);
      }
    }
    return s;
  }

  // Device against host, within the lockstep bound, for every buffer of every group.
  void compare(const std::vector<std::vector<double>>& scale, int index) {
    for (std::size_t g = 0; g < specs.size(); ++g) {
      const std::size_t n = specs[g].size;
      std::string worst;
      INFO("step ", index, ", group ", g);
      REQUIRE(dev->num_states(g) == host->num_states(g));
      // LAMB's direction reads the states as stored: where a 16-bit state rounded the other way (allowed above),
      // that element's weight moves by a fraction of lr * ratio * |u| more. Those elements' weights are excused;
      // they are rare (a state must sit at a rounding boundary to within a float ulp).
      std::vector<bool> excused(n, false);
      std::size_t n_excused = 0;
      for (int j = 0; j < host->num_states(g); ++j) {
        const std::vector<S> d = to_host(dev->state(g, j), n), h = host_state(g, j);
        const std::size_t bad = count_outside(d, h, scale[g], worst);
        CHECK_MESSAGE(bad == 0, "state ", j, ": ", bad, " of ", n, " outside the bound; worst ", worst);
        if constexpr (Rule::per_tensor && sizeof(S) == 2) {
          for (std::size_t i = 0; i < n; ++i) {
            if (d[i].bits != h[i].bits && !excused[i]) {
              excused[i] = true;
              ++n_excused;
            }
          }
        }
      }
      CHECK(n_excused <= n / 100 + 2);
      const std::size_t bad_master =
          count_outside(to_host(dev->master(g), n), host_master(g), scale[g], worst, excused);
      CHECK_MESSAGE(bad_master == 0, "master: ", bad_master, " of ", n, " outside the bound; worst ", worst);
      if constexpr (Prec::separate_master) {
        const std::size_t bad_param = count_outside(to_host(dparam(g), n), h_params[g], scale[g], worst, excused);
        CHECK_MESSAGE(bad_param == 0, "params: ", bad_param, " of ", n, " outside the bound; worst ", worst);
      }
    }
  }

  // Overwrites the device's master, states and params with the host's, so the next step starts from equal inputs.
  void sync_device_from_host() {
    for (std::size_t g = 0; g < specs.size(); ++g) {
      const std::size_t n = specs[g].size;
      copy_to(dparam(g), h_params[g].data(), n);
      if constexpr (Prec::separate_master) copy_to(dev->master(g), host->master(g), n);
      for (int j = 0; j < host->num_states(g); ++j) copy_to(dev->state(g, j), host->state(g, j), n);
    }
  }

  // `steps` lockstep steps with fresh gradients each (times the current loss scale); returns applied steps.
  int run_lockstep(int steps, long inf_every = 0) {
    int applied = 0;
    for (int s = 0; s < steps; ++s) {
      const float scale = float(host->loss_scale());
      new_grads(scale, inf_every > 0 && s % inf_every == inf_every - 1 ? long(s) : -1);
      const double factor_guess = 1.0 / double(scale);
      std::vector<std::vector<double>> in_scale;
      for (std::size_t g = 0; g < specs.size(); ++g) in_scale.push_back(input_scale(g, factor_guess));
      const mpopt::step_result h = step(s);
      applied += h.applied ? 1 : 0;
      compare(in_scale, s);
      sync_device_from_host();
    }
    return applied;
  }
};

}  // namespace mpopt_test
