// The loss-scale state machine and the unscale + clip factor: DeepSpeed's unit-test vectors (§7.1, §7.2 of
// reference/deepspeed_precision.md), the derived vectors of §7.6, the presets, validation, save/restore, and
// long random sequences against an independent fp64 transliteration of DeepSpeed's update_scale.
#include <doctest/doctest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "mpopt/scaler/loss_scaler.hpp"
#include "mpopt/scaler/scalers.hpp"
#include "mpopt/scaler/unscale_clip.hpp"

namespace {

using mpopt::dynamic_scale_args;
using mpopt::scale_event;
using mpopt::scaler_state;

// What the state machine did over a sequence of updates, as space-separated text so a failed CHECK shows the
// whole trajectory.
struct trace {
  std::string before, after, hysteresis, events;
  std::vector<std::int64_t> iters;
};

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

void append(std::string& s, const std::string& word) {
  s += (s.empty() ? "" : " ") + word;
}

// Bitwise on purpose: a restored or untouched state must be the same bytes (scaler_state has no padding).
bool same_bits(const scaler_state& x, const scaler_state& y) {
  unsigned char a[sizeof x], b[sizeof y];
  std::memcpy(a, &x, sizeof a);
  std::memcpy(b, &y, sizeof b);
  return std::memcmp(a, b, sizeof a) == 0;
}

// `seq`: 'O' for an overflow step, 'C' for a clean one.
trace run(const dynamic_scale_args& a, const char* seq) {
  REQUIRE(mpopt::validate(a).ok());
  scaler_state s = mpopt::initial_scaler_state(a);
  trace t;
  for (const char* c = seq; *c; ++c) {
    REQUIRE((*c == 'O' || *c == 'C'));
    const scaler_state saved = s;
    append(t.before, num(s.scale));
    const scale_event e = mpopt::update_scale(s, a, *c == 'O');
    if (e == scale_event::error_at_min) CHECK(same_bits(saved, s));
    append(t.after, num(s.scale));
    append(t.hysteresis, std::to_string(s.hysteresis_left));
    append(t.events, mpopt::to_string(e));
    t.iters.push_back(s.iter);
  }
  return t;
}

std::string repeat(const std::string& word, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) append(s, word);
  return s;
}

dynamic_scale_args zero(float init, std::int64_t window = 1000, std::int32_t hysteresis = 2, float min = 1.f) {
  dynamic_scale_args a = dynamic_scale_args::deepspeed();
  a.init_scale = init;
  a.scale_window = window;
  a.hysteresis = hysteresis;
  a.min_scale = min;
  return a;
}

dynamic_scale_args legacy(float init, std::int64_t window = 1000, float min = 1.f) {
  dynamic_scale_args a = dynamic_scale_args::deepspeed_legacy();
  a.init_scale = init;
  a.scale_window = window;
  a.min_scale = min;
  return a;
}

}  // namespace

TEST_SUITE("loss scaler: DeepSpeed unit-test vectors (§7.1 non-ZeRO, §7.2 ZeRO)") {
  TEST_CASE("no_overflow: init 2^8, window 2, 10 clean steps; the iteration counts every step") {
    const char* expected = "256 256 512 512 1024 1024 2048 2048 4096 4096";
    for (const dynamic_scale_args& a : {legacy(256, 2), zero(256, 2)}) {
      const trace t = run(a, "CCCCCCCCCC");
      CHECK(t.after == expected);
      CHECK(t.before == "256 256 256 512 512 1024 1024 2048 2048 4096");
      for (std::size_t i = 0; i < t.iters.size(); ++i) CHECK(t.iters[i] == std::int64_t(i + 1));
      CHECK(t.events == "unchanged unchanged grew unchanged grew unchanged grew unchanged grew unchanged");
    }
  }

  TEST_CASE("all_overflow (fused, non-ZeRO): init 2^4, 8 overflows clamp at min 1 without an error") {
    const trace t = run(legacy(16), "OOOOOOOO");
    CHECK(t.after == "8 4 2 1 1 1 1 1");
    for (std::size_t i = 0; i < t.iters.size(); ++i) CHECK(t.iters[i] == std::int64_t(i + 1));
    CHECK(t.events == repeat("backed_off", 8));
  }

  TEST_CASE("all_overflow (unfused, non-ZeRO): min_loss_scale 2") {
    CHECK(run(legacy(16, 1000, 2), "OOOOOOOO").after == "8 4 2 2 2 2 2 2");
  }

  TEST_CASE("some_overflow (non-ZeRO): 256 -> 64 (iter 2), 3 clean -> 128 (iter 5), overflow -> 64 (iter 6)") {
    const trace t = run(legacy(256, 2), "OOCCCO");
    CHECK(t.after == "128 64 64 64 128 64");
    CHECK(t.iters == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6});
  }

  TEST_CASE("ZeRO all_overflow: hysteresis 1, init 2^8, 8 overflows stop exactly at 1, so no error") {
    const trace t = run(zero(256, 1000, 1), "OOOOOOOO");
    CHECK(t.after == "128 64 32 16 8 4 2 1");
    CHECK(t.events == repeat("backed_off", 8));
  }

  TEST_CASE("ZeRO some_overflow: hysteresis 1, same 256 -> 64 -> 128 -> 64 pattern") {
    const trace t = run(zero(256, 2, 1), "OOCCCO");
    CHECK(t.after == "128 64 64 64 128 64");
  }
}

