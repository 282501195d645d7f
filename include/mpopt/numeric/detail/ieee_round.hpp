// One rounding formula for every narrowing conversion between IEEE binary formats
// (float/double -> half/bf16, double -> float), in host and device code.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../config.hpp"

namespace mpopt {

// Rounding modes, used as template arguments of convert<>.
struct round_nearest_even {};
struct round_toward_zero {};
// Rounds up with probability (dropped fraction); takes 32 random bits per value, so it is deterministic.
struct round_stochastic {};

namespace detail {

// An IEEE binary format: `Bits` holds it, with `ExpBits` exponent and `ManBits` mantissa bits.
template <class Bits, int ExpBits, int ManBits>
struct ieee_format {
  using bits_type = Bits;
  static constexpr int exp_bits = ExpBits;
  static constexpr int man_bits = ManBits;
  static constexpr int bias = (1 << (ExpBits - 1)) - 1;
  static constexpr int max_biased_exp = (1 << ExpBits) - 1;  // inf/NaN
  static constexpr Bits sign_mask = Bits(Bits(1) << (ExpBits + ManBits));
  static constexpr Bits man_mask = Bits((Bits(1) << ManBits) - 1);
  static constexpr Bits inf_bits = Bits(Bits(max_biased_exp) << ManBits);
  static constexpr Bits max_finite_bits = Bits(inf_bits - 1);
  // CUDA's conversion intrinsics produce this NaN (sign clear, all ones) for any NaN input.
  static constexpr Bits canonical_nan_bits = Bits(inf_bits | man_mask);
};

using fp16_format = ieee_format<std::uint16_t, 5, 10>;
using bf16_format = ieee_format<std::uint16_t, 8, 7>;
using fp32_format = ieee_format<std::uint32_t, 8, 23>;
using fp64_format = ieee_format<std::uint64_t, 11, 52>;

// The dropped part of `m` below bit `shift`, as a 32-bit fraction of one unit in the last kept place
// (0x80000000 = exactly half), with a sticky low bit when nonzero bits fall below those 32.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE std::uint32_t dropped_fraction(std::uint64_t m, int shift) {
  if (shift <= 0) return 0u;
  if (shift >= 64) return m != 0 ? 1u : 0u;
  const std::uint64_t dropped = m & ((std::uint64_t(1) << shift) - 1);
  if (shift <= 32) return std::uint32_t(dropped << (32 - shift));
  const std::uint64_t below = dropped & ((std::uint64_t(1) << (shift - 32)) - 1);
  return std::uint32_t(dropped >> (shift - 32)) | (below != 0 ? 1u : 0u);
}

template <class Round>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE bool round_up(std::uint32_t frac, bool odd, std::uint32_t random_bits) {
  if constexpr (std::is_same_v<Round, round_nearest_even>) {
    (void)random_bits;
    return frac > 0x80000000u || (frac == 0x80000000u && odd);
  } else if constexpr (std::is_same_v<Round, round_toward_zero>) {
    (void)frac, (void)odd, (void)random_bits;
    return false;
  } else {
    static_assert(std::is_same_v<Round, round_stochastic>,
                  "mpopt: unknown rounding mode; use round_nearest_even, round_toward_zero or round_stochastic");
    (void)odd;
    return random_bits < frac;  // P(up) = frac / 2^32
  }
}

// Narrow the bit pattern `x` of format Src to format Dst (fewer exponent and/or mantissa bits).
// NaN -> Dst's canonical NaN; overflow -> inf (nearest-even, stochastic) or the largest finite value
// (toward zero); results below Dst's normal range become subnormals or zero, rounded the same way.
template <class Dst, class Src, class Round>
MPOPT_HOST_DEVICE inline typename Dst::bits_type narrow_bits(typename Src::bits_type x, std::uint32_t random_bits) {
  using DBits = typename Dst::bits_type;
  using SBits = typename Src::bits_type;
  static_assert(Src::man_bits > Dst::man_bits || Src::exp_bits > Dst::exp_bits, "narrow_bits: Dst must be narrower");
  const DBits sign = (x & Src::sign_mask) ? Dst::sign_mask : DBits(0);
  const SBits a = SBits(x & ~Src::sign_mask);
  const int biased = int(a >> Src::man_bits);
  if (biased == Src::max_biased_exp) {
    return (a & Src::man_mask) ? Dst::canonical_nan_bits : DBits(sign | Dst::inf_bits);
  }
  if (a == 0) return sign;
  // value = mant * 2^(exp - man_bits), with the implicit bit made explicit.
  const std::uint64_t mant = std::uint64_t(a & Src::man_mask) | (biased != 0 ? (std::uint64_t(1) << Src::man_bits) : 0);
  const int exp = (biased != 0 ? biased : 1) - Src::bias;
  const int dst_biased = exp + Dst::bias;
  DBits result;
  std::uint32_t frac;
  if (dst_biased >= Dst::max_biased_exp) {
    // Above the largest binade: overflow.
    return std::is_same_v<Round, round_toward_zero> ? DBits(sign | Dst::max_finite_bits) : DBits(sign | Dst::inf_bits);
  } else if (dst_biased >= 1 && biased != 0) {
    // Normal in Dst (a normal Src value; Src subnormals are far below Dst's normal range for our formats).
    constexpr int shift = Src::man_bits - Dst::man_bits;
    std::uint64_t kept;
    if constexpr (shift > 0) {
      kept = mant >> shift;
      frac = dropped_fraction(mant, shift);
    } else {
      kept = mant << (-shift);
      frac = 0;
    }
    result = DBits((DBits(dst_biased) << Dst::man_bits) | (DBits(kept) & Dst::man_mask));
  } else {
    // Subnormal (or zero) in Dst: quantum 2^(1 - bias - man_bits).
    const int shift = Src::man_bits - Dst::man_bits + (1 - Dst::bias) - exp;
    const std::uint64_t kept = shift >= 64 ? 0 : (mant >> shift);
    frac = dropped_fraction(mant, shift);
    result = DBits(kept);
  }
  // Incrementing the pattern carries into the exponent (subnormal -> normal, max finite -> inf) as IEEE does.
  if (round_up<Round>(frac, (result & 1u) != 0, random_bits)) result = DBits(result + 1);
  return DBits(sign | result);
}

template <class T, class U>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE T bit_cast(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "bit_cast: sizes differ");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

}  // namespace detail
}  // namespace mpopt
