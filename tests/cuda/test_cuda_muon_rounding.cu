// A bf16 master with stochastic rounding or Kahan summation on mpopt::cuda::muon_optimizer, against the host
// muon_optimizer.
//
// Bit for bit where both backends run the same arithmetic: the aux groups (AdamW through update.cuh's kernel) and
// matrix groups with ns_steps = 0, whose update is the normalised momentum with no GEMM (the norm is summed in double
// on both sides, in other orders, then rounded to float: the same float unless the sum lies within about 1e-15 of a
// float rounding boundary). Params, masters, states and compensation are compared after every step, across several
// groups (each its own Philox key: aux g tagged g, matrix g tagged g | 2^15), odd offsets (the scalar path) and a
// reseed. This needs the device to round every operation as the host does: tests/CMakeLists.txt compiles this file
// with --fmad=false (the host side has -ffp-contract=off), and each test first checks that it was.
//
// A matrix group with Newton–Schulz: cuBLAS sums the GEMMs in another order than the host, so the value a master
// element rounds is off the host's by about 1e-5 of its update (test_cuda_muon.cu's bound), far below a bf16 ulp.
// The same key, counter and compensation then give the host's bits except where that difference straddles a rounding
// threshold: every master is within one ulp of the host's and at least 99% are equal, where rounding with other random
// bits (or without the compensation) changes a large share of the elements that move.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bitwise_support.cuh"
#include "mpopt/cuda/muon.cuh"
#include "mpopt/muon.hpp"

using namespace mpopt_test;

namespace {

using mpopt::kahan_summation;
using mpopt::matrix_shape;
using mpopt::muon_part;
using mpopt::stochastic_rounding;

// Matrix groups 0 and 1 have no Newton–Schulz (bit for bit): wide, tall and an odd shape that leaves the next matrix
// unaligned (the scalar path); a 48 x 80 matrix of each shares a batch, with two keys. Group 2 iterates 5 times.
// Aux groups: two tensors; misaligned on the device with amsgrad (3 states: a second kernel).
const std::vector<std::vector<matrix_shape>> matrix_shapes = {
    {{48, 80}, {33, 7}, {80, 48}}, {{64, 64}, {48, 80}}, {{48, 80}, {80, 48}}};
const std::vector<int> matrix_ns_steps = {0, 0, 5};
const std::vector<double> matrix_lr = {0.05, 0.03, 0.005};
const std::size_t exact_matrix_groups = 2;
const std::vector<std::size_t> aux_sizes = {1000, 777};
const std::vector<std::vector<std::size_t>> aux_tensors = {{7, 993}, {}};
const std::vector<std::size_t> aux_skip = {0, 1};  // elements before the group in its device buffer

// Both optimizers on the same initial params (weights of magnitude [1/4, 1): a bf16 ulp of 2^-9 or 2^-8, above most
// updates, so that the rounding option decides which updates the master keeps).
template <class Prec>
struct muon_twin {
  using host_type = mpopt::muon_optimizer<Prec>;
  using device_type = mpopt::cuda::muon_optimizer<Prec>;
  static constexpr std::size_t nm = 3, na = 2;

  rng gen;
  std::vector<std::vector<bf16_t>> h_params[2], h_grads[2];  // [muon_part]: host buffers
  std::vector<device_buffer<bf16_t>> d_params[2], d_grads[2];
  std::vector<std::vector<bf16_t>> initial[2];
  std::unique_ptr<host_type> host;
  std::unique_ptr<device_type> dev;

  static std::size_t index(muon_part part) { return part == muon_part::matrices ? 0 : 1; }
  std::size_t size(muon_part part, std::size_t g) const { return h_params[index(part)][g].size(); }
  std::size_t skip(muon_part part, std::size_t g) const { return part == muon_part::aux ? aux_skip[g] : 0; }
  bf16_t* dparam(muon_part part, std::size_t g) const { return d_params[index(part)][g].get() + skip(part, g); }
  bf16_t* dgrad(muon_part part, std::size_t g) const { return d_grads[index(part)][g].get() + skip(part, g); }

