// Gradient accumulation in a dtype of its own (grad_accumulation.hpp): the element formula against the exact sum
// rounded once, the fp32-vs-bf16 accumulation error against an fp64 sum, and the optimizer fed either way: a
// grad_accumulator at stage 0 and reduce_grads() of the micro-batch grads at stage 2 give the same step.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mpopt/mpopt.hpp"

namespace {

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t x = (s += 0x9E3779B97F4A7C15ull);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A deterministic value in [-1, 1).
double noise(std::uint64_t a, std::uint64_t b) {
  std::uint64_t s = a * 0x100000001B3ull + b;
  return double(splitmix(s) >> 11) / double(1ull << 52) - 1.0;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
bool same_bits(const T* a, const T* b, std::size_t n) {
  return std::memcmp(a, b, n * sizeof(T)) == 0;
}

// Every finite pair of 16-bit values drawn from random bits: accumulate_grad must equal the exact sum (double holds
// the sum of two 16-bit values exactly) rounded once to the accumulator type.
template <class T>
void check_sixteen_bit_pairs() {
  std::uint64_t s = 42;
  int checked = 0;
  for (int k = 0; k < 200000; ++k) {
    const T a = T::from_bits(std::uint16_t(splitmix(s)));
    const T g = T::from_bits(std::uint16_t(splitmix(s)));
    if (!std::isfinite(float(a)) || !std::isfinite(float(g))) continue;
    const T want = mpopt::convert<T>(double(float(a)) + double(float(g)));
    const T got = mpopt::accumulate_grad(a, g);
    if (!same_bits(got.bits, want.bits)) {
      CAPTURE(float(a));
      CAPTURE(float(g));
      CHECK(float(got) == float(want));
    }
    ++checked;
  }
  CHECK(checked > 150000);
}

}  // namespace

TEST_CASE("accumulate_grad: a 16-bit accumulator gets the exact sum rounded once") {
  SUBCASE("bf16") {
    check_sixteen_bit_pairs<mpopt::bf16_t>();
  }
  SUBCASE("fp16") {
    check_sixteen_bit_pairs<mpopt::half_t>();
  }
}

TEST_CASE("accumulate_grad: an fp32 accumulator adds 16-bit and fp64 micro-batch grads with one rounding") {
  std::uint64_t s = 7;
  for (int k = 0; k < 100000; ++k) {
    // |acc| in [2^-10, 1): with any finite half the exact sum spans at most 2^16 .. 2^-34, within double's 53 bits.
    const float acc = float(std::ldexp(1.0 + noise(1, std::uint64_t(k)) * 0.5, -int(splitmix(s) % 10)));
    const mpopt::half_t h = mpopt::half_t::from_bits(std::uint16_t(splitmix(s)));
    if (!std::isfinite(float(h))) continue;
    CHECK(same_bits(mpopt::accumulate_grad(acc, h), float(double(acc) + double(float(h)))));
    // An fp64 micro-batch grad: the sum is taken in double, then rounded to fp32 once.
    const double d = noise(2, std::uint64_t(k)) * 1e-3;
    CHECK(same_bits(mpopt::accumulate_grad(acc, d), float(double(acc) + d)));
  }
  // A double accumulator keeps a float micro-batch grad exactly.
  CHECK(mpopt::accumulate_grad(1.0, 0x1p-30f) == 1.0 + 0x1p-30);
  static_assert(std::is_same_v<mpopt::accumulate_t<mpopt::bf16_t, mpopt::bf16_t>, float>);
  static_assert(std::is_same_v<mpopt::accumulate_t<float, double>, double>);
}

TEST_CASE("accumulating 64 bf16 micro-batches: fp32 stays within its rounding bound of the fp64 sum, bf16 does not") {
  constexpr std::size_t n = 50000;  // past the parallel threshold
  constexpr int micro_batches = 64;
  mpopt::grad_accumulator<float> acc32(n);
  mpopt::grad_accumulator<mpopt::bf16_t> acc16(n);
  std::vector<double> exact(n, 0.0), abs_sum(n, 0.0);
  std::vector<mpopt::bf16_t> micro(n);
  for (int k = 0; k < micro_batches; ++k) {
    for (std::size_t i = 0; i < n; ++i) {
      // Grads of one sign over 2^31 of magnitudes: fp32 has to round some sums too.
      micro[i] = mpopt::bf16_t(float(std::ldexp(0.01 * (1.5 + noise(std::uint64_t(k), i)), -(k % 32))));
      exact[i] += double(float(micro[i]));
      abs_sum[i] += std::fabs(double(float(micro[i])));
    }
    acc32.add(micro.data(), n);
    acc16.add(micro.data(), n);
  }
  CHECK(acc32.micro_batches() == micro_batches);
  double worst32 = 0.0, worst16 = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    // Recursive summation: |error| <= (k - 1) u sum |g| with u = 2^-24.
    const double bound = (micro_batches - 1) * 0x1p-24 * abs_sum[i];
    const double err32 = std::fabs(double(acc32.data()[i]) - exact[i]);
    if (err32 > bound) {
      CAPTURE(i);
      CHECK(err32 <= bound);
    }
    worst32 = std::max(worst32, err32 / exact[i]);
    worst16 = std::max(worst16, std::fabs(double(float(acc16.data()[i])) - exact[i]) / exact[i]);
  }
  MESSAGE("largest relative error of the accumulated sum: fp32 " << worst32 << ", bf16 " << worst16);
  CHECK(worst32 <= (micro_batches - 1) * 0x1p-24);  // all grads positive: the bound relative to the sum
  CHECK(worst32 > 0.0);                             // the case exercises fp32 rounding, not only exact sums
  // Each bf16 add rounds to 2^-9 of the running sum, so the small grads are lost entirely.
  CHECK(worst16 > 1e-3);
}

