// The Newton–Schulz orthogonalisation of Muon (rule/muon.hpp) on the host: the same algorithm as cuda/muon.cuh, with
// host::gemm in place of cuBLAS. GEMM operands and results are of type T (muon_gemm<T>): float, or bf16_t with
// products accumulated in float. Deterministic (host/gemm.hpp), and it allocates nothing: the workspace is sized once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <utility>

#include "../error.hpp"
#include "../numeric/convert.hpp"
#include "../rule/muon.hpp"
#include "aligned_buffer.hpp"
#include "executor.hpp"
#include "gemm.hpp"

namespace mpopt::host {

// out (m x n) = in (n x m)ᵀ, in cache-sized blocks.
template <class T>
void transpose(const T* in, std::size_t n, std::size_t m, T* out) {
  constexpr std::size_t tile = 32;
  const std::ptrdiff_t blocks = std::ptrdiff_t((n + tile - 1) / tile);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(n * m) > parallel_threshold)
#endif
  for (std::ptrdiff_t bi = 0; bi < blocks; ++bi) {
    const std::size_t i0 = std::size_t(bi) * tile, i1 = std::min(n, i0 + tile);
    for (std::size_t j0 = 0; j0 < m; j0 += tile) {
      const std::size_t j1 = std::min(m, j0 + tile);
      for (std::size_t i = i0; i < i1; ++i)
        for (std::size_t j = j0; j < j1; ++j) out[j * n + i] = in[i * m + j];
    }
  }
}

// A rows x cols matrix is iterated as X (n x m, n = min, m = max): the matrix itself, or its transpose when
// rows > cols (so that X Xᵀ is the smaller Gram matrix).
struct ns_shape {
  std::size_t n = 0, m = 0;
  bool transposed = false;
  static ns_shape of(std::size_t rows, std::size_t cols) {
    return {std::min(rows, cols), std::max(rows, cols), rows > cols};
  }
};

// Multiply-adds of the GEMMs of one iteration: X Xᵀ (n²m), A·A (n³), B·X (n²m). Times 2 for flops.
inline double ns_multiply_adds(std::size_t rows, std::size_t cols) {
  const ns_shape s = ns_shape::of(rows, cols);
  const double n = double(s.n), m = double(s.m);
  return 2.0 * n * n * m + n * n * n;
}

template <class T>
class newton_schulz_workspace {
 public:
  newton_schulz_workspace() = default;
  // Room for any matrix with n·m <= max_nm and n <= max_n.
  newton_schulz_workspace(std::size_t max_nm, std::size_t max_n)
      : max_nm_(max_nm),
        max_n_(max_n),
        x_{aligned_buffer<T>(max_nm), aligned_buffer<T>(max_nm)},
        xt_(max_nm),
        a_(max_n * max_n),
        b_(max_n * max_n),
        partials_((max_nm + reduce_block - 1) / reduce_block) {}

  // Sized for every shape in [first, last) (pairs or structs with rows and cols).
  template <class It>
  static newton_schulz_workspace for_shapes(It first, It last) {
    std::size_t nm = 0, n = 0;
    for (; first != last; ++first) {
      const ns_shape s = ns_shape::of(first->rows, first->cols);
      nm = std::max(nm, s.n * s.m);
      n = std::max(n, s.n);
    }
    return newton_schulz_workspace(nm, n);
  }

  bool fits(std::size_t rows, std::size_t cols) const noexcept {
    const ns_shape s = ns_shape::of(rows, cols);
    return s.n * s.m <= max_nm_ && s.n <= max_n_;
  }
  std::size_t bytes() const noexcept {
    return (3 * max_nm_ + 2 * max_n_ * max_n_) * sizeof(T) + partials_.size() * sizeof(double);
  }

  T* x(int i) noexcept { return x_[i].data(); }
  T* xt() noexcept { return xt_.data(); }
  T* gram() noexcept { return a_.data(); }
  T* poly() noexcept { return b_.data(); }
  double* partials() noexcept { return partials_.data(); }

 private:
  std::size_t max_nm_ = 0, max_n_ = 0;
  aligned_buffer<T> x_[2], xt_, a_, b_;
  aligned_buffer<double> partials_;
};

