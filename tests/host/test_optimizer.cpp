// The optimizer front: buffers, rounding points, validation, the skip and the scale-order contracts.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "mpopt/mpopt.hpp"

namespace {

template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
struct fixture {
  std::vector<typename Prec::param_t> params;
  std::vector<typename Prec::grad_t> grads;
  mpopt::param_group<Rule, Prec> group;

  explicit fixture(std::size_t n, typename Rule::args hp = {}) : params(n), grads(n) {
    for (std::size_t i = 0; i < n; ++i) {
      params[i] = mpopt::convert<typename Prec::param_t>(0.25f * float(i) - 1.0f);
      grads[i] = mpopt::convert<typename Prec::grad_t>(0.01f * float(i % 7) - 0.03f);
    }
    group.params = params.data();
    group.grads = grads.data();
    group.size = n;
    group.hparams = hp;
  }
};

template <class T>
bool same_bits(const T* a, const T* b, std::size_t n) {
  return std::memcmp(a, b, n * sizeof(T)) == 0;
}

}  // namespace

TEST_CASE("the param buffer is the master when the types agree; a separate copy otherwise") {
  fixture<mpopt::adamw, mpopt::fp32_policy> f32(10);
  mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> a({f32.group});
  CHECK(a.master(0) == f32.params.data());

  using bf16_pure = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t>,
                                     mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>;
  fixture<mpopt::adamw, bf16_pure> b16(10);
  mpopt::optimizer<mpopt::adamw, bf16_pure> b({b16.group});
  CHECK(b.master(0) == b16.params.data());

  fixture<mpopt::adamw, mpopt::bf16_mixed_policy> mixed(10);
  mpopt::optimizer<mpopt::adamw, mpopt::bf16_mixed_policy> c({mixed.group});
  CHECK(static_cast<const void*>(c.master(0)) != static_cast<const void*>(mixed.params.data()));
  CHECK(reinterpret_cast<std::uintptr_t>(c.master(0)) % 64 == 0);
}

TEST_CASE("rounding points: the param copy is the rounded master; states are rounded once") {
  fixture<mpopt::sgd, mpopt::bf16_mixed_policy> f(33);
  f.group.hparams.lr = 0.1;
  f.group.hparams.momentum = 0.9;
  mpopt::optimizer<mpopt::sgd, mpopt::bf16_mixed_policy> opt({f.group});
  // An fp32 master value that bf16 cannot hold.
  std::vector<double> w0(33);
  for (std::size_t i = 0; i < w0.size(); ++i) w0[i] = 1.0 + 1e-3 * double(i);
  opt.set_master(0, w0.data(), w0.size());
  for (std::size_t i = 0; i < w0.size(); ++i) {
    CHECK(opt.master(0)[i] == float(w0[i]));
    CHECK(f.params[i].bits == mpopt::bf16_t(float(w0[i])).bits);
  }
  for (int s = 0; s < 3; ++s) REQUIRE(opt.step().applied);
  for (std::size_t i = 0; i < w0.size(); ++i) CHECK(f.params[i].bits == mpopt::bf16_t(opt.master(0)[i]).bits);

  // Recompute the three SGD steps in float from the same inputs: the master must agree exactly.
  for (std::size_t i = 0; i < w0.size(); ++i) {
    float w = float(w0[i]), buf = 0;
    const float g = float(f.grads[i]);
    for (int s = 0; s < 3; ++s) {
      buf = s == 0 ? g : buf * 0.9f + 1.0f * g;
      w = w - 0.1f * buf;
    }
    CHECK(opt.master(0)[i] == w);
    CHECK(opt.state(0, 0)[i] == buf);
  }
}

