// 1-bit Adam, 0/1 Adam and 1-bit LAMB on one rank (onebit/optimizer.hpp): the precision rule, validation, the phase
// and communication schedule (derived by hand from DeepSpeed's description), the warm-up against mpopt's exact rules
// bit for bit, every phase against an fp64 re-computation of the algorithm as DeepSpeed describes it (at world size
// 1 the compressed allreduce is the identity), masks, and the overflow skip. The multi-rank behaviour (compression,
// error feedback, convergence) is tests/mpi/test_onebit.cpp.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "mpopt/mpopt.hpp"
#include "mpopt/onebit/optimizer.hpp"

namespace {

using mpopt::onebit::communication;
using mpopt::onebit::phase;

mpopt::onebit::options unverified() {
  mpopt::onebit::options o;
  o.accept_unverified_precision = true;
  return o;
}

// Gradients away from zero (so m / sqrt(v) is well conditioned), different every step.
float grad_value(std::size_t i, int step) {
  const double u = 0.5 + 0.5 * std::sin(0.37 * double(i) + 1.3 * double(step) + 0.1 * double(i % 5));
  const double sign = ((i * 7 + std::size_t(step)) % 3 == 0) ? -1.0 : 1.0;
  return float(sign * (0.2 + 0.8 * u));
}

template <class Rule>
struct problem {
  std::vector<std::size_t> tensors;
  std::vector<float> params, grads;
  mpopt::param_group<Rule, mpopt::fp32_policy> group;

