// LAMB and Lion against fp64 re-computations of their published update formulas, written here
// independently of rule/ (torch 1.13 ships neither).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "mpopt/optimizer.hpp"
#include "mpopt/rules.hpp"

namespace {

struct problem {
  std::vector<double> w0;
  std::vector<std::vector<double>> grads;
  std::vector<std::size_t> tensors;
};

problem make_problem(std::uint32_t seed, int steps) {
  problem p;
  p.tensors = {7, 1, 24, 0, 9};  // a one-element and an empty tensor on purpose
  std::size_t n = 0;
  for (std::size_t t : p.tensors) n += t;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (std::size_t i = 0; i < n; ++i) p.w0.push_back(double(float(u(rng) * (i % 5 == 0 ? 10.0 : 1.0))));
  for (int s = 0; s < steps; ++s) {
    std::vector<double> g;
    for (std::size_t i = 0; i < n; ++i) g.push_back(double(float(u(rng) * (1.0 + s % 3))));
    p.grads.push_back(g);
  }
  return p;
}

// You et al. (2019) Algorithm 2 with DeepSpeed FusedLamb's trust-ratio clamp, all in double.
std::vector<std::vector<double>> lamb_reference(const problem& p, const mpopt::lamb::args& a) {
  std::vector<double> w = p.w0, m(w.size(), 0.0), v(w.size(), 0.0);
  std::vector<std::vector<double>> out;
  for (std::size_t s = 0; s < p.grads.size(); ++s) {
    const double t = double(s + 1);
    const double bc1 = a.bias_correction ? 1 - std::pow(a.beta1, t) : 1,
                 bc2 = a.bias_correction ? 1 - std::pow(a.beta2, t) : 1;
    std::size_t off = 0;
    for (std::size_t len : p.tensors) {
      std::vector<double> r(len);
      double wn = 0, rn = 0;
      for (std::size_t i = 0; i < len; ++i) {
        const std::size_t k = off + i;
        const double g = p.grads[s][k];
        m[k] = a.beta1 * m[k] + (1 - a.beta1) * g;
        v[k] = a.beta2 * v[k] + (1 - a.beta2) * g * g;
        r[i] = (m[k] / bc1) / (std::sqrt(v[k] / bc2) + a.eps) + a.weight_decay * w[k];
        wn += w[k] * w[k];
        rn += r[i] * r[i];
      }
      wn = std::sqrt(wn);
      rn = std::sqrt(rn);
      double trust = 1.0;
      if (wn > 0 && rn > 0) trust = std::min(std::max(wn / rn, a.min_coeff), a.max_coeff);
      for (std::size_t i = 0; i < len; ++i) w[off + i] -= a.lr * trust * r[i];
      off += len;
    }
    out.push_back(w);
  }
  return out;
}

// Chen et al. (2023) Algorithm 2, in double.
std::vector<std::vector<double>> lion_reference(const problem& p, const mpopt::lion::args& a) {
  std::vector<double> w = p.w0, m(w.size(), 0.0);
  std::vector<std::vector<double>> out;
  for (const auto& g : p.grads) {
    for (std::size_t k = 0; k < w.size(); ++k) {
      const double c = a.beta1 * m[k] + (1 - a.beta1) * g[k];
      const double sgn = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
      w[k] = w[k] - a.lr * (sgn + a.weight_decay * w[k]);
      m[k] = a.beta2 * m[k] + (1 - a.beta2) * g[k];
    }
    out.push_back(w);
  }
  return out;
}

template <class Rule, class Prec>
std::vector<std::vector<double>> run(const problem& p, const typename Rule::args& a) {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<param_t> params(p.w0.size());
  std::vector<grad_t> grads(p.w0.size());
  mpopt::param_group<Rule, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = params.size();
  g.tensor_sizes = p.tensors;
  g.hparams = a;
  mpopt::optimizer<Rule, Prec> opt({g});
  opt.set_master(0, p.w0.data(), p.w0.size());
  std::vector<std::vector<double>> out;
  for (const auto& step : p.grads) {
    for (std::size_t i = 0; i < step.size(); ++i) grads[i] = mpopt::convert<grad_t>(step[i]);
    REQUIRE(opt.step().applied);
    std::vector<double> w;
    for (std::size_t i = 0; i < params.size(); ++i) w.push_back(mpopt::convert<double>(opt.master(0)[i]));
    out.push_back(w);
  }
  return out;
}

// Largest |a - b| / max(|b|, floor) over the whole trajectory. The floor keeps weights that pass near zero
// (fp32 rounding of their O(1) neighbours' arithmetic is absolute, not relative) from dominating.
double max_rel_diff(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b,
                    double floor = 1e-2) {
  double worst = 0;
  for (std::size_t s = 0; s < b.size(); ++s)
    for (std::size_t i = 0; i < b[s].size(); ++i)
      worst = std::max(worst, std::fabs(a[s][i] - b[s][i]) / std::max(std::fabs(b[s][i]), floor));
  return worst;
}

}  // namespace