TEST_CASE("bad buffers and hyper-parameters are rejected at construction, naming the group") {
  using opt_t = mpopt::optimizer<mpopt::adam, mpopt::fp32_policy>;
  fixture<mpopt::adam, mpopt::fp32_policy> f(8);
  auto g = f.group;
  g.tensor_sizes = {3, 4};
  CHECK_THROWS_WITH_AS(opt_t({f.group, g}), "group 1: tensor_sizes add up to 7 but size is 8", mpopt::error);
  g = f.group;
  g.grads = nullptr;
  CHECK_THROWS_WITH_AS(opt_t({g}), "group 0: grads is null but size is 8", mpopt::error);
  g = f.group;
  g.hparams.beta1 = 1.0;
  CHECK_THROWS_WITH_AS(opt_t({f.group, g}), "group 1: adam.beta1 must be in [0, 1), got 1", mpopt::error);
  mpopt::step_options o;
  o.max_grad_norm = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(opt_t({f.group}, {}, o), mpopt::error);
}

TEST_CASE("set_hparams validates before changing anything") {
  fixture<mpopt::adamw, mpopt::fp32_policy> f(8);
  mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> opt({f.group});
  auto hp = opt.hparams(0);
  hp.lr = -3;
  CHECK_THROWS_WITH_AS(opt.set_hparams(0, hp), "group 0: adam.lr must be finite and >= 0, got -3", mpopt::error);
  CHECK(opt.hparams(0).lr == doctest::Approx(1e-3));
  hp.lr = 5e-4;
  opt.set_hparams(0, hp);
  CHECK(opt.hparams(0).lr == 5e-4);
  hp.amsgrad = true;
  CHECK_THROWS_AS(opt.set_hparams(0, hp), mpopt::error);
  CHECK_THROWS_AS(opt.set_hparams(3, hp), mpopt::error);
}

TEST_CASE("param groups keep their own hyper-parameters") {
  fixture<mpopt::sgd, mpopt::fp32_policy> a(4), b(4);
  a.group.hparams.lr = 0.5;
  b.group.hparams.lr = 0.0;
  const auto before_b = b.params;
  mpopt::optimizer<mpopt::sgd, mpopt::fp32_policy> opt({a.group, b.group});
  REQUIRE(opt.step().applied);
  CHECK(b.params == before_b);
  for (std::size_t i = 0; i < 4; ++i) CHECK(a.params[i] == 0.25f * float(i) - 1.0f - 0.5f * float(a.grads[i]));
}

TEST_CASE("a non-finite gradient skips the step and leaves every buffer bit-identical") {
  using prec = mpopt::fp16_mixed_policy;
  fixture<mpopt::adam, prec, mpopt::dynamic_scaler> f(64);
  mpopt::optimizer<mpopt::adam, prec, mpopt::dynamic_scaler> opt({f.group});
  REQUIRE(opt.step().applied);
  const auto params = f.params;
  const std::vector<float> master(opt.master(0), opt.master(0) + 64);
  const std::vector<float> m(opt.state(0, 0), opt.state(0, 0) + 64), v(opt.state(0, 1), opt.state(0, 1) + 64);
  const double scale = opt.loss_scale();
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), std::nanf("")}) {
    f.grads[17] = mpopt::half_t(bad);
    const mpopt::step_result r = opt.step();
    CHECK_FALSE(r.applied);
    CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
    CHECK(r.step == 1);
    CHECK(opt.step_count() == 1);
    CHECK(same_bits(params.data(), f.params.data(), 64));
    CHECK(same_bits(master.data(), opt.master(0), 64));
    CHECK(same_bits(m.data(), opt.state(0, 0), 64));
    CHECK(same_bits(v.data(), opt.state(0, 1), 64));
  }
  // Hysteresis 2 absorbs the first overflow, then the scale halves on each.
  CHECK(opt.loss_scale() == scale / 4);
}

TEST_CASE("bf16 without a scaler: non-finite steps skip by default, and can be let through") {
  using prec = mpopt::bf16_mixed_policy;
  fixture<mpopt::sgd, prec> f(16);
  f.grads[3] = mpopt::bf16_t(std::nanf(""));
  mpopt::optimizer<mpopt::sgd, prec> skipping({f.group});
  const auto r = skipping.step();
  CHECK_FALSE(r.applied);
  CHECK(r.loss_scale == 1.0);
  mpopt::no_scaler::args let_through;
  let_through.check_overflow = false;
  mpopt::optimizer<mpopt::sgd, prec> applying({f.group}, let_through);
  CHECK(applying.step().applied);
  CHECK(std::isnan(float(f.params[3])));
}

