// half_t: IEEE binary16 storage usable in host code without the CUDA toolkit.
#pragma once

#include <cstdint>

#include "../config.hpp"
#include "detail/ieee_round.hpp"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace mpopt {
namespace detail {

MPOPT_HOST_DEVICE MPOPT_FORCEINLINE std::uint16_t float_to_half_rn(float f) {
#if MPOPT_IS_DEVICE_CODE
  return __half_as_ushort(__float2half_rn(f));
#else
  return narrow_bits<fp16_format, fp32_format, round_nearest_even>(bit_cast<std::uint32_t>(f), 0);
#endif
}

// Exact: every binary16 value is a float. NaN keeps its sign and payload, made quiet (as cvt.f32.f16 does).
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float half_to_float(std::uint16_t h) {
#if MPOPT_IS_DEVICE_CODE
  return __half2float(__ushort_as_half(h));
#else
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13) | (man != 0 ? 0x00400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {
    // Subnormal: normalise the mantissa.
    int e = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    bits = sign | (std::uint32_t(e) << 23) | ((man & 0x3ffu) << 13);
  }
  return bit_cast<float>(bits);
#endif
}

}  // namespace detail

struct half_t {
  std::uint16_t bits;

  half_t() = default;
  // Lossy, so explicit: rounds to nearest, ties to even (as __float2half_rn).
  MPOPT_HOST_DEVICE explicit half_t(float f) : bits(detail::float_to_half_rn(f)) {}
  // Lossless, so implicit.
  MPOPT_HOST_DEVICE operator float() const { return detail::half_to_float(bits); }

  static constexpr MPOPT_HOST_DEVICE half_t from_bits(std::uint16_t b) {
    half_t h{};
    h.bits = b;
    return h;
  }

#if defined(__CUDACC__)
  MPOPT_HOST_DEVICE half_t(__half h) : bits(static_cast<__half_raw>(h).x) {}
  MPOPT_HOST_DEVICE operator __half() const {
    __half_raw r;
    r.x = bits;
    return __half(r);
  }
#endif
};

static_assert(sizeof(half_t) == 2, "half_t must be two bytes");

}  // namespace mpopt
