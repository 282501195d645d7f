// optimizer::step_pipelined, the step of the CPU-offload optimizer (cuda/offload.cuh): the same bits as step() for
// elementwise and per-tensor rules, rounding options and overflow skips; every piece handed over exactly once, grads
// before they are read and params after they are final; and the streaming order when no grad statistics are needed.
#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "mpopt/mpopt.hpp"

namespace {

struct event {
  bool grads;  // grads_ready, else params_ready
  std::size_t g, begin, end;
};

template <class Rule, class Prec, class Scaler>
struct run {
  static constexpr std::size_t sizes[3] = {30000, 0, 9001};  // pieces with a tail; an empty group
  std::vector<std::vector<typename Prec::param_t>> params;
  std::vector<std::vector<typename Prec::grad_t>> grads;
  mpopt::optimizer<Rule, Prec, Scaler> opt;

  static std::vector<mpopt::param_group<Rule, Prec>> make_groups(run& r) {
    std::vector<mpopt::param_group<Rule, Prec>> gs;
    for (std::size_t g = 0; g < 3; ++g) {
      r.params.emplace_back(sizes[g]);
      r.grads.emplace_back(sizes[g]);
      for (std::size_t i = 0; i < sizes[g]; ++i)
        r.params[g][i] = mpopt::convert<typename Prec::param_t>(float(double((i * 7919 + g) % 1000) / 500.0 - 1.0));
      mpopt::param_group<Rule, Prec> spec{r.params[g].data(), r.grads[g].data(), sizes[g], {}, {}};
      if (g == 0) spec.tensor_sizes = {12000, 0, 18000};  // LAMB: tensors across the pieces
      gs.push_back(spec);
    }
    return gs;
  }

  run(typename Scaler::args sa, mpopt::step_options o) : opt(make_groups(*this), sa, o) {}

  void set_grads(int step) {
    for (std::size_t g = 0; g < 3; ++g)
      for (std::size_t i = 0; i < sizes[g]; ++i) {
        const float v = float(double((i * 104729 + std::size_t(step) * 31 + g) % 2001) / 1000.0 - 1.0) * 1e-2f;
        grads[g][i] = mpopt::convert<typename Prec::grad_t>(v);
      }
    if (step == 2) grads[2][17] = mpopt::convert<typename Prec::grad_t>(std::numeric_limits<float>::infinity());
  }
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class T>
bool same_bits(const T* a, const T* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(T)) == 0;
}

// Five steps (the third with an inf grad) through step() and through step_pipelined(): the same results and bits,
// and the callbacks as documented.
template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
void check_same_as_step(typename Scaler::args sa = {}, mpopt::step_options o = {}) {
  run<Rule, Prec, Scaler> plain(sa, o), piped(sa, o);
  const std::size_t piece = 2 * mpopt::host::reduce_block;
  const bool need_stats = Scaler::skips_on_overflow(sa) || o.max_grad_norm > 0;
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    plain.set_grads(step);
    piped.set_grads(step);
    std::vector<event> events;
    const mpopt::step_result want = plain.opt.step();
    const mpopt::step_result got = piped.opt.step_pipelined(
        piece,
        [&](std::size_t g, std::size_t b, std::size_t e) {
          events.push_back({true, g, b, e});
        },
        [&](std::size_t g, std::size_t b, std::size_t e) {
          // The params of the piece are final when handed over.
          events.push_back({false, g, b, e});
        });
    CHECK(got.applied == want.applied);
    CHECK(got.reason == want.reason);
    CHECK(std::memcmp(&got.grad_norm, &want.grad_norm, sizeof(double)) == 0);
    CHECK(got.loss_scale == want.loss_scale);
    CHECK(got.step == want.step);
    for (std::size_t g = 0; g < 3; ++g) {
      CAPTURE(g);
      CHECK(same_bits(piped.params[g], plain.params[g]));
      const std::size_t n = plain.params[g].size();
      CHECK(same_bits(piped.opt.master(g), plain.opt.master(g), n));
      for (int j = 0; j < plain.opt.num_states(g); ++j)
        CHECK(same_bits(piped.opt.state(g, j), plain.opt.state(g, j), n));
      if (plain.opt.compensation(g) != nullptr)
        CHECK(same_bits(piped.opt.compensation(g), plain.opt.compensation(g), n));
    }
    // Each piece once per kind; grads first; with statistics every grad before any param.
    std::vector<std::tuple<std::size_t, std::size_t, std::size_t>> grads_seen, params_seen;
    bool param_seen = false, grads_after_params = false;
    for (const event& e : events) {
      (e.grads ? grads_seen : params_seen).emplace_back(e.g, e.begin, e.end);
      if (e.grads && param_seen) grads_after_params = true;
      param_seen = param_seen || !e.grads;
    }
    std::vector<std::tuple<std::size_t, std::size_t, std::size_t>> pieces;
    for (std::size_t g = 0; g < 3; ++g)
      for (std::size_t b = 0; b < run<Rule, Prec, Scaler>::sizes[g]; b += piece)
        pieces.emplace_back(g, b, std::min(run<Rule, Prec, Scaler>::sizes[g], b + piece));
    CHECK(grads_seen == pieces);
    if (got.applied) {
      CHECK(params_seen == pieces);
    } else {
      CHECK(params_seen.empty());
    }
    if (need_stats) CHECK_FALSE(grads_after_params);
  }
}