TEST_CASE("a zero gradient norm is not an error (DeepSpeed's BF16_Optimizer asserts there)") {
  using prec = mpopt::bf16_mixed_policy;
  fixture<mpopt::adamw, prec> f(16);
  for (auto& g : f.grads) g = mpopt::bf16_t(0.0f);
  mpopt::step_options o;
  o.max_grad_norm = 1.0;
  mpopt::optimizer<mpopt::adamw, prec> opt({f.group}, {}, o);
  const auto r = opt.step();
  CHECK(r.applied);
  CHECK(r.grad_norm == 0.0);
  CHECK(r.clip_coef == 1.0);
}

TEST_CASE("clipping is honoured in fp32 too, with DeepSpeed's formula") {
  // SGD lr 1: the applied update is the clipped gradient itself.
  fixture<mpopt::sgd, mpopt::fp32_policy> f(2);
  f.params = {0.f, 0.f};
  f.grads = {3.f, 4.f};  // norm 5
  f.group.hparams.lr = 1.0;
  mpopt::step_options o;
  o.max_grad_norm = 1.0;
  mpopt::optimizer<mpopt::sgd, mpopt::fp32_policy> opt({f.group}, {}, o);
  const auto r = opt.step();
  CHECK(r.grad_norm == doctest::Approx(5.0).epsilon(1e-12));
  const double coef = 1.0 / ((5.0 + 1e-6) / 1.0);
  CHECK(r.clip_coef == doctest::Approx(coef).epsilon(1e-6));
  CHECK(f.params[0] == doctest::Approx(-3.0 * coef).epsilon(1e-6));
  CHECK(f.params[1] == doctest::Approx(-4.0 * coef).epsilon(1e-6));
}

TEST_CASE("unscaling uses the scale that produced the gradients; DeepSpeed's order halves growth steps") {
  // §7.6: S=4, window 1, SGD lr 1, true gradient 1, no clipping.
  auto run = [](bool deepspeed_order) {
    using opt_t = mpopt::optimizer<mpopt::sgd, mpopt::fp32_policy, mpopt::dynamic_scaler>;
    fixture<mpopt::sgd, mpopt::fp32_policy, mpopt::dynamic_scaler> f(1);
    f.params = {0.f};
    f.group.hparams.lr = 1.0;
    mpopt::dynamic_scale_args s;
    s.init_scale = 4;
    s.scale_window = 1;
    mpopt::step_options o;
    o.deepspeed_scale_order = deepspeed_order;
    opt_t opt({f.group}, s, o);
    std::vector<float> updates;
    for (int i = 0; i < 4; ++i) {
      const float before = f.params[0];
      f.grads[0] = float(opt.loss_scale()) * 1.0f;  // backward of the scaled loss
      REQUIRE(opt.step().applied);
      updates.push_back(before - f.params[0]);
    }
    return updates;
  };
  CHECK(run(false) == std::vector<float>{1.f, 1.f, 1.f, 1.f});
  CHECK(run(true) == std::vector<float>{1.f, 0.5f, 0.5f, 0.5f});
}

TEST_CASE("error_at_min: step() returns an error status and changes nothing") {
  using opt_t = mpopt::optimizer<mpopt::sgd, mpopt::fp32_policy, mpopt::dynamic_scaler>;
  fixture<mpopt::sgd, mpopt::fp32_policy, mpopt::dynamic_scaler> f(4);
  mpopt::dynamic_scale_args s;
  s.init_scale = 2;
  s.hysteresis = 1;
  opt_t opt({f.group}, s);
  f.grads[0] = std::numeric_limits<float>::infinity();
  auto r = opt.step();
  CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
  CHECK(r.next_loss_scale == 1.0);
  const auto state = opt.scaler_state();
  r = opt.step();
  CHECK_FALSE(r.applied);
  CHECK(r.reason == mpopt::skip_reason::scale_at_minimum);
  CHECK(r.error.code == mpopt::errc::scale_at_minimum);
  CHECK(std::memcmp(&state, &opt.scaler_state(), sizeof state) == 0);
}