  problem(std::vector<std::size_t> t, typename Rule::args hp) : tensors(std::move(t)) {
    std::size_t n = 0;
    for (std::size_t s : tensors) n += s;
    params.resize(n);
    grads.resize(n);
    for (std::size_t i = 0; i < n; ++i) params[i] = float(0.5 * std::cos(0.11 * double(i)) + 0.1);
    group.params = params.data();
    group.grads = grads.data();
    group.size = n;
    group.tensor_sizes = tensors;
    group.hparams = hp;
  }
  void set_grads(int step) {
    for (std::size_t i = 0; i < grads.size(); ++i) grads[i] = grad_value(i, step);
  }
};

// fp64 references, written from DeepSpeed's description (../shared/reference/deepspeed_zero_onebit.md D.3-D.5) with
// mpopt's step numbering (no initialisation call) and decoupled decay.
struct adam_reference {
  double lr, b1, b2, eps, wd;
  std::vector<double> w, m, v;
  double weight(double wi, double mi, double vi) const { return wi * (1 - lr * wd) - lr * mi / (std::sqrt(vi) + eps); }
};

void onebit_adam_reference(adam_reference& r, const std::vector<float>& g, int step, std::int64_t freeze) {
  for (std::size_t i = 0; i < r.w.size(); ++i) {
    r.m[i] = r.b1 * r.m[i] + (1 - r.b1) * g[i];
    if (step <= freeze) r.v[i] = r.b2 * r.v[i] + (1 - r.b2) * double(g[i]) * g[i];
    r.w[i] = r.weight(r.w[i], r.m[i], r.v[i]);
  }
}

struct zero_one_reference : adam_reference {
  std::vector<double> u;
  double lr_sum = 0;
  std::int64_t var_interval = 1, var_counter = 0, local_interval = 1, local_counter = 0;
};

void zero_one_reference_step(zero_one_reference& r, const std::vector<float>& g, int s,
                             const mpopt::zero_one_adam::args& a) {
  const std::size_t n = r.w.size();
  if (s <= a.var_freeze_step) {
    const bool exact = s % r.var_interval == 0;
    for (std::size_t i = 0; i < n; ++i) {
      r.m[i] = r.b1 * r.m[i] + (1 - r.b1) * g[i];
      if (exact) r.v[i] = r.b2 * r.v[i] + (1 - r.b2) * double(g[i]) * g[i];
      r.w[i] = r.weight(r.w[i], r.m[i], r.v[i]);
    }
    if (exact && ++r.var_counter == a.var_update_scaler) {
      r.var_counter = 0;
      r.var_interval *= 2;
    }
    return;
  }
  r.lr_sum += r.lr;
  for (std::size_t i = 0; i < n; ++i) {
    r.m[i] = r.b1 * r.m[i] + (1 - r.b1) * g[i];
    const double w = r.weight(r.w[i], r.m[i], r.v[i]);
    r.u[i] += w - r.w[i];
    r.w[i] = w;
  }
  if (s % r.local_interval == 0) {
    for (std::size_t i = 0; i < n; ++i) {
      const double denom = std::sqrt(r.v[i]) + r.eps;
      const double x = r.u[i] * denom;  // the identity allreduce at world size 1
      r.m[i] = -x / r.lr_sum;
      r.w[i] = r.w[i] - r.u[i] + x / denom;
      r.u[i] = 0;
    }
    r.lr_sum = 0;
  }
  if (++r.local_counter == a.local_step_scaler) {
    r.local_counter = 0;
    r.local_interval = std::min(a.local_step_clipper, 2 * r.local_interval);
  }
}

struct lamb_reference : adam_reference {
  std::vector<double> fresh, coeff_freeze, last_factor, scaling;
  std::vector<std::size_t> offsets;
};

double norm(const std::vector<double>& x, std::size_t b, std::size_t e) {
  double s = 0;
  for (std::size_t i = b; i < e; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

void onebit_lamb_reference_step(lamb_reference& r, const std::vector<float>& g, int s,
                                const mpopt::onebit_lamb::args& a) {
  const std::size_t tensors = r.offsets.size() - 1;
  if (s <= a.freeze_step) {
    for (std::size_t t = 0; t < tensors; ++t) {
      std::vector<double> u(r.w.size());
      for (std::size_t i = r.offsets[t]; i < r.offsets[t + 1]; ++i) {
        r.m[i] = r.b1 * r.m[i] + (1 - r.b1) * g[i];
        r.v[i] = r.b2 * r.v[i] + (1 - r.b2) * double(g[i]) * g[i];
        u[i] = r.m[i] / (std::sqrt(r.v[i]) + r.eps) + r.wd * r.w[i];
      }
      const double wn = norm(r.w, r.offsets[t], r.offsets[t + 1]), un = norm(u, r.offsets[t], r.offsets[t + 1]);
      const double coeff = wn > 0 && un > 0 ? std::min(std::max(wn / un, a.min_coeff), a.max_coeff) : 1.0;
      if (coeff != 1.0) r.coeff_freeze[t] = a.coeff_beta * r.coeff_freeze[t] + (1 - a.coeff_beta) * coeff;
      for (std::size_t i = r.offsets[t]; i < r.offsets[t + 1]; ++i) r.w[i] -= r.lr * coeff * u[i];
    }
    if (s == a.freeze_step) r.fresh = r.v;
    return;
  }
  if (r.scaling.empty()) {
    std::vector<double> rms(tensors);
    double united = 0;
    for (std::size_t t = 0; t < tensors; ++t) {
      rms[t] = norm(r.m, r.offsets[t], r.offsets[t + 1]) / std::sqrt(double(r.offsets[t + 1] - r.offsets[t]));
      united += rms[t] / double(tensors);
    }
    for (std::size_t t = 0; t < tensors; ++t) r.scaling.push_back(united / rms[t]);
  }
  for (std::size_t t = 0; t < tensors; ++t) {
    std::vector<double> u0(r.w.size()), u(r.w.size());
    double max_ratio = 0;
    for (std::size_t i = r.offsets[t]; i < r.offsets[t + 1]; ++i) {
      const double prev = r.m[i];
      r.m[i] = r.b1 * r.m[i] + (1 - r.b1) * g[i];
      const double g_rec = (r.m[i] - r.b1 * prev) / (1 - r.b1);
      r.fresh[i] = r.b2 * r.fresh[i] + (1 - r.b2) * g_rec * g_rec;
      const double denom = std::sqrt(r.v[i]) + r.eps;
      u0[i] = r.m[i] / denom;
      u[i] = u0[i] + r.wd * r.w[i];
      max_ratio = std::max(max_ratio, denom / (std::sqrt(r.fresh[i]) + r.eps));
    }
    double f = max_ratio;
    if (r.wd > 0) {
      const double rho =
          std::min(1.0, norm(u0, r.offsets[t], r.offsets[t + 1]) / norm(u, r.offsets[t], r.offsets[t + 1]));
      f = f * rho + (1 - rho);
    }
    f = std::min(std::max(f, a.factor_min), a.factor_max);
    f = std::min(std::max(f, r.last_factor[t] * (1 - a.factor_threshold)), r.last_factor[t] * (1 + a.factor_threshold));
    r.last_factor[t] = f;
    const double coeff = r.coeff_freeze[t] * f;
    for (std::size_t i = r.offsets[t]; i < r.offsets[t + 1]; ++i) r.w[i] -= r.lr * coeff * u[i];
  }
}

template <class T>
void check_close(const T* got, const std::vector<double>& want, double tol, const char* what, int step) {
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double e = std::fabs(double(got[i]) - want[i]) / (1.0 + std::fabs(want[i]));
    if (!(e <= worst)) {
      worst = e;
      at = i;
    }
  }
  INFO(what << " after step " << step << ": worst relative error " << worst << " at " << at);
  CHECK(worst <= tol);
}

}  // namespace

TEST_CASE("1-bit optimizers: other precisions than fp16 are refused unless the caller opts in") {
  problem<mpopt::onebit_adam> p({10}, {});
  using opt32 = mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp32_policy>;
  static_assert(!opt32::verified_precision, "fp32 is not the verified precision");
  try {
    opt32 opt({p.group});
    FAIL("constructed without the opt-in");
  } catch (const mpopt::error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("verified for convergence only with fp16 params and grads") != std::string::npos);
    CHECK(msg.find("fp32 params and fp32 grads") != std::string::npos);
    CHECK(msg.find("accept_unverified_precision") != std::string::npos);
  }
  CHECK_NOTHROW(opt32({p.group}, {}, {}, unverified()));

