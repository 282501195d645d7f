// Smoke test of the CUDA build: a kernel converts floats to bf16_t and half_t with the device intrinsics
// (mpopt's device path), and the bit patterns must equal the host's software rounding (its host path).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_test.cuh"
#include "mpopt/numeric/convert.hpp"

namespace {

__global__ void narrow_kernel(const float* in, std::uint16_t* bf16_bits, std::uint16_t* half_bits, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    bf16_bits[i] = mpopt::convert<mpopt::bf16_t>(in[i]).bits;
    half_bits[i] = mpopt::convert<mpopt::half_t>(in[i]).bits;
  }
}

float from_bits(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// Edge cases of both formats, then pseudo-random patterns: a quarter over every exponent, the rest inside
// fp16's range (2^-26 .. 2^16), where rounding, subnormals and the overflow threshold live.
std::vector<float> inputs() {
  std::vector<std::uint32_t> bits = {
      0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u,  // zeros, infinities
      0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu,  // quiet, negative and signalling NaNs
      0x00000001u, 0x807fffffu, 0x00800000u, 0x7f7fffffu,  // fp32 subnormals, smallest normal, largest finite
      0x3f808000u, 0x3f818000u, 0x3f80c000u, 0x3f807fffu,  // bf16 ties (to even, down and up) and near-ties
      0x7f7f8000u, 0x7f7f7fffu,                            // bf16 overflow tie, just below
      0x477fe000u, 0x477fefffu, 0x477ff000u, 0x477fffffu,  // fp16 65504, below the tie, the tie (-> inf), above
      0x33800000u, 0x33000000u, 0x33000001u, 0x33c00000u,  // fp16 2^-24 (min subnormal), 2^-25 tie, above, 1.5*2^-24
      0x38800000u, 0x387fe000u, 0x387ff000u,               // fp16 smallest normal, largest subnormal, tie between
      0x3f800000u, 0xbf800000u, 0x3eaaaaabu, 0x40490fdbu,  // 1, -1, 1/3, pi
  };
  std::uint64_t s = 0x9e3779b97f4a7c15ull;
  auto next = [&s] {  // splitmix64
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return std::uint32_t((z ^ (z >> 31)) >> 32);
  };
  for (int i = 0; i < 1024; ++i) bits.push_back(next());
  for (int i = 0; i < 3072; ++i) {
    const std::uint32_t r = next();
    const std::uint32_t exp = 127u - 26u + (r >> 8) % 43u;  // 2^-26 .. 2^16
    bits.push_back((r & 0x80000000u) | (exp << 23) | (next() & 0x7fffffu));
  }
  std::vector<float> out;
  out.reserve(bits.size());
  for (std::uint32_t b : bits) out.push_back(from_bits(b));
  return out;
}

}  // namespace

TEST_CASE("device float->bf16/half conversion matches the host bit for bit") {
  const std::vector<float> in = inputs();
  const int n = int(in.size());
  float* d_in = nullptr;
  std::uint16_t* d_bf16 = nullptr;
  std::uint16_t* d_half = nullptr;
  MPOPT_CUDA_REQUIRE(cudaMalloc(&d_in, n * sizeof(float)));
  MPOPT_CUDA_REQUIRE(cudaMalloc(&d_bf16, n * sizeof(std::uint16_t)));
  MPOPT_CUDA_REQUIRE(cudaMalloc(&d_half, n * sizeof(std::uint16_t)));
  MPOPT_CUDA_REQUIRE(cudaMemcpy(d_in, in.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  narrow_kernel<<<(n + 255) / 256, 256>>>(d_in, d_bf16, d_half, n);
  MPOPT_CUDA_REQUIRE(cudaGetLastError());
  std::vector<std::uint16_t> bf16_bits(n), half_bits(n);
  MPOPT_CUDA_REQUIRE(cudaMemcpy(bf16_bits.data(), d_bf16, n * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
  MPOPT_CUDA_REQUIRE(cudaMemcpy(half_bits.data(), d_half, n * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
  MPOPT_CUDA_REQUIRE(cudaFree(d_in));
  MPOPT_CUDA_REQUIRE(cudaFree(d_bf16));
  MPOPT_CUDA_REQUIRE(cudaFree(d_half));

  int mismatches = 0;
  for (int i = 0; i < n; ++i) {
    const std::uint16_t host_bf16 = mpopt::convert<mpopt::bf16_t>(in[i]).bits;
    const std::uint16_t host_half = mpopt::convert<mpopt::half_t>(in[i]).bits;
    if (host_bf16 != bf16_bits[i] || host_half != half_bits[i]) {
      if (++mismatches <= 10) {
        std::uint32_t x;
        std::memcpy(&x, &in[i], sizeof x);
        char msg[160];
        std::snprintf(msg, sizeof msg, "input 0x%08x: bf16 device 0x%04x host 0x%04x, half device 0x%04x host 0x%04x",
                      unsigned(x), unsigned(bf16_bits[i]), unsigned(host_bf16), unsigned(half_bits[i]),
                      unsigned(host_half));
        FAIL_CHECK(std::string(msg));
      }
    }
  }
  INFO(n, " values");
  CHECK(mismatches == 0);
}
