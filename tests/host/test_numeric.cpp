// half_t / bf16_t conversions checked against references that share no code with mpopt: fields decoded
// with std::ldexp, rounding redone in double arithmetic, and (where the compiler has it) GCC's _Float16,
// whose conversions are libgcc's soft-fp routines.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "mpopt/numeric.hpp"

#if defined(__FLT16_MAX__)  // comes with _Float16 (g++ 12 on x86-64 has both; clang 14 neither)
#define MPOPT_TEST_HAVE_FLOAT16 1
#endif

namespace {

using mpopt::bf16_t;
using mpopt::convert;
using mpopt::half_t;
using rz = mpopt::round_toward_zero;
using sr = mpopt::round_stochastic;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr std::uint16_t kCanonicalNaN = 0x7FFF;

std::uint32_t f2u(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float u2f(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if MPOPT_TEST_HAVE_FLOAT16
// The compiler's own conversions (one rounding each, nearest-even), as bit patterns.
template <class T>
std::uint16_t float16_bits(T x) {
  const _Float16 h = static_cast<_Float16>(x);
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
#endif

// 2^k for -1022 <= k <= 1023, built from its exponent field (std::ldexp is the slow part of a sweep).
double pow2(int k) {
  const std::uint64_t u = std::uint64_t(k + 1023) << 52;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// A binary format known only by its field widths; the references below derive everything from these.
struct format {
  int exp_bits, man_bits;
  int bias() const { return (1 << (exp_bits - 1)) - 1; }
  int emin() const { return 1 - bias(); }
  std::uint16_t inf_bits() const { return std::uint16_t(((1u << exp_bits) - 1) << man_bits); }
  std::uint16_t max_bits() const { return std::uint16_t(inf_bits() - 1); }
  std::uint16_t sign_bit() const { return std::uint16_t(1u << (exp_bits + man_bits)); }
  double max_finite() const { return (2.0 - pow2(-man_bits)) * pow2(bias()); }
};
constexpr format kHalf{5, 10};
constexpr format kBf16{8, 7};

template <class T>
constexpr format format_for() {
  return std::is_same_v<T, half_t> ? kHalf : kBf16;
}

// The value of pattern b, read field by field.
double decode(format f, std::uint16_t b) {
  const bool neg = (b & f.sign_bit()) != 0;
  const int exp = (b >> f.man_bits) & ((1 << f.exp_bits) - 1);
  const int man = b & ((1 << f.man_bits) - 1);
  double mag;
  if (exp == (1 << f.exp_bits) - 1) {
    mag = man != 0 ? kNaN : kInf;
  } else if (exp == 0) {
    mag = std::ldexp(double(man), f.emin() - f.man_bits);  // subnormal: man * 2^(emin - man_bits)
  } else {
    mag = std::ldexp(double(man + (1 << f.man_bits)), exp - f.bias() - f.man_bits);
  }
  return neg ? -mag : mag;
}

// The magnitude just above positive pattern b, with 2^(bias + 1) following the largest finite value.
double next_up(format f, std::uint16_t b) {
  return b == f.max_bits() ? pow2(f.bias() + 1) : decode(f, std::uint16_t(b + 1));
}

// x rounded to format f by double arithmetic. lo is the largest representable magnitude <= |x| with the
// exponent range unbounded above, q the spacing there; every step is exact in double for finite x.
struct rounded {
  double rne, rz, lo, q;
};
rounded reference(format f, double x) {
  if (std::isnan(x) || std::isinf(x) || x == 0) return {x, x, std::fabs(x), 0};
  const double a = std::fabs(x);
  const int qexp = std::max(std::ilogb(a), f.emin()) - f.man_bits;  // a >= 2^ilogb(a)
  const double q = pow2(qexp);
  const std::int64_t n = std::int64_t(a * pow2(-qexp));  // floor(a / q), below 2^(man_bits + 1)
  const double lo = double(n) * q;
  const double d = a - lo;  // exact (Sterbenz, or lo == 0)
  // Nearest, ties to the even multiple of q; IEEE overflows iff that unbounded result exceeds max finite.
  double near = d < q / 2 || (d == q / 2 && n % 2 == 0) ? lo : lo + q;
  if (near > f.max_finite()) near = kInf;
  const double toward_zero = std::min(lo, f.max_finite());
  return {std::copysign(near, x), std::copysign(toward_zero, x), lo, q};
}

// decode() of every pattern, built once, so the sweeps look values up instead of calling ldexp.
std::vector<double> decode_all(format f) {
  std::vector<double> v(0x10000);
  for (std::uint32_t b = 0; b < 0x10000; ++b) v[b] = decode(f, std::uint16_t(b));
  return v;
}
const std::vector<double> kHalfValues = decode_all(kHalf), kBf16Values = decode_all(kBf16);

// Same value and same sign (so -0 != +0); a NaN is matched only by the canonical NaN pattern.
bool matches(format f, std::uint16_t got, double want) {
  if (std::isnan(want)) return got == kCanonicalNaN;
  const double v = (f.man_bits == kHalf.man_bits ? kHalfValues : kBf16Values)[got];
  return v == want && std::signbit(v) == std::signbit(want);
}

// Counts a sweep's mismatches so millions of probes cost one doctest assertion; keeps the first for INFO.
struct tally {
  std::uint64_t probes = 0, bad = 0;
  std::string first;
  void operator()(bool ok, const char* what, double x, unsigned got, double want) {
    ++probes;
    if (ok || bad++ != 0) return;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: x=%a got=0x%04X want=%a", what, x, got, want);
    first = buf;
  }
};
#define CHECK_TALLY(t)   \
  do {                   \
    INFO((t).first);     \
    CHECK((t).bad == 0); \
  } while (0)

// Calls fn(x) on float probes for format f: every stride-th float pattern (stride odd, so every low-bit
// residue turns up), and every pattern within +-radius of each representable value and of each midpoint
// between neighbours (the ties), both signs.
template <class Fn>
void for_float_probes(format f, std::uint32_t stride, int radius, Fn&& fn) {
  for (std::uint64_t u = 0; u < (std::uint64_t(1) << 32); u += stride) fn(u2f(std::uint32_t(u)));
  for (std::uint16_t b = 0; b < f.inf_bits(); ++b) {
    const double v = decode(f, b);
    for (const double c : {v, (v + next_up(f, b)) / 2}) {
      for (const float s : {float(c), -float(c)}) {  // both exact floats
        for (int k = -radius; k <= radius; ++k) fn(u2f(f2u(s) + std::uint32_t(k)));
      }
    }
  }
}

}  // namespace

TEST_CASE("half: every bit pattern survives float and back; NaNs become the canonical NaN") {
  tally t;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const half_t h = half_t::from_bits(std::uint16_t(b));
    const float f = h;
    const bool nan = std::isnan(decode(kHalf, std::uint16_t(b)));
    t(std::isnan(f) == nan, "nan-ness", f, b, 0);
    const std::uint16_t back = half_t(f).bits;
    t(back == (nan ? kCanonicalNaN : b), "half(float(h))", f, back, b);
    const std::uint16_t back2 = convert<half_t>(convert<float>(h)).bits;
    t(back2 == back, "convert round trip", f, back2, b);
  }
  CHECK_TALLY(t);
}

TEST_CASE("half -> float is exact: equals the value decoded from the fields with ldexp") {
  tally t;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const double want = decode(kHalf, std::uint16_t(b));
    const float got = half_t::from_bits(std::uint16_t(b));
    const bool ok = std::isnan(want) ? std::isnan(got) : double(got) == want && std::signbit(got) == std::signbit(want);
    t(ok, "half->float", want, b, double(got));
    const double wide = convert<double>(half_t::from_bits(std::uint16_t(b)));
    t(std::isnan(want) ? std::isnan(wide) : wide == want, "half->double", want, b, wide);
  }
  CHECK_TALLY(t);
  // Spot values, so a broken decode() cannot hide a broken conversion.
  CHECK(float(half_t::from_bits(0x3C00)) == 1.0f);
  CHECK(float(half_t::from_bits(0x7BFF)) == 65504.0f);
  CHECK(float(half_t::from_bits(0x0001)) == 0x1p-24f);
  CHECK(float(half_t::from_bits(0x03FF)) == 0x3FFp-24f);
  CHECK(float(half_t::from_bits(0x0400)) == 0x1p-14f);
  CHECK(float(half_t::from_bits(0xC000)) == -2.0f);
  CHECK(std::signbit(float(half_t::from_bits(0x8000))));
  CHECK(float(half_t::from_bits(0x7C00)) == std::numeric_limits<float>::infinity());
}

TEST_CASE("bf16: float is the pattern shifted left 16; every pattern survives float and back") {
  tally t;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const bf16_t h = bf16_t::from_bits(std::uint16_t(b));
    const float f = h;
    const bool nan = std::isnan(decode(kBf16, std::uint16_t(b)));
    t(nan || f2u(f) == b << 16, "float bits", f, b, 0);
    t(std::isnan(f) == nan, "nan-ness", f, b, 0);
    const std::uint16_t back = bf16_t(f).bits;
    t(back == (nan ? kCanonicalNaN : b), "bf16(float(b))", f, back, b);
    t(convert<bf16_t>(convert<float>(h)).bits == back, "convert round trip", f, b, 0);
    t(nan || double(convert<double>(h)) == decode(kBf16, std::uint16_t(b)), "bf16->double", f, b, 0);
  }
  CHECK_TALLY(t);
  CHECK(float(bf16_t::from_bits(0x3F80)) == 1.0f);
  CHECK(float(bf16_t::from_bits(0x7F7F)) == 0x1.FEp127f);
  CHECK(float(bf16_t::from_bits(0x0001)) == 0x1p-133f);
}

#if MPOPT_TEST_HAVE_FLOAT16
// libgcc's __truncsfhf2 costs ~100 ns a call, so _Float16 gets a sparser probe set than the reference below.
TEST_CASE("float -> half nearest-even matches _Float16") {
  tally t;
  const auto check = [&t](float x) {
    const std::uint16_t want = std::isnan(x) ? kCanonicalNaN : float16_bits(x);
    const std::uint16_t got = half_t(x).bits;
    t(got == want, "half(float)", x, got, decode(kHalf, want));
    // The double-arithmetic reference must agree too, as it is the only oracle for bf16.
    const double ref = reference(kHalf, x).rne;
    t(matches(kHalf, want, ref), "reference vs _Float16", x, want, ref);
  };
  for_float_probes(kHalf, 1999, 16, check);
  for (std::uint32_t u = f2u(0x1p-26f); u < f2u(0x1p-14f); u += 61) check(u2f(u)), check(-u2f(u));  // subnormals
  CHECK_TALLY(t);
  CHECK(t.probes > 2 * 8000000u);  // two checks per float
}
#endif

TEST_CASE("float -> half nearest-even and toward-zero match the double-arithmetic reference") {
  tally t;
  for_float_probes(kHalf, 257, 32, [&t](float x) {
    const rounded r = reference(kHalf, x);
    const std::uint16_t n = half_t(x).bits, z = convert<half_t, float, rz>(x).bits;
    t(matches(kHalf, n, r.rne), "rne", x, n, r.rne);
    t(matches(kHalf, z, r.rz), "rz", x, z, r.rz);
  });
  CHECK_TALLY(t);
  CHECK(convert<half_t>(1.0f / 3.0f).bits == half_t(1.0f / 3.0f).bits);  // convert<> takes the same path
}

// Below 2^-14 a half's magnitude bits count quanta of 2^-24 (1024 of them make 0x0400, the smallest
// normal), so the expected pattern is |x| * 2^24 rounded as an integer: cheap enough for every float
// in [2^-25, 2^-14) (smaller ones all give zero), and every 7th of the negative ones.
TEST_CASE("float -> half over the half subnormal range, step 1") {
  tally t;
  const auto check = [&t](float x) {
    const double y = std::fabs(double(x)) * 0x1p24;  // exact
    const unsigned n = unsigned(y), sign = std::signbit(x) ? 0x8000u : 0u;
    const double rest = y - n;
    const unsigned near = sign | (n + (rest > 0.5 || (rest == 0.5 && n % 2 == 1)));
    const unsigned got = half_t(x).bits, got_rz = convert<half_t, float, rz>(x).bits;
    t(got == near, "rne", x, got, near);
    t(got_rz == (sign | n), "rz", x, got_rz, sign | n);
  };
  for (std::uint32_t u = f2u(0x1p-25f); u < f2u(0x1p-14f); ++u) check(u2f(u));
  for (std::uint32_t u = f2u(-0x1p-26f); u < f2u(-0x1p-14f); u += 7) check(u2f(u));
  CHECK_TALLY(t);
  CHECK(t.probes > 2 * 100000000u);  // two checks per float
}

TEST_CASE("float -> bf16 nearest-even and toward-zero match the double-arithmetic reference") {
  tally t;
  const auto check = [&t](float x) {
    const rounded r = reference(kBf16, x);
    const std::uint16_t n = bf16_t(x).bits, z = convert<bf16_t, float, rz>(x).bits;
    t(matches(kBf16, n, r.rne), "rne", x, n, r.rne);
    t(matches(kBf16, z, r.rz), "rz", x, z, r.rz);
  };
  for_float_probes(kBf16, 257, 32, check);
  for (std::uint32_t u = 1; u < 0x00800000u; ++u) check(u2f(u));  // float subnormals: bf16 subnormals
  for (std::uint32_t u = 0x80000001u; u < 0x80800000u; u += 7) check(u2f(u));
  CHECK_TALLY(t);

  // Edge cases spelled out, independently of the reference.
  const auto bits = [](float x) { return unsigned(bf16_t(x).bits); };
  CHECK(bits(0.0f) == 0x0000);
  CHECK(bits(-0.0f) == 0x8000);
  CHECK(bits(std::numeric_limits<float>::infinity()) == 0x7F80);
  CHECK(bits(-std::numeric_limits<float>::infinity()) == 0xFF80);
  CHECK(bits(std::numeric_limits<float>::quiet_NaN()) == kCanonicalNaN);
  CHECK(bits(-std::numeric_limits<float>::quiet_NaN()) == kCanonicalNaN);
  CHECK(bits(u2f(0x7F800001u)) == kCanonicalNaN);  // signalling NaN whose payload lies below bit 16
  CHECK(bits(std::numeric_limits<float>::max()) == 0x7F80);
  CHECK(bits(-std::numeric_limits<float>::max()) == 0xFF80);
  CHECK(bits(0x1.FEp127f) == 0x7F7F);               // max finite bf16
  CHECK(bits(u2f(0x7F7F7FFFu)) == 0x7F7F);          // just below the overflow tie
  CHECK(bits(u2f(0x7F7F8000u)) == 0x7F80);          // the tie max + ulp/2: odd, so up to inf
  CHECK(bits(1.0f + 0x1p-8f) == 0x3F80);            // tie, even below
  CHECK(bits(u2f(0x3F808001u)) == 0x3F81);          // just above that tie
  CHECK(bits(u2f(0x3F807FFFu)) == 0x3F80);          // just below it
  CHECK(bits(1.0f + 0x1p-7f + 0x1p-8f) == 0x3F82);  // tie, odd below: up
  CHECK(bits(u2f(0x00000001u)) == 0x0000);          // smallest float subnormal: far below half a bf16 ulp
  CHECK(bits(u2f(0x80000001u)) == 0x8000);
  CHECK(bits(u2f(0x00008000u)) == 0x0000);  // exactly half the smallest bf16 subnormal: tie to even 0
  CHECK(bits(u2f(0x00008001u)) == 0x0001);
  CHECK(bits(u2f(0x00018000u)) == 0x0002);  // tie between subnormals 1 and 2: even 2
  CHECK(bits(u2f(0x007FFFFFu)) == 0x0080);  // largest subnormal rounds up into the normal range
  CHECK(bits(u2f(0x00010000u)) == 0x0001);  // smallest bf16 subnormal, exact
}

TEST_CASE("float -> half edge cases") {
  const auto bits = [](float x) { return unsigned(half_t(x).bits); };
  CHECK(bits(65504.0f) == 0x7BFF);
  CHECK(bits(65519.996f) == 0x7BFF);
  CHECK(bits(65520.0f) == 0x7C00);  // max + ulp/2 overflows (odd max)
  CHECK(bits(-65520.0f) == 0xFC00);
  CHECK(bits(0x1p-24f) == 0x0001);
  CHECK(bits(0x1p-25f) == 0x0000);  // tie with zero: even
  CHECK(bits(u2f(f2u(0x1p-25f) + 1)) == 0x0001);
  CHECK(bits(-0x1p-26f) == 0x8000);
  CHECK(bits(0x1.8p-24f) == 0x0002);    // tie between subnormals 1 and 2: even
  CHECK(bits(0x1.FFCp-15f) == 0x0400);  // largest subnormal + ulp/2 ties up to the smallest normal
  CHECK(bits(std::numeric_limits<float>::max()) == 0x7C00);
  CHECK(bits(std::numeric_limits<float>::quiet_NaN()) == kCanonicalNaN);
  CHECK(bits(-std::numeric_limits<float>::quiet_NaN()) == kCanonicalNaN);
}

// A double exactly one double-ulp either side of each tie between neighbours b and b+1 rounds to b+1
// (above) or b (below) whatever b's parity; rounding it through float first would land on the tie.
template <class T>
void check_double_single_rounding() {
  constexpr format f = format_for<T>();
  tally t;
  for (std::uint16_t b = 0; b <= f.max_bits(); ++b) {
    const double v = decode(f, b), next = next_up(f, b), tie = (v + next) / 2;
    for (const double s : {1.0, -1.0}) {
      const std::uint16_t sign = s < 0 ? f.sign_bit() : 0;
      const double above = s * std::nextafter(tie, kInf), below = s * std::nextafter(tie, 0.0);
      t(float(above) == float(s * tie) && float(below) == float(s * tie), "construction", above, 0, tie);
      const unsigned up = convert<T>(above).bits, down = convert<T>(below).bits;
      t(up == (sign | unsigned(b + 1)), "just above tie", above, up, s * next);
      t(down == (sign | b), "just below tie", below, down, s * v);
      t(convert<T, double, rz>(above).bits == (sign | b), "rz above tie", above, 0, s * v);
    }
  }
  CHECK_TALLY(t);
}

TEST_CASE("double -> half and double -> bf16 round once, not through float") {
  check_double_single_rounding<half_t>();
  check_double_single_rounding<bf16_t>();
  // The overflow thresholds, where rounding through float would overflow.
  CHECK(convert<half_t>(std::nextafter(65520.0, 0.0)).bits == 0x7BFF);
  CHECK(convert<half_t>(65520.0).bits == 0x7C00);
  const double bf16_tie = std::ldexp(2.0 - 0x1p-8, 127);
  CHECK(convert<bf16_t>(std::nextafter(bf16_tie, 0.0)).bits == 0x7F7F);
  CHECK(convert<bf16_t>(bf16_tie).bits == 0x7F80);
}

TEST_CASE("double -> half and double -> bf16 on random doubles and special values") {
  std::mt19937_64 rng(20240611);
  const auto random_double = [&rng](int lo_exp, int hi_exp) {
    const std::uint64_t r = rng();
    const int e = lo_exp + int(rng() % std::uint64_t(hi_exp - lo_exp + 1));
    const double m = 1.0 + double(r >> 12) * 0x1p-52;  // all 52 fraction bits random
    return std::ldexp((r & 1) ? -m : m, e);
  };
  tally t;
  for (int i = 0; i < 300000; ++i) {
    const double x = random_double(-27, 16);  // half normal, subnormal and overflow ranges
    const rounded r = reference(kHalf, x);
    const unsigned n = convert<half_t>(x).bits, z = convert<half_t, double, rz>(x).bits;
    t(matches(kHalf, std::uint16_t(n), r.rne), "half rne", x, n, r.rne);
    t(matches(kHalf, std::uint16_t(z), r.rz), "half rz", x, z, r.rz);
#if MPOPT_TEST_HAVE_FLOAT16
    t(n == float16_bits(x), "half vs _Float16", x, n, r.rne);
#endif
    const double y = random_double(-136, 128);  // bf16 normal, subnormal and overflow ranges
    const rounded s = reference(kBf16, y);
    const unsigned bn = convert<bf16_t>(y).bits, bz = convert<bf16_t, double, rz>(y).bits;
    t(matches(kBf16, std::uint16_t(bn), s.rne), "bf16 rne", y, bn, s.rne);
    t(matches(kBf16, std::uint16_t(bz), s.rz), "bf16 rz", y, bz, s.rz);
  }
  CHECK_TALLY(t);

  using dl = std::numeric_limits<double>;
  CHECK(convert<half_t>(dl::quiet_NaN()).bits == kCanonicalNaN);
  CHECK(convert<bf16_t>(-dl::quiet_NaN()).bits == kCanonicalNaN);
  CHECK(convert<half_t>(dl::infinity()).bits == 0x7C00);
  CHECK(convert<bf16_t>(-dl::infinity()).bits == 0xFF80);
  CHECK(convert<half_t>(dl::max()).bits == 0x7C00);
  CHECK(convert<bf16_t>(-dl::max()).bits == 0xFF80);
  CHECK(convert<half_t>(-0.0).bits == 0x8000);
  CHECK(convert<half_t>(dl::denorm_min()).bits == 0x0000);
  CHECK(convert<bf16_t>(-dl::denorm_min()).bits == 0x8000);
  CHECK(convert<half_t>(1e-300).bits == 0x0000);
  CHECK(convert<bf16_t>(1e-300).bits == 0x0000);
  CHECK(convert<half_t>(0x1p-25 + 0x1p-70).bits == 0x0001);  // a float would lose the sticky bit
  CHECK(convert<bf16_t>(0x1p-134 + 0x1p-180).bits == 0x0001);
}

TEST_CASE("toward zero: the largest representable magnitude <= |x|; overflow saturates, inf stays inf") {
  // Property check, independent of reference(): |r| <= |x| < |next pattern up|.
  tally t;
  std::mt19937 rng(7);
  for (int i = 0; i < 2000000; ++i) {
    const float x = u2f(std::uint32_t(rng()));
    if (std::isnan(x) || std::isinf(x)) continue;
    const std::uint16_t h = convert<half_t, float, rz>(x).bits, b = convert<bf16_t, float, rz>(x).bits;
    for (const auto& [f, r] : {std::pair<format, std::uint16_t>{kHalf, h}, {kBf16, b}}) {
      const double v = decode(f, r);
      const std::uint16_t mag = std::uint16_t(r & ~f.sign_bit());
      const bool ok = std::fabs(v) <= std::fabs(x) && std::signbit(v) == std::signbit(x) &&
                      (mag == f.max_bits() || decode(f, std::uint16_t(mag + 1)) > std::fabs(double(x)));
      t(ok, "rz property", x, r, v);
    }
  }
  CHECK_TALLY(t);

  const float big = 1e30f, inf = std::numeric_limits<float>::infinity();
  CHECK(convert<half_t, float, rz>(65535.0f).bits == 0x7BFF);
  CHECK(convert<half_t, float, rz>(big).bits == 0x7BFF);
  CHECK(convert<half_t, float, rz>(-big).bits == 0xFBFF);
  CHECK(convert<half_t, double, rz>(1e300).bits == 0x7BFF);
  CHECK(convert<bf16_t, float, rz>(std::numeric_limits<float>::max()).bits == 0x7F7F);
  CHECK(convert<bf16_t, double, rz>(-1e300).bits == 0xFF7F);
  CHECK(convert<half_t, float, rz>(inf).bits == 0x7C00);
  CHECK(convert<half_t, float, rz>(-inf).bits == 0xFC00);
  CHECK(convert<bf16_t, float, rz>(inf).bits == 0x7F80);
  CHECK(convert<bf16_t, double, rz>(-kInf).bits == 0xFF80);
  CHECK(convert<half_t, float, rz>(std::nanf("")).bits == kCanonicalNaN);
  CHECK(convert<half_t, float, rz>(0x1.FFFFFEp-25f).bits == 0x0000);  // just below the smallest subnormal
  CHECK(convert<half_t, float, rz>(-0x1.FFFFFEp-24f).bits == 0x8001);

  // double -> float toward zero (the library's own path; std:: has no directed conversion to compare).
  std::mt19937_64 rng64(11);
  tally d;
  for (int i = 0; i < 200000; ++i) {
    double x;
    const std::uint64_t u = rng64();
    std::memcpy(&x, &u, 8);
    if (std::isnan(x)) continue;
    const float r = convert<float, double, rz>(x);
    const float away = std::nextafter(r, x > 0 ? inf : -inf);  // float overload: both arguments float
    const bool ok = std::isinf(x) ? r == x
                                  : std::fabs(double(r)) <= std::fabs(x) && std::signbit(r) == std::signbit(x) &&
                                        (std::fabs(r) == std::numeric_limits<float>::max() ||
                                         std::fabs(double(away)) > std::fabs(x));
    d(ok, "double->float rz", x, 0, r);
  }
  CHECK_TALLY(d);
}

// Stochastic rounding of x over 2^16 evenly spaced random_bits: every result is one of the two neighbours
// of |x| and the mean lands on x (P(up) is the dropped fraction, here quantised to 2^-16).
template <class T, class From>
void check_stochastic(From x) {
  constexpr format f = format_for<T>();
  const rounded r = reference(f, double(x));
  std::uint32_t ups = 0;
  bool neighbours = true;
  for (std::uint32_t i = 0; i < 0x10000; ++i) {
    const std::uint16_t b = convert<T, From, sr>(x, i << 16).bits;
    const double v = std::fabs(decode(f, b));
    neighbours &= (v == r.lo || v == r.lo + r.q) && std::signbit(decode(f, b)) == std::signbit(x);
    ups += v != r.lo;
    if (i == 12345) CHECK(convert<T, From, sr>(x, i << 16).bits == b);  // deterministic
  }
  INFO("x = " << double(x));
  CHECK(neighbours);
  const double mean = r.lo + r.q * (double(ups) / 65536.0);
  CHECK(std::fabs(mean - std::fabs(double(x))) <= 1e-4 * r.q);
  const bool exact = r.lo == std::fabs(double(x));
  // bits == 0 rounds up whenever anything was dropped; all-ones never rounds up.
  CHECK(std::fabs(decode(f, convert<T, From, sr>(x, 0).bits)) == (exact ? r.lo : r.lo + r.q));
  CHECK(std::fabs(decode(f, convert<T, From, sr>(x, 0xFFFFFFFFu).bits)) == r.lo);
}

TEST_CASE("stochastic rounding: deterministic, one of the two neighbours, unbiased") {
  for (const float x : {1.0f / 3.0f, 0.1f, -3.14159265f, 1000.7f, 65000.3f, 1e-6f, -2e-7f, 4e-8f, 3e-8f, 1e-5f}) {
    check_stochastic<half_t>(x);
  }
  for (const double x : {1.0 / 3.0, -0.1, 2e-7, 1e-7 + 1e-20, 12345.678901}) check_stochastic<half_t>(x);
  for (const float x : {1.0f / 3.0f, -0.1f, 3.14159265f, 3e38f, 1e-30f, -1e-39f, 5e-41f, 1.5e-40f}) {
    check_stochastic<bf16_t>(x);
  }
  for (const double x : {1.0 / 3.0, -1e-39, 1e-3 + 1e-15, 1e38}) check_stochastic<bf16_t>(x);

  // Representable values never move, whatever the bits (0 included: nothing was dropped).
  std::vector<std::uint32_t> bits = {0u, 1u, 0x80000000u, 0xFFFFFFFFu};
  std::mt19937 rng(3);
  for (int i = 0; i < 1000; ++i) bits.push_back(std::uint32_t(rng()));
  for (const std::uint32_t r : bits) {
    for (const float x : {1.0f, -0.5f, 65504.0f, 0x1p-24f, 0x1.8p-20f, 0.0f, -0.0f}) {
      CHECK(convert<half_t, float, sr>(x, r).bits == half_t(x).bits);
    }
    for (const float x : {1.0f, -0x1.FEp127f, 0x1p-133f, 3.0f}) {
      CHECK(convert<bf16_t, float, sr>(x, r).bits == bf16_t(x).bits);
    }
    CHECK(convert<half_t, double, sr>(-0x1.004p-3, r).bits == 0xB001);
    CHECK(convert<bf16_t, double, sr>(0x1.02p100, r).bits == 0x7181);
  }
  CHECK(convert<half_t, float, sr>(std::numeric_limits<float>::infinity(), 0).bits == 0x7C00);
  CHECK(convert<bf16_t, double, sr>(-kInf, 0).bits == 0xFF80);
  CHECK(convert<half_t, float, sr>(std::nanf(""), 0).bits == kCanonicalNaN);
}

TEST_CASE("half <-> bf16 through convert rounds once, for every pattern") {
  tally t;
  for (std::uint32_t u = 0; u < 0x10000; ++u) {
    const std::uint16_t b = std::uint16_t(u);
    const rounded to_bf = reference(kBf16, decode(kHalf, b)), to_h = reference(kHalf, decode(kBf16, b));
    const half_t h = half_t::from_bits(b);
    const bf16_t g = bf16_t::from_bits(b);
    t(matches(kBf16, convert<bf16_t>(h).bits, to_bf.rne), "half->bf16 rne", decode(kHalf, b), b, to_bf.rne);
    t(matches(kBf16, convert<bf16_t, half_t, rz>(h).bits, to_bf.rz), "half->bf16 rz", decode(kHalf, b), b, to_bf.rz);
    t(matches(kHalf, convert<half_t>(g).bits, to_h.rne), "bf16->half rne", decode(kBf16, b), b, to_h.rne);
    t(matches(kHalf, convert<half_t, bf16_t, rz>(g).bits, to_h.rz), "bf16->half rz", decode(kBf16, b), b, to_h.rz);
    // random_bits reach the single narrowing step: all-ones never rounds up, so it is toward zero.
    t(convert<bf16_t, half_t, sr>(h, 0xFFFFFFFFu).bits == convert<bf16_t, half_t, rz>(h).bits || std::isnan(float(h)),
      "half->bf16 sr", decode(kHalf, b), b, 0);
  }
  CHECK_TALLY(t);
  CHECK(convert<bf16_t>(half_t::from_bits(0x7C00)).bits == 0x7F80);
  CHECK(convert<half_t>(bf16_t::from_bits(0x4780)).bits == 0x7C00);  // 65536 overflows half
  CHECK(convert<half_t>(bf16_t::from_bits(0x477F)).bits == 0x7BF8);  // 65280 fits
  CHECK(convert<half_t, bf16_t, rz>(bf16_t::from_bits(0x4780)).bits == 0x7BFF);
  CHECK(convert<half_t>(bf16_t::from_bits(0x3380)).bits == 0x0001);  // 2^-24: smallest half subnormal
  CHECK(convert<half_t>(bf16_t::from_bits(0x3300)).bits == 0x0000);  // 2^-25: tie, even zero
  CHECK(convert<half_t>(bf16_t::from_bits(0x3301)).bits == 0x0001);  // just above the tie
  CHECK(convert<bf16_t>(half_t::from_bits(0x3C01)).bits == 0x3F80);  // 1 + 2^-10 loses its low bits
  CHECK(convert<bf16_t>(half_t::from_bits(0x3C04)).bits == 0x3F80);  // 1 + 2^-8: tie, even
  CHECK(convert<bf16_t>(half_t::from_bits(0x3C0C)).bits == 0x3F82);  // 1 + 3*2^-8: tie, up to even
}

TEST_CASE("traits: names and significand widths") {
  using mpopt::dtype;
  using mpopt::dtype_name;
  CHECK(std::string(dtype_name<float>()) == "fp32");
  CHECK(std::string(dtype_name<half_t>()) == "fp16");
  CHECK(std::string(dtype_name<bf16_t>()) == "bf16");
  CHECK(std::string(dtype_name<double>()) == "fp64");
  CHECK(std::string(dtype_name(dtype::fp16)) == "fp16");
  CHECK(std::string(dtype_name(static_cast<dtype>(200))) == "?");
  static_assert(mpopt::significand_bits_v<double> == std::numeric_limits<double>::digits);
  static_assert(mpopt::significand_bits_v<float> == std::numeric_limits<float>::digits);
  static_assert(mpopt::significand_bits_v<half_t> == kHalf.man_bits + 1);
  static_assert(mpopt::significand_bits_v<bf16_t> == kBf16.man_bits + 1);
  static_assert(mpopt::significand_bits_v<int> == 0);
  static_assert(mpopt::is_element_type_v<half_t> && mpopt::is_element_type_v<double> && !mpopt::is_element_type_v<int>);
  static_assert(mpopt::is_16bit_v<bf16_t> && !mpopt::is_16bit_v<float>);
  static_assert(mpopt::dtype_of<bf16_t>::value == dtype::bf16);
  static_assert(sizeof(half_t) == 2 && sizeof(bf16_t) == 2);
}