TEST_CASE("grad_accumulator: the first add of a window overwrites; wrong sizes and null pointers are refused") {
  mpopt::grad_accumulator<float> acc(3);
  const mpopt::bf16_t a[3] = {mpopt::bf16_t(1.f), mpopt::bf16_t(-2.f), mpopt::bf16_t(0.5f)};
  const mpopt::bf16_t b[3] = {mpopt::bf16_t(0.25f), mpopt::bf16_t(4.f), mpopt::bf16_t(-0.5f)};
  acc.add(a, 3);
  acc.add(b, 3);
  CHECK(acc.data()[0] == 1.25f);
  CHECK(acc.data()[1] == 2.f);
  CHECK(acc.data()[2] == 0.f);
  acc.reset();
  CHECK(acc.micro_batches() == 0);
  acc.data()[1] = 1e30f;  // whatever the caller left in the buffer
  acc.add(b, 3);
  CHECK(acc.data()[0] == 0.25f);
  CHECK(acc.data()[1] == 4.f);
  CHECK(acc.micro_batches() == 1);

  try {
    acc.add(a, 2);
    FAIL("a wrong size must throw");
  } catch (const mpopt::error& e) {
    const std::string m = e.what();
    CHECK(m.find("has 3 elements") != std::string::npos);
    CHECK(m.find("n = 2") != std::string::npos);
  }
  CHECK(acc.data()[0] == 0.25f);  // unchanged
  float out[2] = {};
  CHECK_THROWS_WITH_AS(mpopt::accumulate_grads(out, static_cast<const float*>(nullptr), 2),
                       "accumulate_grads: micro is null but n is 2", mpopt::error);
  mpopt::accumulate_grads(out, static_cast<const float*>(nullptr), 0);  // nothing to do
}

namespace {

// bf16 params, fp32 master, fp32 grads (the accumulation dtype), fp32 states: a bf16 model with
// data_types.grad_accum_dtype "fp32".
using bf16_fp32_accum =
    mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>>;
constexpr std::size_t kTensors[] = {1000, 0, 5000, 3};
constexpr std::size_t kSize = 6003;
constexpr int kMicro = 4;

mpopt::bf16_t micro_grad(int step, int k, std::size_t i) {
  return mpopt::bf16_t(float(0.05 * noise(std::uint64_t(step * 16 + k), i)));
}

}  // namespace

TEST_CASE("bf16 grads accumulated in fp32: stage 0 with a grad_accumulator equals stage 2's reduce_grads") {
  std::vector<mpopt::bf16_t> p0(kSize), p2(kSize);
  for (std::size_t i = 0; i < kSize; ++i) p0[i] = p2[i] = mpopt::bf16_t(float(noise(99, i)));
  mpopt::grad_accumulator<float> acc(kSize);
  mpopt::param_group<mpopt::adamw, bf16_fp32_accum> g0{p0.data(), acc.data(), kSize, {}, {}};
  g0.tensor_sizes.assign(std::begin(kTensors), std::end(kTensors));
  mpopt::param_group<mpopt::adamw, bf16_fp32_accum> g2 = g0;
  g2.params = p2.data();
  g2.grads = nullptr;  // stage 2: grads arrive through reduce_grads
  mpopt::step_options o;
  o.max_grad_norm = 0.5;
  mpopt::comm::single_rank comm;
  mpopt::optimizer<mpopt::adamw, bf16_fp32_accum> stage0({g0}, comm, {0}, {}, o);
  mpopt::optimizer<mpopt::adamw, bf16_fp32_accum> stage2({g2}, comm, {2}, {}, o);

  std::vector<mpopt::bf16_t> micro(kSize);
  for (int step = 0; step < 3; ++step) {
    acc.reset();
    for (int k = 0; k < kMicro; ++k) {
      for (std::size_t i = 0; i < kSize; ++i) micro[i] = micro_grad(step, k, i);
      acc.add(micro.data(), kSize);
      // Stage 2 takes the micro-batch grads tensor by tensor, as a backward pass produces them: last tensor first.
      stage2.reduce_grads(0, 2, 4, micro.data() + 1000);
      stage2.reduce_grads(0, 0, 2, micro.data());
    }
    const mpopt::step_result r0 = stage0.step(), r2 = stage2.step();
    REQUIRE(r0.applied);
    REQUIRE(r2.applied);
    CHECK(same_bits(r0.grad_norm, r2.grad_norm));
    CHECK(r0.clip_coef < 1.0);  // the accumulated norm is what clipping sees
  }
  CHECK(same_bits(stage0.master(0), stage2.master(0), kSize));
  for (int j = 0; j < 2; ++j) CHECK(same_bits(stage0.state(0, j), stage2.state(0, j), kSize));
  CHECK(same_bits(p0.data(), p2.data(), kSize));
}