  explicit muon_twin(const mpopt::step_options& o, std::uint64_t seed) : gen(seed) {
    std::vector<mpopt::muon_group<Prec>> hm(nm), dm(nm);
    std::vector<mpopt::param_group<mpopt::adamw, Prec>> ha(na), da(na);
    for (std::size_t g = 0; g < nm; ++g) {
      hm[g].shapes = matrix_shapes[g];
      hm[g].hparams.lr = matrix_lr[g];
      hm[g].hparams.weight_decay = 0.01;
      hm[g].hparams.ns_steps = matrix_ns_steps[g];
      add(muon_part::matrices, hm[g].size(), 0);
    }
    for (std::size_t g = 0; g < na; ++g) {
      ha[g].size = aux_sizes[g];
      ha[g].tensor_sizes = aux_tensors[g];
      ha[g].hparams.lr = 3e-4;
      ha[g].hparams.amsgrad = g == 1;
      add(muon_part::aux, aux_sizes[g], aux_skip[g]);
    }
    for (std::size_t g = 0; g < nm; ++g) {
      dm[g] = hm[g];
      hm[g].params = h_params[0][g].data();
      hm[g].grads = h_grads[0][g].data();
      dm[g].params = dparam(muon_part::matrices, g);
      dm[g].grads = dgrad(muon_part::matrices, g);
    }
    for (std::size_t g = 0; g < na; ++g) {
      da[g] = ha[g];
      ha[g].params = h_params[1][g].data();
      ha[g].grads = h_grads[1][g].data();
      da[g].params = dparam(muon_part::aux, g);
      da[g].grads = dgrad(muon_part::aux, g);
    }
    host = std::make_unique<host_type>(hm, ha, mpopt::no_scaler::args{}, o);
    dev = std::make_unique<device_type>(dm, da, mpopt::no_scaler::args{}, o, nullptr);
  }

  // A group of n elements, `s` elements into its device buffers.
  void add(muon_part part, std::size_t n, std::size_t s) {
    const std::size_t k = index(part);
    std::vector<bf16_t> p(n);
    for (auto& x : p) x = bf16_t((gen.uniform() < 0.5f ? -1.f : 1.f) * (0.25f + 0.75f * gen.uniform()));
    std::vector<bf16_t> padded(s, bf16_t(0.f));
    padded.insert(padded.end(), p.begin(), p.end());
    d_params[k].push_back(to_device(padded));
    d_grads[k].emplace_back(n + s, "grads");
    h_params[k].push_back(p);
    h_grads[k].emplace_back(n);
    initial[k].push_back(p);
  }

  // New grads of a steady sign per element and varying size, so that the updates add up.
  void steady_grads() {
    for (muon_part part : {muon_part::matrices, muon_part::aux}) {
      for (std::size_t g = 0; g < h_grads[index(part)].size(); ++g) {
        std::vector<bf16_t>& q = h_grads[index(part)][g];
        for (std::size_t i = 0; i < q.size(); ++i)
          q[i] = bf16_t((i % 3 == 0 ? -1.f : 1.f) * (1e-3f + 1e-2f * gen.uniform()));
        copy_to(dgrad(part, g), q.data(), q.size());
      }
    }
  }

  void step() {
    const mpopt::step_result want = host->step();
    dev->step(nullptr);
    const mpopt::step_result got = dev->result(nullptr);
    REQUIRE(got.error.ok());
    REQUIRE(want.applied);
    REQUIRE(got.applied);
    CHECK(got.step == want.step);
  }

