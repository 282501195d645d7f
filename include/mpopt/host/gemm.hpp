// A plain cache-blocked GEMM for the host backend's Newton–Schulz iteration (Muon): C = alpha·A·B + beta·D, row-major,
// operands of type T (float, or bf16_t) widened to float, products accumulated in float. It is the reference the GPU's
// cuBLAS path is checked against and the CPU-offload path, not a BLAS replacement.
//
// Deterministic: every element of C is one thread's sum of its k products in k order, whatever the blocking and the
// number of threads, so results are the same bits on every run and thread count (and, with -ffp-contract=off, on
// every x86-64 level).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <type_traits>

#include "../numeric/bf16.hpp"
#include "../numeric/convert.hpp"
#include "executor.hpp"

namespace mpopt::host {

namespace detail {

// A task is one gemm_mc x gemm_nc tile of C; A and B are packed (as float) gemm_kc columns/rows at a time into
// arrays on the task's stack (96 KiB in all: L2-resident), and the micro-kernel keeps a gemm_mr x gemm_nr block of C
// in registers across the packed k range: 4 rows of two vectors of the target's widest float vector.
#if defined(__AVX512F__)
inline constexpr std::size_t gemm_lanes = 16;
#elif defined(__AVX__)
inline constexpr std::size_t gemm_lanes = 8;
#else
inline constexpr std::size_t gemm_lanes = 4;
#endif
inline constexpr std::size_t gemm_mc = 32, gemm_nc = 128, gemm_kc = 128;
inline constexpr std::size_t gemm_mr = 4, gemm_nr = 2 * gemm_lanes;

#if defined(__GNUC__)
// GCC/Clang's generic vectors, with elementwise IEEE arithmetic: the same bits at every width. Plain loops are not
// enough: GCC 12 vectorises the k loop for AVX-512 with permutes and runs 10x slower than with SSE2.
typedef float gemm_vec __attribute__((vector_size(gemm_lanes * sizeof(float))));

// c[r][l] += sum over p < kc of ap[p][r] * bp[p][l], in p order; ap is packed [p][gemm_mr], bp has row stride gemm_nc.
MPOPT_FORCEINLINE void gemm_micro(const float* __restrict ap, const float* __restrict bp, std::size_t kc,
                                  float* __restrict c, std::size_t ldc) {
  constexpr std::size_t L = gemm_lanes;
  gemm_vec acc[gemm_mr][2];
  for (std::size_t r = 0; r < gemm_mr; ++r) {
    std::memcpy(&acc[r][0], c + r * ldc, sizeof(gemm_vec));
    std::memcpy(&acc[r][1], c + r * ldc + L, sizeof(gemm_vec));
  }
  for (std::size_t p = 0; p < kc; ++p) {
    gemm_vec b0, b1;
    std::memcpy(&b0, bp + p * gemm_nc, sizeof b0);
    std::memcpy(&b1, bp + p * gemm_nc + L, sizeof b1);
    const float* a = ap + p * gemm_mr;
    for (std::size_t r = 0; r < gemm_mr; ++r) {
      acc[r][0] += a[r] * b0;
      acc[r][1] += a[r] * b1;
    }
  }
  for (std::size_t r = 0; r < gemm_mr; ++r) {
    std::memcpy(c + r * ldc, &acc[r][0], sizeof(gemm_vec));
    std::memcpy(c + r * ldc + L, &acc[r][1], sizeof(gemm_vec));
  }
}
#else
inline void gemm_micro(const float* ap, const float* bp, std::size_t kc, float* c, std::size_t ldc) {
  for (std::size_t p = 0; p < kc; ++p)
    for (std::size_t r = 0; r < gemm_mr; ++r)
      for (std::size_t l = 0; l < gemm_nr; ++l) c[r * ldc + l] += ap[p * gemm_mr + r] * bp[p * gemm_nc + l];
}
#endif

}  // namespace detail

// C (m x n, row stride ldc) = alpha · A (m x k, lda) · B (k x n, ldb) + beta · D (m x n, ldd), rounded once to T.
// D is not read when it is null or beta is 0 (as BLAS does not read C then). C must not overlap A or B; D may be C.
template <class T>
void gemm(std::size_t m, std::size_t n, std::size_t k, float alpha, const T* a, std::size_t lda, const T* b,
          std::size_t ldb, float beta, const T* d, std::size_t ldd, T* c, std::size_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16_t>, "host::gemm: T must be float or bf16_t");
  using detail::gemm_kc;
  using detail::gemm_mc;
  using detail::gemm_mr;
  using detail::gemm_nc;
  using detail::gemm_nr;
  const std::size_t row_tiles = (m + gemm_mc - 1) / gemm_mc, col_tiles = (n + gemm_nc - 1) / gemm_nc;
  const std::ptrdiff_t tiles = std::ptrdiff_t(row_tiles * col_tiles);
  const bool read_d = d != nullptr && beta != 0.0f;
  // Threads pay off from about 2^20 multiply-adds (an 8 x 128 x 1024 product).
  const bool parallel = double(m) * double(n) * double(k) > double(1 << 20) && tiles > 1;
  (void)parallel;
  // Dynamic: a tile's result does not depend on the thread that computes it, and a busy core then delays no one.
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) if (parallel)
#endif
  for (std::ptrdiff_t t = 0; t < tiles; ++t) {
    const std::size_t i0 = std::size_t(t) / col_tiles * gemm_mc, j0 = std::size_t(t) % col_tiles * gemm_nc;
    const std::size_t mc = std::min(gemm_mc, m - i0), nc = std::min(gemm_nc, n - j0);
    const std::size_t mp = (mc + gemm_mr - 1) / gemm_mr * gemm_mr, np = (nc + gemm_nr - 1) / gemm_nr * gemm_nr;
    alignas(64) float acc[gemm_mc * gemm_nc];
    alignas(64) float ap[gemm_mc * gemm_kc];  // [row block][p][gemm_mr]
    alignas(64) float bp[gemm_kc * gemm_nc];  // [p][col]
    std::fill(acc, acc + gemm_mc * gemm_nc, 0.0f);
    for (std::size_t p0 = 0; p0 < k; p0 += gemm_kc) {
      const std::size_t kc = std::min(gemm_kc, k - p0);
      for (std::size_t p = 0; p < kc; ++p) {
        const T* brow = b + (p0 + p) * ldb + j0;
        float* out = bp + p * gemm_nc;
        for (std::size_t j = 0; j < nc; ++j) out[j] = convert<float>(brow[j]);
        for (std::size_t j = nc; j < np; ++j) out[j] = 0.0f;  // padding columns: computed, never stored
      }
      for (std::size_t ib = 0; ib < mp / gemm_mr; ++ib) {
        float* out = ap + ib * gemm_kc * gemm_mr;
        for (std::size_t r = 0; r < gemm_mr; ++r) {
          const std::size_t i = ib * gemm_mr + r;
          const T* arow = a + (i0 + i) * lda + p0;
          for (std::size_t p = 0; p < kc; ++p) out[p * gemm_mr + r] = i < mc ? convert<float>(arow[p]) : 0.0f;
        }
      }
      for (std::size_t ib = 0; ib < mp / gemm_mr; ++ib)
        for (std::size_t jb = 0; jb < np; jb += gemm_nr)
          detail::gemm_micro(ap + ib * gemm_kc * gemm_mr, bp + jb, kc, acc + ib * gemm_mr * gemm_nc + jb, gemm_nc);
    }
    for (std::size_t i = 0; i < mc; ++i) {
      const float* row = acc + i * gemm_nc;
      T* out = c + (i0 + i) * ldc + j0;
      if (read_d) {
        const T* drow = d + (i0 + i) * ldd + j0;
        for (std::size_t j = 0; j < nc; ++j) out[j] = convert<T>(alpha * row[j] + beta * convert<float>(drow[j]));
      } else {
        for (std::size_t j = 0; j < nc; ++j) out[j] = convert<T>(alpha * row[j]);
      }
    }
  }
}

}  // namespace mpopt::host
