// bf16_t: bfloat16 storage usable in host code without the CUDA toolkit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../config.hpp"
#include "detail/ieee_round.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

// Host code built for a CPU with AVX512_BF16 (-march=native on one) narrows float arrays with its instruction;
// the bits are the same as without it (float_to_bf16_rn_avx512). Only then is <immintrin.h> (about a second of
// compile time) included.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && !defined(__CUDACC__)
#define MPOPT_BF16_NARROW_AVX512 1
#include <immintrin.h>
#endif

namespace mpopt {
namespace detail {

MPOPT_HOST_DEVICE MPOPT_FORCEINLINE std::uint16_t float_to_bf16_rn(float f) {
#if MPOPT_IS_DEVICE_CODE
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  // The general narrow_bits, specialised: bf16 keeps float's exponent, so nearest-even is one add on the bits
  // (carries reach the exponent and inf as they should). Branch-free, so host loops vectorise.
  const std::uint32_t u = bit_cast<std::uint32_t>(f);
  const std::uint16_t rounded = std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? bf16_format::canonical_nan_bits : rounded;  // a select, not a branch
#endif
}

// Exact: a bf16 is the top half of a float.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float bf16_to_float(std::uint16_t b) {
  return bit_cast<float>(std::uint32_t(b) << 16);
}

}  // namespace detail

struct bf16_t {
  std::uint16_t bits;

  bf16_t() = default;
  // Lossy, so explicit: rounds to nearest, ties to even (as __float2bfloat16_rn).
  MPOPT_HOST_DEVICE explicit bf16_t(float f) : bits(detail::float_to_bf16_rn(f)) {}
  // Lossless, so implicit.
  MPOPT_HOST_DEVICE operator float() const { return detail::bf16_to_float(bits); }

  static constexpr MPOPT_HOST_DEVICE bf16_t from_bits(std::uint16_t b) {
    bf16_t h{};
    h.bits = b;
    return h;
  }

#if defined(__CUDACC__)
  MPOPT_HOST_DEVICE bf16_t(__nv_bfloat16 h) : bits(static_cast<__nv_bfloat16_raw>(h).x) {}
  MPOPT_HOST_DEVICE operator __nv_bfloat16() const {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __nv_bfloat16(r);
  }
#endif
};

static_assert(sizeof(bf16_t) == 2, "bf16_t must be two bytes");

#if defined(MPOPT_BF16_NARROW_AVX512)
namespace detail {

// out[i] = bf16_t(in[i]) for i < n, bit for bit, 32 at a time. VCVTNE2PS2BF16 rounds to nearest even as
// float_to_bf16_rn does, but reads subnormal inputs as zero and keeps a NaN's sign and payload (Intel SDM); a
// group of 32 with either takes float_to_bf16_rn itself. tests/host/test_bf16_fast_narrow.cpp checks all 2^32 inputs.
inline void float_to_bf16_rn_avx512(const float* in, bf16_t* out, std::size_t n) {
  constexpr int nan_or_subnormal = 0x01 | 0x20 | 0x80;  // VFPCLASSPS classes: quiet NaN, denormal, signalling NaN
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 lo = _mm512_loadu_ps(in + i), hi = _mm512_loadu_ps(in + i + 16);
    if (_kortestz_mask16_u8(_mm512_fpclass_ps_mask(lo, nan_or_subnormal),
                            _mm512_fpclass_ps_mask(hi, nan_or_subnormal))) {
      _mm512_storeu_si512(out + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    } else {
      for (std::size_t j = i; j < i + 32; ++j) out[j] = bf16_t(in[j]);
    }
  }
  for (; i < n; ++i) out[i] = bf16_t(in[i]);
}

}  // namespace detail
#endif

}  // namespace mpopt