// The orthogonalised matrix, in the workspace (valid until its next use). at(r, c) reads element (r, c) of the
// rows x cols result, undoing the transpose.
template <class T>
struct ns_result {
  const T* x = nullptr;  // n x m, row-major
  ns_shape shape;
  double norm = 0.0;  // ||u||_F before the clamp to eps
  float at(std::size_t r, std::size_t c) const {
    return convert<float>(shape.transposed ? x[c * shape.m + r] : x[r * shape.m + c]);
  }
};

// The rows x cols result as float, row-major, into out: a blocked transpose when the iterate was transposed, so that
// the caller's update streams through memory.
template <class T>
void copy_result(const ns_result<T>& r, float* out) {
  const std::size_t n = r.shape.n, m = r.shape.m;
  if (!r.shape.transposed) {
    const std::ptrdiff_t count = std::ptrdiff_t(n * m);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (count > parallel_threshold)
#endif
    for (std::ptrdiff_t i = 0; i < count; ++i) out[i] = convert<float>(r.x[i]);
    return;
  }
  constexpr std::size_t tile = 32;
  const std::ptrdiff_t blocks = std::ptrdiff_t((m + tile - 1) / tile);  // result rows (m of them) in tiles
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(n * m) > parallel_threshold)
#endif
  for (std::ptrdiff_t bi = 0; bi < blocks; ++bi) {
    const std::size_t r0 = std::size_t(bi) * tile, r1 = std::min(m, r0 + tile);
    for (std::size_t c0 = 0; c0 < n; c0 += tile) {
      const std::size_t c1 = std::min(n, c0 + tile);
      for (std::size_t row = r0; row < r1; ++row)
        for (std::size_t col = c0; col < c1; ++col) out[row * n + col] = convert<float>(r.x[col * m + row]);
    }
  }
}

// X = u / max(||u||_F, eps) (||u|| summed in double in host::reduce_block blocks, the divisor rounded once to float,
// X rounded once to T), transposed when rows > cols; then `steps` times A = X Xᵀ; B = c·A·A + b·A; X = B·X + a·X, each
// GEMM rounding its result once to T. Throws mpopt::error when the workspace is too small for the shape.
template <class T>
ns_result<T> newton_schulz(const float* u, std::size_t rows, std::size_t cols, const muon::ns_coefficients_type& coef,
                           int steps, double eps, newton_schulz_workspace<T>& ws) {
  if (!ws.fits(rows, cols))
    throw error(status::invalid("newton_schulz: the workspace is too small for a " + std::to_string(rows) + " x " +
                                std::to_string(cols) + " matrix"));
  ns_result<T> r;
  r.shape = ns_shape::of(rows, cols);
  const std::size_t n = r.shape.n, m = r.shape.m, count = n * m;
  reduce_grad_partials(u, count, ws.partials());
  r.norm = std::sqrt(sum_in_order(ws.partials(), (count + reduce_block - 1) / reduce_block));
  const float denom = float(std::max(r.norm, eps));
  T* x = ws.x(0);
  T* next = ws.x(1);
  T* xt = ws.xt();
  T* gram = ws.gram();
  T* poly = ws.poly();
  const std::ptrdiff_t prows = std::ptrdiff_t(rows);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(count) > parallel_threshold)
#endif
  for (std::ptrdiff_t i = 0; i < prows; ++i) {
    const float* row = u + std::size_t(i) * cols;
    for (std::size_t j = 0; j < cols; ++j) {
      const T v = convert<T>(row[j] / denom);
      if (r.shape.transposed) {
        x[j * m + std::size_t(i)] = v;  // X = uᵀ
        xt[std::size_t(i) * n + j] = v;
      } else {
        x[std::size_t(i) * m + j] = v;
        xt[j * n + std::size_t(i)] = v;
      }
    }
  }
  const float a = float(coef.a), b = float(coef.b), c = float(coef.c);
  for (int s = 0; s < steps; ++s) {
    if (s > 0) transpose(x, n, m, xt);
    gemm<T>(n, n, m, 1.0f, x, m, xt, n, 0.0f, nullptr, 0, gram, n);  // A = X Xᵀ
    gemm<T>(n, n, n, c, gram, n, gram, n, b, gram, n, poly, n);      // B = c·A·A + b·A
    gemm<T>(n, m, n, 1.0f, poly, n, x, m, a, x, m, next, m);         // X = B·X + a·X
    std::swap(x, next);
  }
  r.x = x;
  return r;
}

}  // namespace mpopt::host