using bf16_fp32_grads =
    mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>>;

}  // namespace

TEST_CASE("step_pipelined gives step()'s bits: elementwise rules") {
  mpopt::step_options clip;
  clip.max_grad_norm = 0.5;
  SUBCASE("AdamW, bf16 params, fp32 master, clipping") {
    check_same_as_step<mpopt::adamw, mpopt::bf16_mixed_policy>({}, clip);
  }
  SUBCASE("AdamW, fp16 params, dynamic scaler (the third step overflows)") {
    mpopt::dynamic_scaler::args sa;
    sa.hysteresis = 1;
    check_same_as_step<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(sa);
  }
  SUBCASE("AdamW, all-bf16") {
    check_same_as_step<mpopt::adamw, mpopt::bf16_pure_policy>({}, clip);
  }
  SUBCASE("SGD with momentum, bf16 master with Kahan summation") {
    check_same_as_step<mpopt::sgd, mpopt::bf16_kahan_policy>({}, clip);
  }
  SUBCASE("Adagrad, bf16 master with stochastic rounding") {
    check_same_as_step<mpopt::adagrad, mpopt::bf16_stochastic_policy>({}, clip);
  }
  SUBCASE("Lion, fp32 grads (a separate accumulation dtype), unchecked: the pieces stream") {
    mpopt::no_scaler::args unchecked;
    unchecked.check_overflow = false;
    check_same_as_step<mpopt::lion, bf16_fp32_grads>(unchecked);
  }
}

TEST_CASE("step_pipelined gives step()'s bits: LAMB's per-tensor ratios take each group whole") {
  mpopt::step_options clip;
  clip.max_grad_norm = 1.0;
  check_same_as_step<mpopt::lamb, mpopt::bf16_mixed_policy>({}, clip);
}

TEST_CASE("step_pipelined without grad statistics streams: each piece is updated as soon as it arrives") {
  mpopt::no_scaler::args unchecked;
  unchecked.check_overflow = false;
  run<mpopt::adamw, mpopt::bf16_mixed_policy, mpopt::no_scaler> r(unchecked, {});
  r.set_grads(0);
  std::vector<event> events;
  const mpopt::step_result res = r.opt.step_pipelined(
      mpopt::host::reduce_block,
      [&](std::size_t g, std::size_t b, std::size_t e) {
        events.push_back({true, g, b, e});
      },
      [&](std::size_t g, std::size_t b, std::size_t e) {
        events.push_back({false, g, b, e});
      });
  REQUIRE(res.applied);
  REQUIRE(events.size() % 2 == 0);
  CHECK(events.size() == 2 * (8 + 3));  // 30000 and 9001 elements in 4096-element pieces
  for (std::size_t k = 0; k < events.size(); k += 2) {
    CHECK(events[k].grads);
    CHECK_FALSE(events[k + 1].grads);
    CHECK(events[k].begin == events[k + 1].begin);
    CHECK(events[k].end == events[k + 1].end);
  }
}

TEST_CASE("step_pipelined refuses pieces off the reduction grid and sharded optimizers") {
  run<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> r({}, {});
  auto none = [](std::size_t, std::size_t, std::size_t) {};
  CHECK_THROWS_WITH_AS(r.opt.step_pipelined(1000, none, none),
                       "step_pipelined: piece_elements must be a positive multiple of 4096, got 1000", mpopt::error);
  CHECK_THROWS_WITH_AS(r.opt.step_pipelined(0, none, none),
                       "step_pipelined: piece_elements must be a positive multiple of 4096, got 0", mpopt::error);
  CHECK(r.opt.step_count() == 0);
  std::vector<float> p(100), g(100);
  mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> spec{p.data(), g.data(), 100, {}, {}};
  mpopt::comm::single_rank one;
  mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> stage2({spec}, one, {2});
  CHECK_THROWS_WITH_AS(stage2.step_pipelined(4096, none, none),
                       "step_pipelined: one rank at ZeRO stage 0 only, this optimizer has 1 ranks at stage 2",
                       mpopt::error);
}