TEST_SUITE("loss scaler: derived vectors (§7.6)") {
  TEST_CASE("A: ZeRO defaults, O O O C O") {
    const trace t = run(dynamic_scale_args::deepspeed(), "OOOCO");
    CHECK(t.before == "65536 65536 32768 16384 16384");
    CHECK(t.after == "65536 32768 16384 16384 8192");
    CHECK(t.hysteresis == "1 1 1 1 1");
    CHECK(t.events == "absorbed backed_off backed_off unchanged backed_off");
  }

  TEST_CASE("A': non-ZeRO, same config: hysteresis ignored") {
    const trace t = run(dynamic_scale_args::deepspeed_legacy(), "OOOCO");
    CHECK(t.after == "32768 16384 8192 8192 4096");
  }

  TEST_CASE("B: init 256, window 2, 7 clean steps, either implementation") {
    CHECK(run(zero(256, 2), "CCCCCCC").after == "256 256 512 512 1024 1024 2048");
    CHECK(run(legacy(256, 2), "CCCCCCC").after == "256 256 512 512 1024 1024 2048");
  }

  TEST_CASE("C: consecutive hysteresis on: O C O C O C O never lowers the scale") {
    dynamic_scale_args a = zero(256, 2, 2);
    a.consecutive_hysteresis = true;
    const trace t = run(a, "OCOCOCO");
    CHECK(t.after == repeat("256", 7));
    CHECK(t.hysteresis == "1 2 1 2 1 2 1");
    CHECK(t.events == "absorbed unchanged absorbed unchanged absorbed unchanged absorbed");
  }

  TEST_CASE("C': the same pattern with consecutive hysteresis off halves on every later overflow") {
    const trace t = run(zero(256, 1000, 2), "OCOCOCO");
    CHECK(t.after == "256 256 128 128 64 64 32");
    CHECK(t.hysteresis == repeat("1", 7));
  }

  TEST_CASE("D: init 2, min 1, hysteresis 1: ZeRO errors on the second overflow, non-ZeRO clamps") {
    const trace z = run(zero(2, 1000, 1), "OO");
    CHECK(z.before == "2 1");
    CHECK(z.after == "1 1");
    CHECK(z.events == "backed_off error_at_min");
    CHECK(z.iters == std::vector<std::int64_t>{1, 1});  // the erroring update is not counted
    const trace l = run(legacy(2), "OO");
    CHECK(l.after == "1 1");
    CHECK(l.events == "backed_off backed_off");
  }

  TEST_CASE("E: init 4, min 1, hysteresis 2: 4 (h1), 2, 1, error") {
    const trace t = run(zero(4, 1000, 2), "OOOO");
    CHECK(t.before == "4 4 2 1");
    CHECK(t.after == "4 2 1 1");
    CHECK(t.hysteresis == "1 1 1 1");
    CHECK(t.events == "absorbed backed_off backed_off error_at_min");
  }

  TEST_CASE("F: growth refills the hysteresis (consecutive off)") {
    const trace t = run(zero(256, 2, 2), "OCCCOO");
    CHECK(t.after == "256 256 256 512 512 256");
    CHECK(t.hysteresis == "1 1 1 2 1 1");
    CHECK(t.events == "absorbed unchanged unchanged grew absorbed backed_off");
  }

  TEST_CASE("G: init 256, window 2, hysteresis 1, both implementations") {
    const char* expected = "128 64 64 64 128 128 256 128";
    CHECK(run(zero(256, 2, 1), "OOCCCCCO").after == expected);
    CHECK(run(legacy(256, 2), "OOCCCCCO").after == expected);
  }

  TEST_CASE("H: init 1024, window 3: growth on the 4th clean step, then every 3") {
    CHECK(run(zero(1024, 3), "CCCCCCCCC").after == "1024 1024 1024 2048 2048 2048 4096 4096 4096");
  }

  TEST_CASE("I: hysteresis 0 is accepted, as in DeepSpeed, and the scale never backs off") {
    const dynamic_scale_args a = zero(256, 1000, 0);
    CHECK(mpopt::validate(a).ok());
    const trace t = run(a, "OOO");
    CHECK(t.after == "256 256 256");
    CHECK(t.hysteresis == "-1 -2 -3");
    CHECK(t.events == "absorbed absorbed absorbed");
  }
}