TEST_CASE("LAMB matches an fp64 re-computation of its published formula") {
  const problem p = make_problem(11, 25);
  mpopt::lamb::args a;
  a.lr = 1e-2;
  a.weight_decay = 0.01;
  SUBCASE("DeepSpeed clamp [0.01, 10]") {
    const auto ref = lamb_reference(p, a);
    CHECK(max_rel_diff(run<mpopt::lamb, mpopt::fp64_policy>(p, a), ref) < 1e-12);
    CHECK(max_rel_diff(run<mpopt::lamb, mpopt::fp32_policy>(p, a), ref) < 1e-5);
  }
  SUBCASE("a binding clamp and no bias correction") {
    a.max_coeff = 0.5;  // the 10x-scaled entries make |w|/|u| large, so this clamp binds
    a.bias_correction = false;
    const auto ref = lamb_reference(p, a);
    CHECK(max_rel_diff(run<mpopt::lamb, mpopt::fp64_policy>(p, a), ref) < 1e-12);
    CHECK(max_rel_diff(run<mpopt::lamb, mpopt::fp32_policy>(p, a), ref) < 1e-5);
  }
}

TEST_CASE("Lion matches an fp64 re-computation of its published formula") {
  const problem p = make_problem(12, 25);
  mpopt::lion::args a;
  a.lr = 1e-3;
  a.weight_decay = 0.1;
  const auto ref = lion_reference(p, a);
  CHECK(max_rel_diff(run<mpopt::lion, mpopt::fp64_policy>(p, a), ref) < 1e-12);
  CHECK(max_rel_diff(run<mpopt::lion, mpopt::fp32_policy>(p, a), ref) < 1e-5);
}

TEST_CASE("hyper-parameters are validated and the error names the field and the value") {
  using mpopt::status;
  auto message = [](const status& s) { return s.message; };
  mpopt::adam::args adam;
  adam.lr = -1;
  CHECK(message(mpopt::adam::validate(adam)) == "adam.lr must be finite and >= 0, got -1");
  adam = {};
  adam.beta2 = 1.0;
  CHECK(message(mpopt::adam::validate(adam)) == "adam.beta2 must be in [0, 1), got 1");
  adam = {};
  adam.eps = 0;
  CHECK(message(mpopt::adam::validate(adam)) == "adam.eps must be finite and > 0, got 0");
  adam = {};
  adam.weight_decay = std::nan("");
  CHECK(message(mpopt::adam::validate(adam)) == "adam.weight_decay must be finite and >= 0, got nan");
  CHECK(mpopt::adam::validate(mpopt::adam::args{}).ok());
  CHECK(mpopt::adamw::validate(mpopt::adamw::args{}).ok());

  mpopt::sgd::args sgd;
  sgd.lr = INFINITY;
  CHECK(message(mpopt::sgd::validate(sgd)) == "sgd.lr must be finite and >= 0, got inf");
  sgd = {};
  sgd.nesterov = true;
  CHECK(message(mpopt::sgd::validate(sgd)).find("sgd.nesterov requires momentum > 0") == 0);
  sgd.momentum = 0.9;
  CHECK(mpopt::sgd::validate(sgd).ok());
  sgd.dampening = 1.5;
  CHECK(message(mpopt::sgd::validate(sgd)) == "sgd.dampening must be in [0, 1], got 1.5");

  mpopt::adagrad::args ada;
  ada.lr_decay = -0.5;
  CHECK(message(mpopt::adagrad::validate(ada)) == "adagrad.lr_decay must be finite and >= 0, got -0.5");
  mpopt::lamb::args lamb;
  lamb.max_coeff = 0.001;
  CHECK(message(mpopt::lamb::validate(lamb)) == "lamb.max_coeff must be >= min_coeff, got 0.001");
  mpopt::lion::args lion;
  lion.beta1 = -0.1;
  CHECK(message(mpopt::lion::validate(lion)) == "lion.beta1 must be in [0, 1), got -0.10000000000000001");
}
