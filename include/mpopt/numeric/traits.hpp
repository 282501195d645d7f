// The element types mpopt knows, their names, and compile-time questions about them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "bf16.hpp"
#include "half.hpp"

namespace mpopt {

enum class dtype : std::uint8_t { fp32, fp16, bf16, fp64 };

template <class T>
struct dtype_of;  // no definition: an unknown element type fails here
template <>
struct dtype_of<float> : std::integral_constant<dtype, dtype::fp32> {};
template <>
struct dtype_of<half_t> : std::integral_constant<dtype, dtype::fp16> {};
template <>
struct dtype_of<bf16_t> : std::integral_constant<dtype, dtype::bf16> {};
template <>
struct dtype_of<double> : std::integral_constant<dtype, dtype::fp64> {};

template <class T>
inline constexpr bool is_element_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t> || std::is_same_v<T, double>;

template <class T>
inline constexpr bool is_16bit_v = std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>;

constexpr const char* dtype_name(dtype d) {
  switch (d) {
    case dtype::fp32: return "fp32";
    case dtype::fp16: return "fp16";
    case dtype::bf16: return "bf16";
    case dtype::fp64: return "fp64";
  }
  return "?";
}

template <class T>
constexpr const char* dtype_name() {
  return dtype_name(dtype_of<T>::value);
}

// Number of significand bits including the implicit one: orders types by precision.
template <class T>
inline constexpr int significand_bits_v = std::is_same_v<T, double>   ? 53
                                          : std::is_same_v<T, float>  ? 24
                                          : std::is_same_v<T, half_t> ? 11
                                          : std::is_same_v<T, bf16_t> ? 8
                                                                      : 0;

}  // namespace mpopt
