// convert<To, From, Round>: the one place where mpopt changes an element's type.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "detail/ieee_round.hpp"
#include "traits.hpp"

namespace mpopt {
namespace detail {

template <class T>
struct format_of;
template <>
struct format_of<half_t> {
  using type = fp16_format;
};
template <>
struct format_of<bf16_t> {
  using type = bf16_format;
};
template <>
struct format_of<float> {
  using type = fp32_format;
};
template <>
struct format_of<double> {
  using type = fp64_format;
};

template <class T>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE auto to_bits(T x) {
  if constexpr (is_16bit_v<T>) {
    return x.bits;
  } else {
    return bit_cast<typename format_of<T>::type::bits_type>(x);
  }
}

template <class T>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE T from_bits(typename format_of<T>::type::bits_type b) {
  if constexpr (is_16bit_v<T>) {
    return T::from_bits(b);
  } else {
    return bit_cast<T>(b);
  }
}

// Widening to float or double is exact for every pair of our types.
template <class To, class From>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE To widen(From x) {
  if constexpr (is_16bit_v<From>) {
    return To(static_cast<float>(x));
  } else {
    return To(x);
  }
}

}  // namespace detail

// Converts `x` to `To`. Widening conversions are exact and ignore `Round`; narrowing ones round once,
// by `Round`: round_nearest_even (torch's .to()/copy_, CUDA's _rn intrinsics), round_toward_zero, or
// round_stochastic, which consumes `random_bits` (uniform 32 bits supplied by the caller).
// half <-> bf16 goes through float, which holds both exactly, so it also rounds only once.
template <class To, class From, class Round = round_nearest_even>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE To convert(From x, std::uint32_t random_bits = 0) {
  static_assert(is_element_type_v<To>, "mpopt::convert: To must be float, double, half_t or bf16_t");
  static_assert(is_element_type_v<From>, "mpopt::convert: From must be float, double, half_t or bf16_t");
  if constexpr (std::is_same_v<To, From>) {
    (void)random_bits;
    return x;
  } else if constexpr (significand_bits_v<To> >= significand_bits_v<From> &&
                       !(std::is_same_v<To, half_t> && std::is_same_v<From, bf16_t>)) {
    // float/double from anything narrower; every value is representable.
    (void)random_bits;
    return detail::widen<To>(x);
  } else if constexpr (is_16bit_v<From>) {
    // half <-> bf16: widen exactly, then narrow once.
    return convert<To, float, Round>(static_cast<float>(x), random_bits);
  } else if constexpr (std::is_same_v<Round, round_nearest_even> && std::is_same_v<To, float>) {
    (void)random_bits;
    return static_cast<float>(x);  // double -> float, IEEE nearest-even
  } else if constexpr (std::is_same_v<Round, round_nearest_even> && std::is_same_v<From, float> && is_16bit_v<To>) {
    (void)random_bits;
    return To(x);  // the type's own (intrinsic on device) nearest-even conversion
  } else {
    using dst = typename detail::format_of<To>::type;
    using src = typename detail::format_of<From>::type;
    return detail::from_bits<To>(detail::narrow_bits<dst, src, Round>(detail::to_bits(x), random_bits));
  }
}

}  // namespace mpopt
