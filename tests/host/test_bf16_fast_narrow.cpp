// The host tile path's float -> bf16 narrowing (host::detail::convert_n) against a reference rounding written here:
// the dropped 16 bits compared with one half, ties to an even result, every NaN to the canonical 0x7FFF. Where the
// build targets AVX512_BF16 (MPOPT_BF16_NARROW_AVX512: -march=native on such a CPU), convert_n uses
// VCVTNE2PS2BF16 with a fix-up for subnormal and NaN inputs, and all 2^32 inputs are checked; elsewhere the
// portable loop is checked on the special classes and random values.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "mpopt/host/executor.hpp"
#include "mpopt/numeric.hpp"

namespace {

using mpopt::bf16_t;

std::uint16_t reference_bf16(std::uint32_t u) {
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  const std::uint32_t kept = u >> 16, dropped = u & 0xFFFFu;
  const bool up = dropped > 0x8000u || (dropped == 0x8000u && (kept & 1u) != 0);
  return std::uint16_t(kept + (up ? 1u : 0u));  // a carry into the exponent gives the next binade or inf
}

// Narrows bits[0, n) with convert_n, at an offset of `shift` elements into the buffers (so groups of 32 straddle the
// class boundaries of a sorted sweep, and the pointers are not 64-byte aligned); returns the number of mismatches,
// printing the first few.
std::size_t check_patterns(const std::vector<std::uint32_t>& bits, std::size_t shift = 0) {
  const std::size_t n = bits.size();
  std::vector<float> in(n + shift);
  if (n > 0) std::memcpy(in.data() + shift, bits.data(), n * sizeof(float));  // bits.data() may be null when empty
  std::vector<bf16_t> out(n + shift);
  mpopt::host::detail::convert_n(in.data() + shift, out.data() + shift, n);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint16_t want = reference_bf16(bits[i]);
    if (out[shift + i].bits != want && bad++ < 5)
      std::printf("float bits 0x%08X: convert_n gave 0x%04X, expected 0x%04X\n", unsigned(bits[i]),
                  unsigned(out[shift + i].bits), unsigned(want));
  }
  return bad;
}

// Every pattern in [first, last] with both signs.
void add_range(std::vector<std::uint32_t>& bits, std::uint32_t first, std::uint32_t last) {
  for (std::uint64_t u = first; u <= last; ++u) {
    bits.push_back(std::uint32_t(u));
    bits.push_back(std::uint32_t(u) | 0x80000000u);
  }
}

}  // namespace

TEST_CASE("the reference rounding on hand-picked values") {
  CHECK(reference_bf16(0x3F800000u) == 0x3F80);  // 1
  CHECK(reference_bf16(0x3F808000u) == 0x3F80);  // tie, even kept
  CHECK(reference_bf16(0x3F818000u) == 0x3F82);  // tie, odd kept: up
  CHECK(reference_bf16(0x3F808001u) == 0x3F81);  // above the tie
  CHECK(reference_bf16(0x7F7FFFFFu) == 0x7F80);  // max float rounds to inf
  CHECK(reference_bf16(0x00008000u) == 0x0000);  // half the smallest bf16 subnormal: tie to even zero
  CHECK(reference_bf16(0x00018000u) == 0x0002);  // 1.5 subnormal quanta: tie to even 2
  CHECK(reference_bf16(0x007FFFFFu) == 0x0080);  // largest float subnormal rounds to the smallest normal
  CHECK(reference_bf16(0xFFC00000u) == 0x7FFF);  // any NaN, any sign: the canonical one
}

TEST_CASE("tile narrowing float -> bf16: subnormals, NaNs, infinities, zeros and rounding boundaries") {
  std::vector<std::uint32_t> bits;
  add_range(bits, 0x00000000u, 0x007FFFFFu);  // zero and every subnormal (read as zero by VCVTNE2PS2BF16)
  add_range(bits, 0x7F7F0000u, 0x7FFFFFFFu);  // the top binade, inf and every NaN (payloads kept by it)
  // Around each rounding boundary (dropped bits 0x7FFF, 0x8000, 0x8001) with even and odd kept bits, in every binade.
  for (std::uint32_t e = 0; e < 256; ++e)
    for (std::uint32_t kept_low = 0; kept_low < 4; ++kept_low)
      for (std::uint32_t dropped : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) {
        const std::uint32_t u = (e << 23) | (kept_low << 16) | dropped;
        bits.push_back(u);
        bits.push_back(u | 0x80000000u);
        bits.push_back(u | 0x007F0000u);  // the largest kept mantissa: a carry into the exponent
      }
  for (std::size_t shift : {0, 1, 7, 31}) {
    CAPTURE(shift);
    CHECK(check_patterns(bits, shift) == 0);
  }
}

TEST_CASE("tile narrowing float -> bf16: random patterns with subnormals and NaNs among normal lanes") {
  std::mt19937 rng(7);
  std::vector<std::uint32_t> bits(1 << 22);
  for (auto& u : bits) {
    u = std::uint32_t(rng());
    // One lane in about 16 made subnormal or NaN, so most groups of 32 mix them with normal values.
    const std::uint32_t pick = u & 0x1Fu;
    if (pick == 0) u &= 0x807FFFFFu;
    if (pick == 1) u |= 0x7F800001u;
  }
  for (std::size_t shift : {0, 5}) {
    CAPTURE(shift);
    CHECK(check_patterns(bits, shift) == 0);
  }
  for (std::size_t n : {0, 1, 31, 32, 33, 63, 100}) {  // lengths around the 32-element groups
    CAPTURE(n);
    CHECK(check_patterns(std::vector<std::uint32_t>(bits.begin(), bits.begin() + std::ptrdiff_t(n)), 3) == 0);
  }
}

#if defined(MPOPT_BF16_NARROW_AVX512)
TEST_CASE("AVX512_BF16 narrowing: every one of the 2^32 float patterns") {
  // Chunks start 7 patterns early, so groups of 32 straddle the subnormal/normal and inf/NaN boundaries.
  constexpr std::size_t chunk = std::size_t(1) << 16;
  std::vector<std::uint32_t> bits(chunk);
  std::vector<float> in(chunk);
  std::vector<bf16_t> out(chunk);
  std::uint64_t bad = 0;
  for (std::uint64_t base = 0; base < (std::uint64_t(1) << 32); base += chunk) {
    for (std::size_t i = 0; i < chunk; ++i) bits[i] = std::uint32_t(base + i - 7);
    std::memcpy(in.data(), bits.data(), chunk * sizeof(float));
    mpopt::detail::float_to_bf16_rn_avx512(in.data(), out.data(), chunk);
    for (std::size_t i = 0; i < chunk; ++i) {
      const std::uint16_t want = reference_bf16(bits[i]);
      if (out[i].bits != want && bad++ < 5)
        std::printf("float bits 0x%08X: gave 0x%04X, expected 0x%04X\n", unsigned(bits[i]), unsigned(out[i].bits),
                    unsigned(want));
    }
  }
  CHECK(bad == 0);
}
#endif
