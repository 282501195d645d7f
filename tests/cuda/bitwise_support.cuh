// What the bit-for-bit CUDA tests (test_cuda_rounding.cu, test_cuda_muon_rounding.cu) share: the policies with a
// rounding option, the check that the device rounds every operation as the host does, and bitwise comparison.
#pragma once

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "mpopt/policy/precision.hpp"
#include "test_cuda_support.cuh"

namespace mpopt_test {

template <class R>
using bf16_master_fp32_states = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t, R>,
                                                 mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>;

template <class Prec>
inline constexpr bool is_kahan_v = std::is_same_v<typename Prec::master_rounding, mpopt::kahan_summation>;

__global__ void multiply_add(const float* x, float* out) {
  out[0] = x[0] * x[1] + x[2];
}

// Whether the device contracts a * b + c into a fused multiply-add (nvcc's default; these tests need --fmad=false).
inline bool device_contracts() {
  const std::vector<float> x = {1.0f + 0x1p-12f, 1.0f + 0x1p-12f, -1.0f};  // product 1 + 2^-11 + 2^-24: a tie
  device_buffer<float> in = to_device(x), out(1, "multiply-add result");
  multiply_add<<<1, 1>>>(in.get(), out.get());
  MPOPT_CUDA_REQUIRE(cudaGetLastError());
  return to_host(out.get(), 1)[0] != 0x1p-11f;  // separately rounded: (1 + 2^-11) - 1
}

inline void require_ieee_device_arithmetic() {
  INFO("the device fuses multiply-adds: compile this test with nvcc --fmad=false, as tests/CMakeLists.txt does");
  REQUIRE_FALSE(device_contracts());
}

// The first index where two buffers' bits differ, or -1.
template <class T>
long first_difference(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return long(i);
  return -1;
}

}  // namespace mpopt_test

// Checks that two buffers hold the same bits; names the first element that differs (a macro: doctest reports the
// caller's line).
#define CHECK_SAME_BITS(device, host, what)                                                \
  do {                                                                                     \
    const auto d_ = (device);                                                              \
    const auto h_ = (host);                                                                \
    const long at_ = ::mpopt_test::first_difference(d_, h_);                               \
    CHECK_MESSAGE(at_ < 0, (what), " differs first at element ", at_, ": device ",         \
                  at_ < 0 ? 0.0 : ::mpopt_test::as_double(d_[std::size_t(at_)]), " host ", \
                  at_ < 0 ? 0.0 : ::mpopt_test::as_double(h_[std::size_t(at_)]));          \
  } while (0)
