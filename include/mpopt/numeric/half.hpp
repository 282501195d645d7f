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
  // narrow_bits' result, computed by the FPU so host loops vectorise (checked equal on all 2^32 floats; needs IEEE
  // arithmetic (no -ffast-math) and the default round-to-nearest mode). With E = |f|'s binade (at least -14, half's
  // subnormal binade), the float sum 2^(E+15) + 4|f| has quantum 2^(E-8), so it rounds 4|f| to multiples of 4 *
  // 2^(E-10) = half's quantum at E. Its mantissa field then holds |f| in half quanta (with half's implicit bit), and
  // its exponent field E + 142 lands in half's exponent bits as E + 14, to which that implicit bit adds the 1. The
  // x2^112 first sends |f| >= 2^16 to inf.
  const std::uint32_t u = bit_cast<std::uint32_t>(f);
  const std::uint32_t a = u & 0x7fffffffu;
  const float four_abs = bit_cast<float>(a) * 0x1p+112f * 0x1p-110f;
  const std::uint32_t binade = (a & 0x7f800000u) < 0x38800000u ? 0x38800000u : (a & 0x7f800000u);
  const std::uint32_t r = bit_cast<std::uint32_t>(bit_cast<float>(binade + (15u << 23)) + four_abs);
  const std::uint16_t bits = std::uint16_t(((u >> 16) & 0x8000u) | (((r >> 13) & 0x7c00u) + (r & 0x0fffu)));
  return a > 0x7f800000u ? fp16_format::canonical_nan_bits : bits;  // a select, not a branch
#endif
}

// Exact: every binary16 value is a float. NaN keeps its sign and payload, made quiet (as cvt.f32.f16 does).
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float half_to_float(std::uint16_t h) {
#if MPOPT_IS_DEVICE_CODE
  return __half2float(__ushort_as_half(h));
#else
  // Branch-free so host loops vectorise: normal values (and inf/NaN) re-biased by a multiply by 2^-112, subnormals
  // by placing the mantissa under a float whose quantum is half's (2^-24) and subtracting that float's base.
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t magnitude = std::uint32_t(h & 0x7fffu);
  const float normal = bit_cast<float>((magnitude << 13) + (std::uint32_t(0xe0u) << 23)) * 0x1p-112f;
  const float subnormal = bit_cast<float>(magnitude | (std::uint32_t(126u) << 23)) - 0.5f;  // 0.5 = 2^-1, quantum 2^-24
  // With the +224 exponent offset, inf/NaN land on float's all-ones exponent before the multiply; a NaN stays NaN.
  const std::uint32_t bits = sign | bit_cast<std::uint32_t>(magnitude < 0x0400u ? subnormal : normal);
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