  std::vector<bf16_t> host_master(muon_part part, std::size_t g) {
    std::vector<bf16_t> m(size(part, g));
    host->gather_master(part, g, m.data());
    return m;
  }
  std::vector<bf16_t> device_master(muon_part part, std::size_t g) const {
    return to_host(dev->master(part, g), size(part, g));
  }
};

// Every buffer of group g, device against host, bit for bit.
template <class Prec>
void check_group_bits(muon_twin<Prec>& t, muon_part part, std::size_t g) {
  using state_t = typename Prec::state_t;
  const std::size_t n = t.size(part, g);
  CHECK_SAME_BITS(to_host(t.dparam(part, g), n), t.h_params[t.index(part)][g], "params");
  CHECK_SAME_BITS(t.device_master(part, g), t.host_master(part, g), "master");
  for (int j = 0; j < t.host->num_states(part, g); ++j) {
    std::vector<state_t> want(n);
    t.host->gather_state(part, g, j, want.data());
    CHECK_SAME_BITS(to_host(t.dev->state(part, g, j), n), want, "state " + std::to_string(j));
  }
  if constexpr (is_kahan_v<Prec>) {
    std::vector<bf16_t> want(n);
    t.host->gather_compensation(part, g, want.data());
    REQUIRE(t.dev->compensation(part, g) != nullptr);
    CHECK_SAME_BITS(to_host(t.dev->compensation(part, g), n), want, "compensation");
  } else {
    CHECK(t.dev->compensation(part, g) == nullptr);
  }
}

// Elements whose bits differ from `initial`.
std::size_t count_moved(const std::vector<bf16_t>& now, const std::vector<bf16_t>& initial) {
  std::size_t moved = 0;
  for (std::size_t i = 0; i < now.size(); ++i) moved += now[i].bits != initial[i].bits ? 1 : 0;
  return moved;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda muon with a stochastically rounded or Kahan bf16 master: the host optimizer's bits", Prec,
                   bf16_master_fp32_states<stochastic_rounding>, bf16_master_fp32_states<kahan_summation>,
                   mpopt::bf16_stochastic_policy, mpopt::bf16_kahan_policy) {
  require_ieee_device_arithmetic();
  constexpr bool stochastic = std::is_same_v<typename Prec::master_rounding, stochastic_rounding>;
  mpopt::step_options o;
  o.rounding_seed = 0x5eed0123abcdull;
  muon_twin<Prec> t(o, 3);
  const int steps = 16;
  for (int s = 0; s < steps; ++s) {
    if (stochastic && s == steps / 2) {  // a new seed takes effect at the next step, on both backends
      o.rounding_seed = 12345;
      t.host->set_options(o);
      t.dev->set_options(o, nullptr);
    }
    t.steady_grads();
    t.step();
    for (std::size_t g = 0; g < exact_matrix_groups; ++g) {
      INFO("step ", s, ", matrix group ", g);
      check_group_bits(t, muon_part::matrices, g);
    }
    for (std::size_t g = 0; g < aux_sizes.size(); ++g) {
      INFO("step ", s, ", aux group ", g);
      check_group_bits(t, muon_part::aux, g);
    }
  }
  CHECK(t.dev->options().rounding_seed == o.rounding_seed);

  // The momentum does not depend on the Newton–Schulz result: bit for bit in the iterated group too. Its masters are
  // within one ulp of the host's (same sign: the bits differ by at most 1), and almost all equal.
  const std::size_t ns_group = exact_matrix_groups;
  const std::size_t n = t.size(muon_part::matrices, ns_group);
  std::vector<typename Prec::state_t> want_momentum(n);
  t.host->gather_state(muon_part::matrices, ns_group, 0, want_momentum.data());
  CHECK_SAME_BITS(to_host(t.dev->state(muon_part::matrices, ns_group, 0), n), want_momentum, "momentum");
  const std::vector<bf16_t> want = t.host_master(muon_part::matrices, ns_group);
  const std::vector<bf16_t> got = t.device_master(muon_part::matrices, ns_group);
  std::size_t equal = 0, far = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const int d = int(got[i].bits) - int(want[i].bits);
    equal += d == 0 ? 1 : 0;
    far += (d < -1 || d > 1) ? 1 : 0;
  }
  const std::size_t moved = count_moved(want, t.initial[0][ns_group]);
  INFO("Newton-Schulz group: ", equal, " of ", n, " masters equal, ", far, " more than an ulp apart, ", moved,
       " moved on the host");
  CHECK(far == 0);
  CHECK(n - equal <= n / 100);
  CHECK(moved > n / 4);

  // The test means something: the exact groups' weights moved, although most of their updates are below half an ulp.
  for (std::size_t g = 0; g < exact_matrix_groups; ++g) {
    const std::vector<bf16_t> now = t.host_master(muon_part::matrices, g);
    CHECK(count_moved(now, t.initial[0][g]) > now.size() / 10);
  }
  for (std::size_t g = 0; g < aux_sizes.size(); ++g) {
    const std::vector<bf16_t> now = t.host_master(muon_part::aux, g);
    CHECK(count_moved(now, t.initial[1][g]) > now.size() / 10);
  }
}

// Only kahan_summation keeps a compensation buffer; the accessor checks its group index.
TEST_CASE("cuda muon with a nearest-rounded master has no compensation") {
  muon_twin<mpopt::bf16_pure_policy> t({}, 4);
  CHECK(t.dev->compensation(muon_part::matrices, 0) == nullptr);
  CHECK(t.dev->compensation(muon_part::aux, 1) == nullptr);
  CHECK_THROWS_AS(t.dev->compensation(muon_part::aux, 2), mpopt::error);
}