TEST_CASE("bf16 grads accumulated in fp32: the accumulated norm against an fp64 recomputation") {
  // One step of plain SGD (lr 1) over fp32-accumulated bf16 micro-batch grads: master - sum, rounded once to fp32.
  std::vector<mpopt::bf16_t> p(kSize);
  for (std::size_t i = 0; i < kSize; ++i) p[i] = mpopt::bf16_t(float(noise(98, i)));
  mpopt::grad_accumulator<float> acc(kSize);
  mpopt::param_group<mpopt::sgd, bf16_fp32_accum> g{p.data(), acc.data(), kSize, {}, {}};
  g.hparams.lr = 1.0;
  mpopt::step_options o;
  o.max_grad_norm = 1e9;  // statistics on, no clipping
  mpopt::optimizer<mpopt::sgd, bf16_fp32_accum> opt({g}, {}, o);
  std::vector<double> exact(kSize, 0.0);
  std::vector<mpopt::bf16_t> micro(kSize);
  for (int k = 0; k < kMicro; ++k) {
    for (std::size_t i = 0; i < kSize; ++i) {
      micro[i] = micro_grad(0, k, i);
      exact[i] += double(float(micro[i]));
    }
    acc.add(micro.data(), kSize);
  }
  double norm_sq = 0.0;
  for (double e : exact) norm_sq += e * e;
  const mpopt::step_result r = opt.step();
  REQUIRE(r.applied);
  // Four bf16 values of magnitude <= 0.05 sum exactly in fp32 (their bits span far less than 24), so the norm is the
  // exact one up to the summation order of its squares.
  CHECK(r.grad_norm == doctest::Approx(std::sqrt(norm_sq)).epsilon(1e-12));
  for (std::size_t i = 0; i < kSize; ++i) {
    const float want = float(double(float(mpopt::bf16_t(float(noise(98, i))))) - exact[i]);
    if (!same_bits(opt.master(0)[i], want)) {
      CAPTURE(i);
      CHECK(opt.master(0)[i] == want);
    }
  }
}

TEST_CASE("fp16 grads accumulated in fp32: an overflow in one micro-batch skips the step and lowers the scale") {
  using fp16_fp32_accum =
      mpopt::precision<mpopt::param<mpopt::half_t>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>>;
  constexpr std::size_t n = 64;
  std::vector<mpopt::half_t> p(n, mpopt::half_t(1.f));
  mpopt::grad_accumulator<float> acc(n);
  mpopt::param_group<mpopt::adamw, fp16_fp32_accum> g{p.data(), acc.data(), n, {}, {}};
  mpopt::dynamic_scaler::args sa;
  sa.hysteresis = 1;  // back off on the first overflow
  mpopt::optimizer<mpopt::adamw, fp16_fp32_accum, mpopt::dynamic_scaler> opt({g}, sa);
  const double scale = opt.loss_scale();
  std::vector<mpopt::half_t> micro(n, mpopt::half_t(100.f));
  acc.add(micro.data(), n);
  micro[7] = mpopt::half_t(std::numeric_limits<float>::infinity());  // an fp16 backward that overflowed
  acc.add(micro.data(), n);
  micro[7] = mpopt::half_t(1.f);
  acc.add(micro.data(), n);
  const mpopt::step_result r = opt.step();
  CHECK_FALSE(r.applied);
  CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
  CHECK(opt.loss_scale() == scale / 2);
  CHECK(opt.step_count() == 0);
  for (std::size_t i = 0; i < n; ++i) CHECK(float(p[i]) == 1.f);
}