  std::vector<mpopt::half_t> params(10, mpopt::half_t(0.5f)), grads(10, mpopt::half_t(0.25f));
  mpopt::param_group<mpopt::onebit_lamb, mpopt::fp16_mixed_policy> g16;
  g16.params = params.data();
  g16.grads = grads.data();
  g16.size = 10;
  using opt16 = mpopt::onebit::optimizer<mpopt::onebit_lamb, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>;
  static_assert(opt16::verified_precision, "fp16 params and grads are the verified precision");
  CHECK_NOTHROW(opt16({g16}));
}

TEST_CASE("1-bit optimizers: invalid hyper-parameters are rejected with the field and the value") {
  problem<mpopt::onebit_adam> a({4}, {});
  a.group.hparams.freeze_step = -1;
  CHECK_THROWS_WITH_AS(
      (mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp32_policy>({a.group}, {}, {}, unverified())),
      "group 0: onebit_adam.freeze_step must be >= 0, got -1", mpopt::error);
  problem<mpopt::zero_one_adam> z({4}, {});
  z.group.hparams.var_update_scaler = 0;
  CHECK_THROWS_WITH_AS(
      (mpopt::onebit::optimizer<mpopt::zero_one_adam, mpopt::fp32_policy>({z.group}, {}, {}, unverified())),
      "group 0: zero_one_adam.var_update_scaler must be >= 1, got 0", mpopt::error);
  problem<mpopt::onebit_lamb> l({4}, {});
  l.group.hparams.factor_max = 0.25;
  CHECK_THROWS_WITH_AS(
      (mpopt::onebit::optimizer<mpopt::onebit_lamb, mpopt::fp32_policy>({l.group}, {}, {}, unverified())),
      "group 0: onebit_lamb.factor_max must be finite and >= factor_min, got 0.25", mpopt::error);
  l.group.hparams.factor_max = 4;
  l.group.hparams.beta1 = 1.0;
  CHECK_THROWS_WITH_AS(
      (mpopt::onebit::optimizer<mpopt::onebit_lamb, mpopt::fp32_policy>({l.group}, {}, {}, unverified())),
      "group 0: onebit_lamb.beta1 must be in [0, 1), got 1", mpopt::error);
}