TEST_SUITE("loss scaler: presets, ceiling, validation, save/restore") {
  TEST_CASE("presets hold the documented values") {
    const dynamic_scale_args z = dynamic_scale_args::deepspeed();
    CHECK(z.init_scale == 65536.f);
    CHECK(z.scale_window == 1000);
    CHECK(z.hysteresis == 2);
    CHECK_FALSE(z.consecutive_hysteresis);
    CHECK(z.min_scale == 1.f);
    CHECK(std::isinf(z.max_scale));
    CHECK(z.growth_factor == 2.f);
    CHECK(z.backoff_factor == 0.5f);
    CHECK(z.error_at_min);
    CHECK(z.deepspeed_window);
    const dynamic_scale_args l = dynamic_scale_args::deepspeed_legacy();
    CHECK(l.hysteresis == 1);
    CHECK_FALSE(l.error_at_min);
    CHECK(l.deepspeed_window);
    const dynamic_scale_args t = dynamic_scale_args::torch_grad_scaler();
    CHECK(t.init_scale == 65536.f);
    CHECK(t.scale_window == 2000);
    CHECK(t.hysteresis == 1);
    CHECK(t.min_scale == FLT_MIN);
    CHECK_FALSE(t.error_at_min);
    CHECK_FALSE(t.deepspeed_window);
    for (const auto& a : {z, l, t}) CHECK(mpopt::validate(a).ok());
  }

  TEST_CASE("torch GradScaler preset: grows on the 2000th consecutive clean step; an overflow restarts the count") {
    const dynamic_scale_args a = dynamic_scale_args::torch_grad_scaler();
    scaler_state s = mpopt::initial_scaler_state(a);
    for (int i = 0; i < 1999; ++i) REQUIRE(mpopt::update_scale(s, a, false) == scale_event::unchanged);
    CHECK(s.scale == 65536.f);
    CHECK(s.growth_tracker == 1999);
    CHECK(mpopt::update_scale(s, a, false) == scale_event::grew);  // update index 1999
    CHECK(s.scale == 131072.f);
    CHECK(s.growth_tracker == 0);
    for (int i = 0; i < 1000; ++i) mpopt::update_scale(s, a, false);
    CHECK(mpopt::update_scale(s, a, true) == scale_event::backed_off);  // no hysteresis
    CHECK(s.scale == 65536.f);
    CHECK(s.growth_tracker == 0);
    for (int i = 0; i < 1999; ++i) REQUIRE(mpopt::update_scale(s, a, false) == scale_event::unchanged);
    CHECK(mpopt::update_scale(s, a, false) == scale_event::grew);
    CHECK(s.scale == 131072.f);

    // DeepSpeed's rule with the same window grows one step later, on the window+1-th clean step.
    dynamic_scale_args ds = a;
    ds.deepspeed_window = true;
    scaler_state d = mpopt::initial_scaler_state(ds);
    for (int i = 0; i < 2000; ++i) REQUIRE(mpopt::update_scale(d, ds, false) == scale_event::unchanged);
    CHECK(mpopt::update_scale(d, ds, false) == scale_event::grew);  // update index 2000
    for (int i = 0; i < 1999; ++i) REQUIRE(mpopt::update_scale(d, ds, false) == scale_event::unchanged);
    CHECK(mpopt::update_scale(d, ds, false) == scale_event::grew);  // then every 2000
  }

  TEST_CASE("torch GradScaler preset: no error at the floor, which is the smallest normal float") {
    dynamic_scale_args a = dynamic_scale_args::torch_grad_scaler();
    a.init_scale = 4 * FLT_MIN;
    const trace t = run(a, "OOOO");
    CHECK(t.events == repeat("backed_off", 4));
    CHECK(t.after == num(2 * FLT_MIN) + " " + num(FLT_MIN) + " " + num(FLT_MIN) + " " + num(FLT_MIN));
  }

  TEST_CASE("max_scale clamps growth; with no maximum the scale stops below inf") {
    dynamic_scale_args a = zero(1024, 1, 1);
    a.max_scale = 3000;
    const trace t = run(a, "CCCCCO");
    CHECK(t.after == "1024 2048 3000 3000 3000 1500");
    CHECK(t.events == "unchanged grew grew grew grew backed_off");

    dynamic_scale_args big = zero(0x1p126f, 1, 1);
    scaler_state s = mpopt::initial_scaler_state(big);
    for (int i = 0; i < 10; ++i) mpopt::update_scale(s, big, false);
    CHECK(s.scale == 0x1p127f);  // 2^128 is not a float: stays
    big.growth_factor = 4;
    big.init_scale = 0x1p125f;
    s = mpopt::initial_scaler_state(big);
    mpopt::update_scale(s, big, false);
    CHECK(mpopt::update_scale(s, big, false) == scale_event::grew);
    CHECK(s.scale == 0x1p127f);
    CHECK(mpopt::update_scale(s, big, false) == scale_event::grew);
    CHECK(s.scale == 0x1p127f);
    CHECK(std::isfinite(s.scale));
  }

  TEST_CASE("max_scale equal to init_scale keeps the scale fixed until an overflow") {
    dynamic_scale_args a = zero(512, 1, 1);
    a.max_scale = 512;
    CHECK(run(a, "CCCOCCC").after == "512 512 512 256 256 512 512");
  }

  TEST_CASE("validation names the field and the value") {
    auto message = [](void (*edit)(dynamic_scale_args&)) {
      dynamic_scale_args a;
      edit(a);
      const mpopt::status s = mpopt::validate(a);
      CHECK(s.code == mpopt::errc::invalid_argument);
      return s.message;
    };
    CHECK(message([](dynamic_scale_args& a) { a.scale_window = 0; }) ==
          "dynamic_scale_args.scale_window must be > 0, got 0");
    CHECK(message([](dynamic_scale_args& a) { a.scale_window = -3; }) ==
          "dynamic_scale_args.scale_window must be > 0, got -3");
    CHECK(message([](dynamic_scale_args& a) { a.init_scale = 0; }) ==
          "dynamic_scale_args.init_scale must be finite and > 0, got 0");
    CHECK(message([](dynamic_scale_args& a) { a.init_scale = INFINITY; }) ==
          "dynamic_scale_args.init_scale must be finite and > 0, got inf");
    CHECK(message([](dynamic_scale_args& a) { a.init_scale = NAN; }) ==
          "dynamic_scale_args.init_scale must be finite and > 0, got nan");
    CHECK(message([](dynamic_scale_args& a) { a.min_scale = -0.5f; }) ==
          "dynamic_scale_args.min_scale must be finite and > 0, got -0.5");
    CHECK(message([](dynamic_scale_args& a) { a.min_scale = INFINITY; }) ==
          "dynamic_scale_args.min_scale must be finite and > 0, got inf");
    CHECK(message([](dynamic_scale_args& a) { a.hysteresis = -1; }) ==
          "dynamic_scale_args.hysteresis must be >= 0 (1: back off on every overflow), got -1");
    CHECK(message([](dynamic_scale_args& a) { a.max_scale = 0.5f; }) ==
          "dynamic_scale_args.max_scale must be +inf (no maximum) or >= min_scale 1, got 0.5");
    CHECK(message([](dynamic_scale_args& a) { a.max_scale = NAN; }) ==
          "dynamic_scale_args.max_scale must be +inf (no maximum) or >= min_scale 1, got nan");
    CHECK(message([](dynamic_scale_args& a) { a.init_scale = 0.25f; }) ==
          "dynamic_scale_args.init_scale must be in [min_scale, max_scale] = [1, inf], got 0.25");
    CHECK(message([](dynamic_scale_args& a) { a.max_scale = 1024; }) ==
          "dynamic_scale_args.init_scale must be in [min_scale, max_scale] = [1, 1024], got 65536");
    CHECK(message([](dynamic_scale_args& a) { a.growth_factor = 1; }) ==
          "dynamic_scale_args.growth_factor must be finite and > 1, got 1");
    CHECK(message([](dynamic_scale_args& a) { a.growth_factor = INFINITY; }) ==
          "dynamic_scale_args.growth_factor must be finite and > 1, got inf");
    CHECK(message([](dynamic_scale_args& a) { a.backoff_factor = 1; }) ==
          "dynamic_scale_args.backoff_factor must be in (0, 1), got 1");
    CHECK(message([](dynamic_scale_args& a) { a.backoff_factor = 0; }) ==
          "dynamic_scale_args.backoff_factor must be in (0, 1), got 0");
    // Values print in the shortest form that reads back as the same float.
    CHECK(message([](dynamic_scale_args& a) { a.backoff_factor = 1.1f; }) ==
          "dynamic_scale_args.backoff_factor must be in (0, 1), got 1.1");
    CHECK(message([](dynamic_scale_args& a) { a.backoff_factor = 1.0000001f; }) ==
          "dynamic_scale_args.backoff_factor must be in (0, 1), got 1.00000012");
  }

  TEST_CASE("error_at_min leaves the state bit-identical and can be stepped past") {
    const dynamic_scale_args a = zero(1, 1000, 1);
    scaler_state s = mpopt::initial_scaler_state(a);
    const scaler_state before = s;
    CHECK(mpopt::update_scale(s, a, true) == scale_event::error_at_min);
    CHECK(same_bits(before, s));
    CHECK(mpopt::update_scale(s, a, false) == scale_event::unchanged);  // a caller that goes on
    CHECK(s.iter == 1);
  }

  TEST_CASE("a saved state (memcpy) continues bit-exactly like the uninterrupted run") {
    dynamic_scale_args a = zero(0x1p20f, 7, 3, 0.25f);
    a.consecutive_hysteresis = true;
    std::mt19937 rng(1234);
    std::bernoulli_distribution overflow(0.08);
    std::vector<bool> flags(4000);
    for (std::size_t i = 0; i < flags.size(); ++i) flags[i] = overflow(rng);

    scaler_state whole = mpopt::initial_scaler_state(a);
    for (bool f : flags) mpopt::update_scale(whole, a, f);

    for (std::size_t cut : {std::size_t(0), std::size_t(1), std::size_t(1234), std::size_t(3999)}) {
      scaler_state first = mpopt::initial_scaler_state(a);
      for (std::size_t i = 0; i < cut; ++i) mpopt::update_scale(first, a, flags[i]);
      unsigned char saved[sizeof(scaler_state)];
      std::memcpy(saved, &first, sizeof saved);
      std::memset(&first, 0xAB, sizeof first);  // the original is gone
      scaler_state resumed;
      std::memcpy(&resumed, saved, sizeof resumed);
      for (std::size_t i = cut; i < flags.size(); ++i) mpopt::update_scale(resumed, a, flags[i]);
      CAPTURE(cut);
      CHECK(same_bits(resumed, whole));
    }
  }

  TEST_CASE("scaler_state is a padding-free trivially copyable aggregate") {
    CHECK(sizeof(scaler_state) == 32);
    CHECK(std::is_trivially_copyable<scaler_state>::value);
    CHECK(std::is_standard_layout<scaler_state>::value);
  }
}

TEST_SUITE("scaler policies") {
  TEST_CASE("no_scaler: scale 1; skips on overflow unless check_overflow is off") {
    mpopt::no_scaler::args a;
    CHECK(mpopt::no_scaler::validate(a).ok());
    auto s = mpopt::no_scaler::init(a);
    CHECK(mpopt::no_scaler::scale(s, a) == 1.f);
    CHECK(mpopt::no_scaler::skips_on_overflow(a));
    CHECK(mpopt::no_scaler::update(s, a, true) == scale_event::unchanged);
    a.check_overflow = false;
    CHECK_FALSE(mpopt::no_scaler::skips_on_overflow(a));
  }

  TEST_CASE("static_scaler: the scale never changes, overflow still skips") {
    mpopt::static_scaler::args a;
    a.scale = 138;
    CHECK(mpopt::static_scaler::validate(a).ok());
    auto s = mpopt::static_scaler::init(a);
    CHECK(mpopt::static_scaler::update(s, a, true) == scale_event::unchanged);
    CHECK(mpopt::static_scaler::scale(s, a) == 138.f);
    CHECK(mpopt::static_scaler::skips_on_overflow(a));
    a.scale = 0;
    CHECK(mpopt::static_scaler::validate(a).message == "static_scaler::args.scale must be finite and > 0, got 0");
    a.scale = -INFINITY;
    CHECK(mpopt::static_scaler::validate(a).message == "static_scaler::args.scale must be finite and > 0, got -inf");
  }

  TEST_CASE("dynamic_scaler forwards to the state machine") {
    const dynamic_scale_args a = zero(8, 1000, 1);
    auto s = mpopt::dynamic_scaler::init(a);
    CHECK(mpopt::dynamic_scaler::scale(s, a) == 8.f);
    CHECK(mpopt::dynamic_scaler::update(s, a, true) == scale_event::backed_off);
    CHECK(mpopt::dynamic_scaler::scale(s, a) == 4.f);
    CHECK(mpopt::dynamic_scaler::skips_on_overflow(a));
    dynamic_scale_args bad = a;
    bad.scale_window = 0;
    CHECK(mpopt::dynamic_scaler::validate(bad).message == "dynamic_scale_args.scale_window must be > 0, got 0");
  }

  TEST_CASE("to_string(scale_event)") {
    CHECK(std::string(mpopt::to_string(scale_event::unchanged)) == "unchanged");
    CHECK(std::string(mpopt::to_string(scale_event::grew)) == "grew");
    CHECK(std::string(mpopt::to_string(scale_event::backed_off)) == "backed_off");
    CHECK(std::string(mpopt::to_string(scale_event::absorbed)) == "absorbed");
    CHECK(std::string(mpopt::to_string(scale_event::error_at_min)) == "error_at_min");
  }
}