TEST_CASE("1-bit Adam: freeze_step exact steps, then compressed ones, announced before each step") {
  mpopt::onebit_adam::args hp;
  hp.freeze_step = 3;
  problem<mpopt::onebit_adam> p({8}, hp);
  mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());
  const std::vector<communication> want = {communication::exact_allreduce, communication::exact_allreduce,
                                           communication::exact_allreduce, communication::compressed_allreduce,
                                           communication::compressed_allreduce};
  for (int s = 1; s <= 5; ++s) {
    CHECK(opt.next_phase() == (s <= 3 ? phase::warmup : phase::compressed));
    CHECK(opt.next_communication() == want[std::size_t(s - 1)]);
    p.set_grads(s);
    CHECK(opt.step().applied);
    CHECK(opt.step_count() == s);
  }
}

TEST_CASE("0/1 Adam: variance intervals 1 (kappa times), 2, 4; then local steps synchronised at 1, 2, 4 (clipped)") {
  // kappa = 2, var_freeze_step = 10, local_step_scaler = 2, local_step_clipper = 4. By hand:
  //   variance phase: exact at steps 1, 2 (interval 1, twice), 4, 6 (interval 2, twice), 8 (interval 4); the rest
  //   averages grads with the 1-bit allreduce;
  //   local phase: synchronise at 11, 12 (interval 1, twice), 14, 16 (interval 2), 20 (interval 4, clipped at 4).
  mpopt::zero_one_adam::args hp;
  hp.var_freeze_step = 10;
  hp.var_update_scaler = 2;
  hp.local_step_scaler = 2;
  hp.local_step_clipper = 4;
  problem<mpopt::zero_one_adam> p({8}, hp);
  mpopt::onebit::optimizer<mpopt::zero_one_adam, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());
  const std::string want =
      "EECECECECC"
      "SSNSNSNNNS";
  std::string got;
  for (int s = 1; s <= 20; ++s) {
    CHECK(opt.next_phase() == (s <= 10 ? phase::warmup : phase::local_steps));
    const communication c = opt.next_communication();
    got += c == communication::exact_allreduce ? (s <= 10 ? 'E' : '?')
           : c == communication::none          ? 'N'
                                               : (s <= 10 ? 'C' : 'S');
    p.set_grads(s);
    REQUIRE(opt.step().applied);
  }
  CHECK(got == want);
  CHECK(opt.current_schedule().var_interval == 4);
  CHECK(opt.current_schedule().local_step_interval == 4);
}