TEST_SUITE("combined unscale + clip (§3.3)") {
  TEST_CASE("S 1024, scaled norm 4096 (true norm 4), clip 1: combined 4096.001024") {
    const mpopt::grad_factor f = mpopt::combined_grad_factor(4096.0 * 4096.0, 1024.f, 1.f);
    const double k = (4096.0 / 1024.0 + 1e-6) / 1.0;  // 4.000001
    CHECK(k * 1024.0 == doctest::Approx(4096.001024).epsilon(1e-15));
    CHECK(f.factor == float(1.0 / (k * 1024.0)));
    CHECK(f.grad_norm == 4.f);
    CHECK(f.clip_coef == float(1.0 / k));
    // The clipped true gradient has norm 0.99999975.
    CHECK(4096.0 * double(f.factor) == doctest::Approx(0.99999975).epsilon(1e-7));
  }

  TEST_CASE("same with clip 10: k = 0.4000001 < 1, unscale only") {
    const mpopt::grad_factor f = mpopt::combined_grad_factor(4096.0 * 4096.0, 1024.f, 10.f);
    CHECK(f.factor == 1.f / 1024.f);
    CHECK(f.clip_coef == 1.f);
    CHECK(f.grad_norm == 4.f);
  }

  TEST_CASE("clip 0 or negative: pure division by S") {
    for (float c : {0.f, -1.f}) {
      const mpopt::grad_factor f = mpopt::combined_grad_factor(1e30, 1024.f, c);
      CHECK(f.factor == 1.f / 1024.f);
      CHECK(f.clip_coef == 1.f);
    }
  }

  TEST_CASE("the 1e-6 is added to the unscaled norm: a norm exactly at the clip value is clipped a hair") {
    const mpopt::grad_factor f = mpopt::combined_grad_factor(25.0 * 65536.0 * 65536.0, 65536.f, 5.f);  // norm 5
    CHECK(f.grad_norm == 5.f);
    CHECK(f.factor == float(1.0 / ((5.0 + 1e-6) / 5.0 * 65536.0)));
    CHECK(f.factor < 1.f / 65536.f);
  }

  TEST_CASE("zero gradients: norm 0, no clipping, no division by zero") {
    const mpopt::grad_factor f = mpopt::combined_grad_factor(0.0, 8.f, 1.f);
    CHECK(f.grad_norm == 0.f);
    CHECK(f.factor == 0.125f);
    CHECK(f.clip_coef == 1.f);
  }

  TEST_CASE("the factor is the double formula rounded once to float, over many random inputs") {
    std::mt19937_64 rng(7);
    std::uniform_real_distribution<double> log_sum(-40.0, 60.0);
    std::uniform_int_distribution<int> pow2(-10, 30);
    std::uniform_real_distribution<double> clip(-0.5, 3.0);
    for (int i = 0; i < 20000; ++i) {
      const double sum_sq = std::pow(10.0, log_sum(rng));
      const float s = std::ldexp(1.f, pow2(rng));
      const float c = float(clip(rng));
      // DeepSpeed FP16_Optimizer.unscale_and_clip_grads, in Python floats.
      const double total_norm = std::sqrt(sum_sq);
      double combined_scale = s;
      if (c > 0.0) {
        const double clip_k = ((total_norm / s) + 1e-6) / c;
        if (clip_k > 1) combined_scale = clip_k * s;
      }
      const mpopt::grad_factor f = mpopt::combined_grad_factor(sum_sq, s, c);
      CAPTURE(sum_sq);
      CAPTURE(s);
      CAPTURE(c);
      REQUIRE(f.factor == float(1. / combined_scale));
      REQUIRE(f.grad_norm == float(total_norm / s));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Long random sequences against independent references.

namespace {

// DeepSpeed's DynamicLossScaler.update_scale (deepspeed/runtime/fp16/loss_scaler.py), transliterated into fp64
// with Python's names, plus the library's documented extensions: any growth/backoff factor, a ceiling
// (growth is clamped to max_scale and never reaches inf), an error_at_min switch, and torch GradScaler's
// growth-tracker window as an alternative growth rule. `clean_run` counts clean updates since the last
// overflow or growth.
class deepspeed_reference {
 public:
  double cur_scale;
  long long cur_iter = 0;
  long long last_overflow_iter = -1;
  long long cur_hysteresis;
  long long clean_run = 0;
  std::string what;  // "raise", "absorb", "backoff", "grow" or "none"

  explicit deepspeed_reference(const dynamic_scale_args& a)
      : cur_scale(a.init_scale),
        cur_hysteresis(a.hysteresis),
        scale_factor(a.growth_factor),
        backoff_factor(a.backoff_factor),
        scale_window(a.scale_window),
        min_scale(a.min_scale),
        max_scale(a.max_scale),
        delayed_shift(a.hysteresis),
        consecutive_hysteresis(a.consecutive_hysteresis),
        raise_error_at_min_scale(a.error_at_min),
        torch_window(!a.deepspeed_window) {}

  // Returns true where DeepSpeed raises; nothing has changed then.
  bool update_scale(bool overflow) {
    what = "none";
    if (overflow) {
      if (delayed_shift == 1 || cur_hysteresis == 1) {
        if (cur_scale == min_scale && raise_error_at_min_scale) {
          what = "raise";
          return true;
        }
        cur_scale = std::max(to_float(cur_scale * backoff_factor), min_scale);
        what = "backoff";
      } else {
        cur_hysteresis -= 1;
        what = "absorb";
      }
      last_overflow_iter = cur_iter;
      clean_run = 0;
    } else {
      if (consecutive_hysteresis) cur_hysteresis = delayed_shift;
      const long long successful = clean_run + 1;
      const long long stable_interval = (cur_iter - last_overflow_iter) - 1;
      const bool due =
          torch_window ? successful == scale_window : (stable_interval > 0) && (stable_interval % scale_window == 0);
      if (due) {
        if (!consecutive_hysteresis) cur_hysteresis = delayed_shift;
        const double grown = std::min(cur_scale * scale_factor, max_scale);
        if (grown <= double(FLT_MAX)) cur_scale = to_float(grown);
        clean_run = 0;
        what = "grow";
      } else {
        clean_run = successful;
      }
    }
    cur_iter += 1;
    return false;
  }

 private:
  // The library keeps the scale in float (as torch keeps its scale in a float32 tensor). With factors that are
  // powers of two this is the identity; the random configs keep every product inside the float range.
  static double to_float(double x) { return double(float(x)); }

  double scale_factor, backoff_factor;
  long long scale_window;
  double min_scale, max_scale;
  long long delayed_shift;
  bool consecutive_hysteresis, raise_error_at_min_scale, torch_window;
};

std::string event_word(scale_event e) {
  switch (e) {
    case scale_event::unchanged: return "none";
    case scale_event::grew: return "grow";
    case scale_event::backed_off: return "backoff";
    case scale_event::absorbed: return "absorb";
    case scale_event::error_at_min: return "raise";
  }
  return "?";
}

template <class T>
T pick(std::mt19937& rng, std::initializer_list<T> values) {
  std::uniform_int_distribution<std::size_t> i(0, values.size() - 1);
  return *(values.begin() + i(rng));
}

// Every draw is its own statement: argument evaluation order differs between compilers, and the sequences
// should not.
dynamic_scale_args random_config(std::mt19937& rng) {
  dynamic_scale_args a;
  std::uniform_int_distribution<int> init_exp(-4, 60), min_exp(-12, 4), max_exp(0, 100), bit(0, 1), tenth(0, 9);
  const bool power_of_two_factors = tenth(rng) < 7;
  a.growth_factor = power_of_two_factors ? pick(rng, {2.f, 4.f}) : pick(rng, {1.5f, 3.f, 2.f});
  a.backoff_factor = power_of_two_factors ? pick(rng, {0.5f, 0.25f}) : pick(rng, {0.75f, 0.3f, 0.5f});
  const float init_mantissa = pick(rng, {1.f, 1.f, 3.f, 1.25f});
  a.init_scale = std::ldexp(init_mantissa, init_exp(rng));
  const float min_mantissa = pick(rng, {1.f, 1.f, 1.5f});
  a.min_scale = std::min(std::ldexp(min_mantissa, min_exp(rng)), a.init_scale);
  if (power_of_two_factors && bit(rng)) {
    a.max_scale = INFINITY;  // long clean runs reach 2^127 and must stop there
  } else {
    // Non-power-of-two factors stay well inside the float range, where float products are exact roundings.
    const float max_mantissa = pick(rng, {1.f, 1.f, 1.75f});
    a.max_scale = std::max(a.init_scale, std::ldexp(max_mantissa, max_exp(rng)));
  }
  a.scale_window = pick<std::int64_t>(rng, {1, 2, 3, 5, 16, 100, 1000});
  a.hysteresis = pick(rng, {0, 1, 1, 2, 2, 3, 7});
  a.consecutive_hysteresis = bit(rng);
  a.error_at_min = bit(rng);
  a.deepspeed_window = tenth(rng) < 7;
  return a;
}

}  // namespace

TEST_CASE("20 random configs x 5000 updates agree with the fp64 DeepSpeed transliteration at every step") {
  std::mt19937 rng(20240531);
  int raised = 0, grew = 0, absorbed = 0, backed_off = 0, at_ceiling = 0;
  for (int config = 0; config < 20; ++config) {
    const dynamic_scale_args a = random_config(rng);
    REQUIRE(mpopt::validate(a).ok());
    scaler_state s = mpopt::initial_scaler_state(a);
    deepspeed_reference ref(a);
    double p = 0;
    for (int i = 0; i < 5000; ++i) {
      // New overflow probability every 250 updates: long clean runs, storms and everything between.
      if (i % 250 == 0) p = pick(rng, {0.0, 0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0});
      const bool overflow = std::bernoulli_distribution(p)(rng);
      const scaler_state before = s;
      const scale_event e = mpopt::update_scale(s, a, overflow);
      const bool ref_raised = ref.update_scale(overflow);
      CAPTURE(config);
      CAPTURE(i);
      CAPTURE(a.init_scale);
      CAPTURE(a.scale_window);
      CAPTURE(a.hysteresis);
      CAPTURE(a.deepspeed_window);
      REQUIRE(event_word(e) == ref.what);
      REQUIRE((e == scale_event::error_at_min) == ref_raised);
      if (ref_raised) REQUIRE(same_bits(before, s));
      REQUIRE(double(s.scale) == ref.cur_scale);
      REQUIRE(std::int64_t(s.hysteresis_left) == ref.cur_hysteresis);
      REQUIRE(s.iter == ref.cur_iter);
      REQUIRE(s.last_overflow_iter == ref.last_overflow_iter);
      REQUIRE(s.growth_tracker == ref.clean_run);
      REQUIRE(std::isfinite(s.scale));
      raised += ref_raised;
      grew += e == scale_event::grew;
      absorbed += e == scale_event::absorbed;
      backed_off += e == scale_event::backed_off;
      at_ceiling += e == scale_event::grew && s.scale == before.scale;
    }
  }
  // The sequences reached every branch.
  CHECK(raised > 0);
  CHECK(grew > 0);
  CHECK(absorbed > 0);
  CHECK(backed_off > 0);
  CHECK(at_ceiling > 0);
}

TEST_CASE("the torch GradScaler preset follows torch's _amp_update_scale_ over long random sequences") {
  // torch/aten _amp_update_scale_cpu_, transliterated: no hysteresis, no minimum (the preset's floor, the
  // smallest normal float, is applied here explicitly), growth kept only when finite.
  struct torch_reference {
    double scale = 65536.0;
    long long growth_tracker = 0;
    void update(bool found_inf) {
      if (found_inf) {
        scale = std::max(scale * 0.5, double(FLT_MIN));
        growth_tracker = 0;
      } else {
        const long long successful = growth_tracker + 1;
        if (successful == 2000) {
          const double new_scale = scale * 2.0;
          if (new_scale <= double(FLT_MAX)) scale = new_scale;
          growth_tracker = 0;
        } else {
          growth_tracker = successful;
        }
      }
    }
  };
  const dynamic_scale_args a = dynamic_scale_args::torch_grad_scaler();
  for (std::uint32_t seed : {1u, 2u, 3u, 4u}) {
    std::mt19937 rng(seed);
    scaler_state s = mpopt::initial_scaler_state(a);
    torch_reference ref;
    double p = 0;
    for (int i = 0; i < 20000; ++i) {
      if (i % 1000 == 0) p = pick(rng, {0.0, 0.0, 0.0001, 0.001, 0.3, 1.0});
      const bool overflow = std::bernoulli_distribution(p)(rng);
      mpopt::update_scale(s, a, overflow);
      ref.update(overflow);
      CAPTURE(seed);
      CAPTURE(i);
      REQUIRE(double(s.scale) == ref.scale);
      REQUIRE(s.growth_tracker == ref.growth_tracker);
    }
  }
}