TEST_CASE("1-bit Adam and 0/1 Adam: exact steps are mpopt::adam (AdamW, no bias correction) bit for bit") {
  mpopt::zero_one_adam::args hp;
  hp.lr = 0.01;
  hp.weight_decay = 0.1;
  hp.var_freeze_step = 50;
  hp.var_update_scaler = 1000;  // every variance-phase step exact
  problem<mpopt::zero_one_adam> p({70, 30}, hp);
  mpopt::onebit::optimizer<mpopt::zero_one_adam, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());

  problem<mpopt::adam> ref({70, 30}, mpopt::zero_one_adam::exact(hp));
  mpopt::optimizer<mpopt::adam, mpopt::fp32_policy> exact({ref.group});
  for (int s = 1; s <= 6; ++s) {
    p.set_grads(s);
    ref.set_grads(s);
    REQUIRE(opt.next_communication() == communication::exact_allreduce);
    opt.step();
    exact.step();
    CHECK(std::memcmp(opt.master(0), exact.master(0), p.params.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(opt.state(0, 0), exact.state(0, 0), p.params.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(opt.state(0, 1), exact.state(0, 1), p.params.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("1-bit Adam on one rank: warm-up and frozen-variance steps against the fp64 algorithm") {
  mpopt::onebit_adam::args hp;
  hp.lr = 0.01;
  hp.weight_decay = 0.05;
  hp.freeze_step = 4;
  problem<mpopt::onebit_adam> p({300}, hp);
  mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());
  adam_reference r{hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, {}, {}, {}};
  r.w.assign(p.params.begin(), p.params.end());
  r.m.assign(r.w.size(), 0);
  r.v.assign(r.w.size(), 0);
  std::vector<float> v_frozen;
  for (int s = 1; s <= 12; ++s) {
    p.set_grads(s);
    REQUIRE(opt.step().applied);
    onebit_adam_reference(r, p.grads, s, hp.freeze_step);
    check_close(opt.master(0), r.w, 2e-6, "weights", s);
    check_close(opt.state(0, 0), r.m, 2e-6, "momentum", s);
    if (s == hp.freeze_step) v_frozen.assign(opt.state(0, 1), opt.state(0, 1) + p.params.size());
    if (s > hp.freeze_step) CHECK(std::memcmp(opt.state(0, 1), v_frozen.data(), v_frozen.size() * sizeof(float)) == 0);
  }
  CHECK(opt.errors(0).worker.size() == opt.error_layout(0).padded);
}

TEST_CASE("0/1 Adam on one rank: variance phase, local steps and synchronisations against the fp64 algorithm") {
  mpopt::zero_one_adam::args hp;
  hp.lr = 0.01;
  hp.weight_decay = 0.0;
  hp.var_freeze_step = 8;
  hp.var_update_scaler = 2;
  hp.local_step_scaler = 3;
  hp.local_step_clipper = 4;
  problem<mpopt::zero_one_adam> p({257}, hp);
  mpopt::onebit::optimizer<mpopt::zero_one_adam, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());
  zero_one_reference r;
  static_cast<adam_reference&>(r) = {hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, {}, {}, {}};
  r.w.assign(p.params.begin(), p.params.end());
  r.m.assign(r.w.size(), 0);
  r.v.assign(r.w.size(), 0);
  r.u.assign(r.w.size(), 0);
  for (int s = 1; s <= 30; ++s) {
    p.set_grads(s);
    REQUIRE(opt.step().applied);
    zero_one_reference_step(r, p.grads, s, hp);
    check_close(opt.master(0), r.w, 1e-5, "weights", s);
    check_close(opt.state(0, 0), r.m, 1e-4, "momentum", s);
    std::vector<double> anchor(r.w.size());
    for (std::size_t i = 0; i < anchor.size(); ++i) anchor[i] = r.w[i] - r.u[i];
    if (s > hp.var_freeze_step) check_close(opt.sync_point(0), anchor, 1e-5, "sync point", s);
  }
  CHECK(opt.current_schedule().local_step_interval == 4);
}

TEST_CASE("1-bit LAMB on one rank: warm-up trust ratios, the frozen coefficient and bounded factors vs fp64") {
  mpopt::onebit_lamb::args hp;
  hp.lr = 0.01;
  hp.weight_decay = 0.01;
  hp.freeze_step = 5;
  hp.coeff_beta = 0.5;
  const std::vector<std::size_t> tensors = {120, 0, 40, 97};
  problem<mpopt::onebit_lamb> p(tensors, hp);
  mpopt::onebit::optimizer<mpopt::onebit_lamb, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());
  lamb_reference r;
  static_cast<adam_reference&>(r) = {hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, {}, {}, {}};
  r.w.assign(p.params.begin(), p.params.end());
  r.m.assign(r.w.size(), 0);
  r.v.assign(r.w.size(), 0);
  r.fresh.assign(r.w.size(), 0);
  // DeepSpeed drops empty tensors: the reference has the other three.
  r.offsets = {0, 120, 160, 257};
  r.coeff_freeze.assign(3, 0);
  r.last_factor.assign(3, 1);
  for (int s = 1; s <= 14; ++s) {
    p.set_grads(s);
    REQUIRE(opt.step().applied);
    onebit_lamb_reference_step(r, p.grads, s, hp);
    check_close(opt.master(0), r.w, 2e-5, "weights", s);
    if (s >= hp.freeze_step) check_close(opt.state(0, 2), r.fresh, 1e-3, "fresh variance", s);
  }
  const auto& ts = opt.lamb_state(0);
  REQUIRE(ts.size() == 4);
  CHECK(ts[0].coeff_freeze == doctest::Approx(r.coeff_freeze[0]).epsilon(1e-5));
  CHECK(ts[3].last_factor == doctest::Approx(r.last_factor[2]).epsilon(1e-5));
  CHECK(ts[0].scaling_coeff == doctest::Approx(r.scaling[0]).epsilon(1e-5));
}

TEST_CASE("1-bit Adam with fp16 and dynamic loss scaling: an overflow skips the step and changes nothing") {
  mpopt::onebit_adam::args hp;
  hp.freeze_step = 2;
  const std::size_t n = 64;
  std::vector<mpopt::half_t> params(n), grads(n);
  for (std::size_t i = 0; i < n; ++i) params[i] = mpopt::half_t(float(i) / 64.0f);
  mpopt::param_group<mpopt::onebit_adam, mpopt::fp16_mixed_policy> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  g.hparams = hp;
  mpopt::dynamic_scaler::args sa;
  sa.init_scale = 1024;
  sa.hysteresis = 1;
  mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler> opt({g}, sa);
  for (int s = 1; s <= 3; ++s) {
    for (std::size_t i = 0; i < n; ++i) grads[i] = mpopt::half_t(grad_value(i, s) * 1024.0f);
    REQUIRE(opt.step().applied);
  }
  const std::vector<float> master(opt.master(0), opt.master(0) + n), m(opt.state(0, 0), opt.state(0, 0) + n);
  const std::vector<mpopt::half_t> before = params;
  grads[5] = mpopt::half_t(std::numeric_limits<float>::infinity());
  const mpopt::step_result r = opt.step();
  CHECK_FALSE(r.applied);
  CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
  CHECK(r.next_loss_scale == doctest::Approx(512));
  CHECK(opt.step_count() == 3);
  CHECK(std::memcmp(opt.master(0), master.data(), n * sizeof(float)) == 0);
  CHECK(std::memcmp(opt.state(0, 0), m.data(), n * sizeof(float)) == 0);
  CHECK(std::memcmp(params.data(), before.data(), n * sizeof(mpopt::half_t)) == 0);
}

TEST_CASE("1-bit Adam: a momentum mask keeps masked coordinates at zero momentum in the compressed phase") {
  mpopt::onebit_adam::args hp;
  hp.freeze_step = 2;
  problem<mpopt::onebit_adam> p({40}, hp);
  mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp32_policy> opt({p.group}, {}, {}, unverified());
  std::vector<std::uint8_t> mask(40, 1);
  for (std::size_t i = 30; i < 40; ++i) mask[i] = 0;
  opt.set_momentum_mask(0, mask.data(), mask.size());
  for (int s = 1; s <= 6; ++s) {
    p.set_grads(s);
    opt.step();
  }
  for (std::size_t i = 0; i < 40; ++i) CHECK((opt.state(0, 0)[i] == 0.0f) == (mask[i] == 0));
  mask[3] = 2;
  CHECK_THROWS_WITH_AS(opt.set_momentum_mask(0, mask.data(), mask.size()),
                       "set_momentum_mask: mask[3] must be 0 or 1, got 2", mpopt::error);
  CHECK_THROWS_WITH_AS(opt.set_momentum_mask(0, mask.data(), 39),
                       "set_momentum_mask: group 0 has 40 elements, got n = 39", mpopt::error);
}
