// Muon (rule/muon.hpp, host/gemm.hpp, host/newton_schulz.hpp, muon.hpp) on the host.
//
// The reference is an fp64 re-computation written here with plain loops (ref_* below), independent of the library.
// Bounds, and why (measured values in the comments where they are set):
//   host::gemm, fp32                  |C - C64| <= 1e-5 · (|alpha| Σ|a·b| + |beta·d|)   fp32 sums of k products
//   Newton–Schulz, fp32 GEMMs          max|X - X64| <= 2e-5 · max|X64|    five iterations of three fp32 GEMMs
//   Newton–Schulz, bf16 GEMM operands  max|X - X64| <= 0.05 · max|X64|    every GEMM result rounded to bf16 (2^-8)
//   Muon steps, fp32                   max|w - w64| <= 1e-5 · max|w64 - w0|, i.e. relative to how far the weights
//                                      moved
//   torch fixture (fp32 NS, torch's BLAS)  max|w - w_torch| <= 1e-5 · max|w_torch - w0|
// Everything that does not involve a GEMM is bit for bit: the aux AdamW tensors against mpopt::optimizer<adamw>, a
// power-of-two static loss scale against no scaling, a skipped step against the buffers before it, and the
// GEMM itself across thread counts.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mpopt/host/gemm.hpp"
#include "mpopt/host/newton_schulz.hpp"
#include "mpopt/muon.hpp"

namespace {

using mpopt::matrix_shape;
using mpopt::muon_part;

// A deterministic value in [-1, 1) from a few integers (splitmix64).
double noise(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  std::uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^ c;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return double(x >> 11) / double(1ull << 52) - 1.0;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// ---------------------------------------------------------------------------------------------------------------------
// The fp64 reference: torch.optim.Muon's algorithm, in double, with plain triple loops.

// Newton–Schulz of u (rows x cols, row-major), returned rows x cols.
std::vector<double> ref_orthogonalise(const std::vector<double>& u, std::size_t rows, std::size_t cols,
                                      const mpopt::muon::args& hp) {
  const bool tall = rows > cols;
  const std::size_t n = tall ? cols : rows, m = tall ? rows : cols;
  std::vector<double> x(n * m), a(n * n), b(n * n), next(n * m);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) (tall ? x[c * m + r] : x[r * m + c]) = u[r * cols + c];
  double sq = 0;
  for (double v : x) sq += v * v;
  const double d = std::max(std::sqrt(sq), hp.eps);
  for (double& v : x) v /= d;
  const double ca = hp.ns_coefficients.a, cb = hp.ns_coefficients.b, cc = hp.ns_coefficients.c;
  for (int s = 0; s < hp.ns_steps; ++s) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < n; ++j) {
        double acc = 0;
        for (std::size_t k = 0; k < m; ++k) acc += x[i * m + k] * x[j * m + k];
        a[i * n + j] = acc;
      }
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < n; ++j) {
        double acc = 0;
        for (std::size_t k = 0; k < n; ++k) acc += a[i * n + k] * a[k * n + j];
        b[i * n + j] = cb * a[i * n + j] + cc * acc;
      }
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < m; ++j) {
        double acc = 0;
        for (std::size_t k = 0; k < n; ++k) acc += b[i * n + k] * x[k * m + j];
        next[i * m + j] = ca * x[i * m + j] + acc;
      }
    x.swap(next);
  }
  std::vector<double> out(rows * cols);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) out[r * cols + c] = tall ? x[c * m + r] : x[r * m + c];
  return out;
}

// One Muon matrix in double.
struct ref_matrix {
  std::size_t rows, cols;
  std::vector<double> w, buf;

  void step(const std::vector<double>& g, const mpopt::muon::args& hp) {
    std::vector<double> u(g.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
      buf[i] += (1.0 - hp.momentum) * (g[i] - buf[i]);
      u[i] = hp.nesterov ? g[i] + hp.momentum * (buf[i] - g[i]) : buf[i];
    }
    const std::vector<double> o = ref_orthogonalise(u, rows, cols, hp);
    const double r = double(rows), c = double(cols);
    const double ratio = hp.adjust_lr == mpopt::muon_adjust_lr::original ? std::sqrt(std::max(1.0, r / c))
                                                                         : 0.2 * std::sqrt(std::max(r, c));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = w[i] * (1.0 - hp.lr * hp.weight_decay) - hp.lr * ratio * o[i];
  }
};

// ---------------------------------------------------------------------------------------------------------------------
// A matrix group with its buffers.

template <class Prec>
struct matrices {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<matrix_shape> shapes;
  std::vector<param_t> params;
  std::vector<grad_t> grads;
  mpopt::muon_group<Prec> group;

  matrices(std::vector<matrix_shape> s, const mpopt::muon::args& hp, std::uint64_t seed = 1) : shapes(std::move(s)) {
    std::size_t n = 0;
    for (const matrix_shape& m : shapes) n += m.rows * m.cols;
    params.resize(n);
    grads.resize(n);
    for (std::size_t i = 0; i < n; ++i) params[i] = mpopt::convert<param_t>(0.1 * noise(seed, i, 0));
    group.params = params.data();
    group.grads = grads.data();
    group.shapes = shapes;
    group.hparams = hp;
  }
  // Grads with a column-dependent drift, so the matrices are far from orthogonal.
  void set_grads(int step, double scale = 1.0) {
    std::size_t i = 0;
    for (const matrix_shape& m : shapes)
      for (std::size_t r = 0; r < m.rows; ++r)
        for (std::size_t c = 0; c < m.cols; ++c, ++i)
          grads[i] = mpopt::convert<grad_t>(
              scale * (noise(100 + std::uint64_t(step), i, 1) + 0.5 * double(c) / double(m.cols) * (1 + step)));
  }
};

template <class Prec>
struct aux_tensors {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<param_t> params;
  std::vector<grad_t> grads;
  mpopt::param_group<mpopt::adamw, Prec> group;

  aux_tensors(std::vector<std::size_t> sizes, const mpopt::adamw::args& hp, std::uint64_t seed) {
    std::size_t n = 0;
    for (std::size_t s : sizes) n += s;
    params.resize(n);
    grads.resize(n);
    for (std::size_t i = 0; i < n; ++i) params[i] = mpopt::convert<param_t>(noise(seed, i, 2));
    group.params = params.data();
    group.grads = grads.data();
    group.size = n;
    group.tensor_sizes = std::move(sizes);
    group.hparams = hp;
  }
  void set_grads(int step, std::uint64_t seed, double scale = 1.0) {
    for (std::size_t i = 0; i < grads.size(); ++i)
      grads[i] = mpopt::convert<grad_t>(scale * 0.1 * noise(200 + std::uint64_t(step), i, seed));
  }
};

template <class Opt>
std::vector<typename Opt::master_t> master_of(Opt& opt, muon_part part, std::size_t g, std::size_t n) {
  std::vector<typename Opt::master_t> out(n);
  opt.gather_master(part, g, out.data());
  return out;
}
template <class Opt>
std::vector<typename Opt::state_t> state_of(Opt& opt, muon_part part, std::size_t g, int j, std::size_t n) {
  std::vector<typename Opt::state_t> out(n);
  opt.gather_state(part, g, j, out.data());
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------

TEST_CASE("host::gemm: fp32 and bf16 operands against fp64, alpha/beta, D aliasing C, any thread count") {
  // Sizes that cross every blocking boundary (tiles of 32 x 128, k blocks of 128, micro-tiles 4 x 2 vectors).
  const std::size_t m = 37, n = 141, k = 259;
  std::vector<float> a(m * k), b(k * n), d(m * n);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(noise(1, i, 0));
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(noise(2, i, 0));
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = float(noise(3, i, 0));
  const float alpha = -0.75f, beta = 1.5f;
  std::vector<float> c(m * n);
  mpopt::host::gemm<float>(m, n, k, alpha, a.data(), k, b.data(), n, beta, d.data(), n, c.data(), n);
  double worst = 0;
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double acc = 0, mag = 0;
      for (std::size_t p = 0; p < k; ++p) {
        acc += double(a[i * k + p]) * double(b[p * n + j]);
        mag += std::fabs(double(a[i * k + p]) * double(b[p * n + j]));
      }
      const double want = double(alpha) * acc + double(beta) * double(d[i * n + j]);
      const double scale = std::fabs(double(alpha)) * mag + std::fabs(double(beta) * double(d[i * n + j]));
      worst = std::max(worst, std::fabs(double(c[i * n + j]) - want) / scale);
    }
  // The classic bound of a k-term fp32 sum, plus the epilogue's roundings: (k + 2)·2^-24 of the sum of magnitudes.
  const double u = std::ldexp(1.0, -24);
  INFO("worst fp32 error relative to the sum of magnitudes: ", worst);  // 1.5e-7 measured
  CHECK(worst <= double(k + 2) * u);

  // D == C: the epilogue reads each element before writing it.
  std::vector<float> in_place = d;
  mpopt::host::gemm<float>(m, n, k, alpha, a.data(), k, b.data(), n, beta, in_place.data(), n, in_place.data(), n);
  CHECK(same_bits(in_place, c));
  // beta 0 does not read D (a NaN there must not leak), as BLAS.
  std::vector<float> nan_d(m * n, std::numeric_limits<float>::quiet_NaN()), no_d(m * n), null_d(m * n);
  mpopt::host::gemm<float>(m, n, k, alpha, a.data(), k, b.data(), n, 0.0f, nan_d.data(), n, no_d.data(), n);
  mpopt::host::gemm<float>(m, n, k, alpha, a.data(), k, b.data(), n, 0.0f, nullptr, 0, null_d.data(), n);
  CHECK(same_bits(no_d, null_d));

  // bf16 operands: the product of the rounded operands, accumulated in fp32, rounded once to bf16.
  std::vector<mpopt::bf16_t> ah(a.size()), bh(b.size()), dh(d.size()), ch(m * n);
  for (std::size_t i = 0; i < a.size(); ++i) ah[i] = mpopt::bf16_t(a[i]);
  for (std::size_t i = 0; i < b.size(); ++i) bh[i] = mpopt::bf16_t(b[i]);
  for (std::size_t i = 0; i < d.size(); ++i) dh[i] = mpopt::bf16_t(d[i]);
  mpopt::host::gemm<mpopt::bf16_t>(m, n, k, alpha, ah.data(), k, bh.data(), n, beta, dh.data(), n, ch.data(), n);
  // Products of bf16 values are exact in fp32, so the bound is the fp32 sum's plus one bf16 rounding (2^-8:
  // bf16 keeps 8 significant bits).
  double worst_bf16 = 0;
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double acc = 0, mag = 0;
      for (std::size_t p = 0; p < k; ++p) {
        const double ab = double(float(ah[i * k + p])) * double(float(bh[p * n + j]));
        acc += ab;
        mag += std::fabs(ab);
      }
      const double d64 = double(beta) * double(float(dh[i * n + j]));
      const double want = double(alpha) * acc + d64;
      const double bound =
          std::ldexp(std::fabs(want), -8) + double(k + 2) * u * (std::fabs(double(alpha)) * mag + std::fabs(d64));
      worst_bf16 = std::max(worst_bf16, std::fabs(double(float(ch[i * n + j])) - want) / bound);
    }
  INFO("worst bf16 error as a fraction of its bound: ", worst_bf16);  // the bf16 rounding dominates
  CHECK(worst_bf16 <= 1.0);

#if defined(_OPENMP)
  // Each element is one thread's sum in k order: one thread or many, the same bits.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  std::vector<float> one(m * n);
  mpopt::host::gemm<float>(m, n, k, alpha, a.data(), k, b.data(), n, beta, d.data(), n, one.data(), n);
  omp_set_num_threads(std::max(threads, 3));
  std::vector<float> many(m * n);
  mpopt::host::gemm<float>(m, n, k, alpha, a.data(), k, b.data(), n, beta, d.data(), n, many.data(), n);
  omp_set_num_threads(threads);
  CHECK(same_bits(one, c));
  CHECK(same_bits(many, c));
#endif
}

TEST_CASE("Newton-Schulz: fp32 and bf16 GEMMs against an fp64 re-computation, wide, tall and square") {
  const std::vector<matrix_shape> shapes = {{24, 40}, {40, 24}, {32, 32}, {70, 150}, {150, 70}, {1, 17}, {9, 1}};
  mpopt::muon::args hp;
  auto ws32 = mpopt::host::newton_schulz_workspace<float>::for_shapes(shapes.begin(), shapes.end());
  auto ws16 = mpopt::host::newton_schulz_workspace<mpopt::bf16_t>::for_shapes(shapes.begin(), shapes.end());
  double worst32 = 0, worst16 = 0;
  for (std::size_t s = 0; s < shapes.size(); ++s) {
    const std::size_t rows = shapes[s].rows, cols = shapes[s].cols;
    CAPTURE(rows);
    CAPTURE(cols);
    std::vector<float> u(rows * cols);
    std::vector<double> u64(u.size());
    for (std::size_t i = 0; i < u.size(); ++i) {
      u[i] = float(noise(s, i, 5) + 0.3 * double(i % cols) / double(cols));
      u64[i] = double(u[i]);
    }
    const std::vector<double> want = ref_orthogonalise(u64, rows, cols, hp);
    const double scale = max_abs(want);
    const auto x32 =
        mpopt::host::newton_schulz<float>(u.data(), rows, cols, hp.ns_coefficients, hp.ns_steps, hp.eps, ws32);
    const auto x16 =
        mpopt::host::newton_schulz<mpopt::bf16_t>(u.data(), rows, cols, hp.ns_coefficients, hp.ns_steps, hp.eps, ws16);
    CHECK(x32.shape.transposed == (rows > cols));
    double e32 = 0, e16 = 0;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t c = 0; c < cols; ++c) {
        e32 = std::max(e32, std::fabs(double(x32.at(r, c)) - want[r * cols + c]));
        e16 = std::max(e16, std::fabs(double(x16.at(r, c)) - want[r * cols + c]));
      }
    worst32 = std::max(worst32, e32 / scale);
    worst16 = std::max(worst16, e16 / scale);
  }
  INFO("fp32: ", worst32, ", bf16: ", worst16);
  CHECK(worst32 <= 2e-5);
  CHECK(worst16 <= 0.05);

  // ns_steps 0 is the normalised input; the norm clamps to eps (a zero matrix stays zero).
  std::vector<float> zero(6, 0.0f);
  mpopt::muon::args none = hp;
  none.ns_steps = 0;
  const auto z = mpopt::host::newton_schulz<float>(zero.data(), 2, 3, none.ns_coefficients, 0, none.eps, ws32);
  CHECK(z.norm == 0.0);
  for (std::size_t i = 0; i < 6; ++i) CHECK(z.x[i] == 0.0f);
  // A workspace too small for the shape is an error, not an overrun.
  CHECK_THROWS_AS(mpopt::host::newton_schulz<float>(zero.data(), 200, 300, hp.ns_coefficients, 1, hp.eps, ws32),
                  mpopt::error);
}

TEST_CASE("Muon steps against fp64: tall and wide, nesterov on and off, both lr adjustments, weight decay") {
  const std::vector<matrix_shape> shapes = {{16, 24}, {30, 12}, {20, 20}};
  struct config {
    bool nesterov;
    mpopt::muon_adjust_lr adjust;
    double weight_decay, momentum;
  };
  const config configs[] = {{true, mpopt::muon_adjust_lr::original, 0.1, 0.95},
                            {false, mpopt::muon_adjust_lr::original, 0.0, 0.9},
                            {true, mpopt::muon_adjust_lr::match_rms_adamw, 0.3, 0.8},
                            {false, mpopt::muon_adjust_lr::match_rms_adamw, 0.1, 0.0}};
  constexpr int steps = 4;
  for (const config& cfg : configs) {
    CAPTURE(cfg.nesterov);
    CAPTURE(mpopt::to_string(cfg.adjust));
    CAPTURE(cfg.weight_decay);
    mpopt::muon::args hp;
    hp.lr = 0.02;
    hp.nesterov = cfg.nesterov;
    hp.adjust_lr = cfg.adjust;
    hp.weight_decay = cfg.weight_decay;
    hp.momentum = cfg.momentum;
    matrices<mpopt::fp32_policy> m(shapes, hp);
    std::vector<ref_matrix> ref;
    std::size_t offset = 0;
    for (const matrix_shape& s : shapes) {
      const std::size_t n = s.rows * s.cols;
      ref.push_back({s.rows, s.cols,
                     std::vector<double>(m.params.begin() + std::ptrdiff_t(offset),
                                         m.params.begin() + std::ptrdiff_t(offset + n)),
                     std::vector<double>(n, 0.0)});
      offset += n;
    }
    const std::vector<float> w0 = m.params;
    mpopt::muon_optimizer<mpopt::fp32_policy> opt({m.group});
    for (int step = 0; step < steps; ++step) {
      m.set_grads(step);
      const mpopt::step_result r = opt.step();
      REQUIRE(r.applied);
      CHECK(r.step == step + 1);
      offset = 0;
      for (ref_matrix& rm : ref) {
        const std::vector<double> g(m.grads.begin() + std::ptrdiff_t(offset),
                                    m.grads.begin() + std::ptrdiff_t(offset + rm.w.size()));
        rm.step(g, hp);
        offset += rm.w.size();
      }
    }
    offset = 0;
    double worst = 0;
    for (const ref_matrix& rm : ref) {
      double moved = 0, err = 0;
      for (std::size_t i = 0; i < rm.w.size(); ++i) {
        moved = std::max(moved, std::fabs(rm.w[i] - double(w0[offset + i])));
        err = std::max(err, std::fabs(double(m.params[offset + i]) - rm.w[i]));
      }
      worst = std::max(worst, err / moved);
      offset += rm.w.size();
    }
    INFO("worst error relative to the distance moved: ", worst);
    CHECK(worst <= 1e-5);
    // The momentum buffer is plain fp32 arithmetic on the grads: within a few ulps of the fp64 one.
    const std::vector<float> buf = state_of(opt, muon_part::matrices, 0, 0, m.params.size());
    offset = 0;
    for (const ref_matrix& rm : ref) {
      for (std::size_t i = 0; i < rm.buf.size(); ++i)
        CHECK(double(buf[offset + i]) == doctest::Approx(rm.buf[i]).epsilon(1e-5).scale(1.0));
      offset += rm.buf.size();
    }
  }
}

TEST_CASE("torch.optim.Muon fixture (torch 2.9 algorithm, fp32 Newton-Schulz) replays within 1e-5 of the distance") {
  std::ifstream in(std::string(MPOPT_FIXTURE_DIR) + "/muon/muon_torch.json");
  REQUIRE(in.good());
  const nlohmann::json fixture = nlohmann::json::parse(in);
  REQUIRE(fixture.at("cases").size() == 2);
  for (const auto& c : fixture.at("cases")) {
    CAPTURE(c.at("name").get<std::string>());
    const auto& h = c.at("hparams");
    mpopt::muon::args hp;
    hp.lr = h.at("lr").get<double>();
    hp.momentum = h.at("momentum").get<double>();
    hp.nesterov = h.at("nesterov").get<bool>();
    hp.weight_decay = h.at("weight_decay").get<double>();
    hp.ns_coefficients = {h.at("ns_coefficients")[0].get<double>(), h.at("ns_coefficients")[1].get<double>(),
                          h.at("ns_coefficients")[2].get<double>()};
    hp.ns_steps = h.at("ns_steps").get<int>();
    hp.eps = h.at("eps").get<double>();
    hp.adjust_lr = h.at("adjust_lr").get<std::string>() == "original" ? mpopt::muon_adjust_lr::original
                                                                      : mpopt::muon_adjust_lr::match_rms_adamw;
    std::vector<matrix_shape> shapes;
    for (const auto& s : c.at("shapes")) shapes.push_back({s[0].get<std::size_t>(), s[1].get<std::size_t>()});
    matrices<mpopt::fp32_policy> m(shapes, hp);
    auto flatten = [](const nlohmann::json& per_matrix) {
      std::vector<float> out;
      for (const auto& mat : per_matrix)
        for (const auto& v : mat) out.push_back(float(v.get<double>()));  // 9 digits: the float32 value exactly
      return out;
    };
    const std::vector<float> w0 = flatten(c.at("w0"));
    REQUIRE(w0.size() == m.params.size());
    std::copy(w0.begin(), w0.end(), m.params.begin());  // into the buffers the group points at
    mpopt::muon_optimizer<mpopt::fp32_policy> opt({m.group});
    const std::size_t steps = c.at("grads").size();
    double worst = 0;
    for (std::size_t t = 0; t < steps; ++t) {
      const std::vector<float> g = flatten(c.at("grads")[t]);
      std::copy(g.begin(), g.end(), m.grads.begin());
      REQUIRE(opt.step().applied);
      const std::vector<float> want = flatten(c.at("traj")[t]);
      double moved = 0, err = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        moved = std::max(moved, std::fabs(double(want[i]) - double(w0[i])));
        err = std::max(err, std::fabs(double(m.params[i]) - double(want[i])));
      }
      worst = std::max(worst, err / moved);
    }
    INFO("worst error relative to the distance moved: ", worst);
    CHECK(worst <= 1e-5);
  }
}

TEST_CASE("aux tensors: AdamW bit for bit as mpopt::optimizer<adamw>, with their own hyper-parameters") {
  using prec = mpopt::bf16_mixed_policy;
  mpopt::muon::args hp;
  hp.lr = 0.02;
  mpopt::adamw::args a, b;
  a.lr = 3e-3;
  a.weight_decay = 0.05;
  b.lr = 1e-2;
  b.beta1 = 0.8;
  b.amsgrad = true;
  matrices<prec> m({{12, 20}, {20, 12}}, hp);
  aux_tensors<prec> x({7, 4100, 1}, a, 11), y({33}, b, 12);
  aux_tensors<prec> x_ref = x, y_ref = y;  // their own buffers for the reference optimizer
  x_ref.group.params = x_ref.params.data();
  x_ref.group.grads = x_ref.grads.data();
  y_ref.group.params = y_ref.params.data();
  y_ref.group.grads = y_ref.grads.data();
  mpopt::muon_optimizer<prec> opt({m.group}, {x.group, y.group});
  mpopt::optimizer<mpopt::adamw, prec> ref({x_ref.group, y_ref.group});
  CHECK(opt.num_matrix_groups() == 1);
  CHECK(opt.num_aux_groups() == 2);
  CHECK(opt.aux_hparams(1).amsgrad);
  for (int step = 0; step < 4; ++step) {
    m.set_grads(step);
    x.set_grads(step, 1);
    y.set_grads(step, 2);
    x_ref.grads = x.grads;
    y_ref.grads = y.grads;
    REQUIRE(opt.step().applied);
    REQUIRE(ref.step().applied);
  }
  CHECK(same_bits(x.params, x_ref.params));
  CHECK(same_bits(y.params, y_ref.params));
  CHECK(same_bits(master_of(opt, muon_part::aux, 0, x.params.size()),
                  std::vector<float>(ref.master(0), ref.master(0) + x.params.size())));
  for (int j = 0; j < 3; ++j) {
    CAPTURE(j);
    CHECK(same_bits(state_of(opt, muon_part::aux, 1, j, y.params.size()),
                    std::vector<float>(ref.state(1, j), ref.state(1, j) + y.params.size())));
  }
  // The 16-bit params are the fp32 master rounded (Muon's matrices too).
  const std::vector<float> mm = master_of(opt, muon_part::matrices, 0, m.params.size());
  for (std::size_t i = 0; i < mm.size(); ++i) REQUIRE(m.params[i].bits == mpopt::bf16_t(mm[i]).bits);
}

TEST_CASE("bf16 params with an fp32 master, and bf16 GEMM operands, against fp64") {
  mpopt::muon::args hp;
  hp.lr = 0.02;
  const std::vector<matrix_shape> shapes = {{24, 40}, {40, 24}};
  constexpr int steps = 3;
  // fp32 master with bf16 params and grads: the grads are what bf16 holds; the master follows fp64 closely.
  matrices<mpopt::bf16_mixed_policy> m16(shapes, hp);
  std::vector<double> w(m16.params.size()), buf(w.size(), 0.0);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = double(float(m16.params[i]));
  const std::vector<double> w0 = w;
  mpopt::muon_optimizer<mpopt::bf16_mixed_policy> mixed({m16.group});
  // fp32 everything, bf16 GEMM operands.
  matrices<mpopt::fp32_policy> m32(shapes, hp);
  for (std::size_t i = 0; i < w.size(); ++i) m32.params[i] = float(w[i]);
  mpopt::muon_optimizer<mpopt::fp32_policy, mpopt::no_scaler, mpopt::muon_gemm<mpopt::bf16_t>> bf16_gemm({m32.group});
  std::vector<ref_matrix> ref;
  std::size_t offset = 0;
  for (const matrix_shape& s : shapes) {
    const std::size_t n = s.rows * s.cols;
    ref.push_back({s.rows, s.cols,
                   std::vector<double>(w.begin() + std::ptrdiff_t(offset), w.begin() + std::ptrdiff_t(offset + n)),
                   std::vector<double>(n, 0.0)});
    offset += n;
  }
  for (int step = 0; step < steps; ++step) {
    m16.set_grads(step);
    for (std::size_t i = 0; i < w.size(); ++i) m32.grads[i] = float(m16.grads[i]);  // the same (bf16) values
    REQUIRE(mixed.step().applied);
    REQUIRE(bf16_gemm.step().applied);
    offset = 0;
    for (ref_matrix& rm : ref) {
      std::vector<double> g(rm.w.size());
      for (std::size_t i = 0; i < g.size(); ++i) g[i] = double(m32.grads[offset + i]);
      rm.step(g, hp);
      offset += rm.w.size();
    }
  }
  const std::vector<float> master = master_of(mixed, muon_part::matrices, 0, w.size());
  double moved = 0, err_master = 0, err_bf16_gemm = 0;
  offset = 0;
  for (const ref_matrix& rm : ref) {
    for (std::size_t i = 0; i < rm.w.size(); ++i) {
      moved = std::max(moved, std::fabs(rm.w[i] - w0[offset + i]));
      err_master = std::max(err_master, std::fabs(double(master[offset + i]) - rm.w[i]));
      err_bf16_gemm = std::max(err_bf16_gemm, std::fabs(double(m32.params[offset + i]) - rm.w[i]));
      REQUIRE(m16.params[offset + i].bits == mpopt::bf16_t(master[offset + i]).bits);
    }
    offset += rm.w.size();
  }
  INFO("fp32 master: ", err_master / moved, ", bf16 GEMMs: ", err_bf16_gemm / moved);
  CHECK(err_master / moved <= 1e-5);
  CHECK(err_bf16_gemm / moved <= 0.05);
}

TEST_CASE("loss scaling: an overflow skips the step and leaves every buffer bit-identical") {
  using prec = mpopt::fp16_mixed_policy;
  using opt_t = mpopt::muon_optimizer<prec, mpopt::dynamic_scaler>;
  mpopt::muon::args hp;
  hp.lr = 0.02;
  matrices<prec> m({{10, 14}, {14, 10}}, hp);
  aux_tensors<prec> x({5, 9}, mpopt::adamw::args{}, 3);
  mpopt::dynamic_scale_args s;
  s.init_scale = 256;
  opt_t opt({m.group}, {x.group}, s);
  m.set_grads(0, 256);
  x.set_grads(0, 3, 256);
  REQUIRE(opt.step().applied);
  const auto params = m.params;
  const auto aux_params = x.params;
  const auto master = master_of(opt, muon_part::matrices, 0, m.params.size());
  const auto buf = state_of(opt, muon_part::matrices, 0, 0, m.params.size());
  const auto aux_master = master_of(opt, muon_part::aux, 0, x.params.size());
  const auto aux_m = state_of(opt, muon_part::aux, 0, 0, x.params.size());
  const auto aux_v = state_of(opt, muon_part::aux, 0, 1, x.params.size());
  const double scale = opt.loss_scale();
  int overflow = 0;
  for (float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
    for (bool in_aux : {false, true}) {
      m.set_grads(1, 256);
      x.set_grads(1, 3, 256);
      if (in_aux) {
        x.grads[7] = mpopt::half_t(bad);
      } else {
        m.grads[150] = mpopt::half_t(bad);
      }
      const mpopt::step_result r = opt.step();
      ++overflow;
      CHECK_FALSE(r.applied);
      CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
      CHECK(r.step == 1);
      CHECK(opt.step_count() == 1);
      CHECK(same_bits(params, m.params));
      CHECK(same_bits(aux_params, x.params));
      CHECK(same_bits(master, master_of(opt, muon_part::matrices, 0, m.params.size())));
      CHECK(same_bits(buf, state_of(opt, muon_part::matrices, 0, 0, m.params.size())));
      CHECK(same_bits(aux_master, master_of(opt, muon_part::aux, 0, x.params.size())));
      CHECK(same_bits(aux_m, state_of(opt, muon_part::aux, 0, 0, x.params.size())));
      CHECK(same_bits(aux_v, state_of(opt, muon_part::aux, 0, 1, x.params.size())));
    }
  }
  // Hysteresis 2 absorbs the first overflow, then the scale halves on each.
  CHECK(opt.loss_scale() == scale / 8);
  (void)overflow;
}

TEST_CASE("a power-of-two loss scale gives the unscaled run's bits (the factor is applied before the momentum)") {
  mpopt::muon::args hp;
  hp.lr = 0.02;
  matrices<mpopt::fp32_policy> plain({{12, 18}, {18, 12}}, hp), scaled = plain;
  scaled.group.params = scaled.params.data();
  scaled.group.grads = scaled.grads.data();
  mpopt::muon_optimizer<mpopt::fp32_policy> a({plain.group});
  mpopt::static_scaler::args s;
  s.scale = 1024;
  mpopt::muon_optimizer<mpopt::fp32_policy, mpopt::static_scaler> b({scaled.group}, {}, s);
  for (int step = 0; step < 3; ++step) {
    plain.set_grads(step);
    scaled.set_grads(step, 1024);  // the backward of the scaled loss (exact: a power of two)
    const mpopt::step_result ra = a.step(), rb = b.step();
    REQUIRE(ra.applied);
    REQUIRE(rb.applied);
    CHECK(rb.loss_scale == 1024);
    CHECK(rb.grad_norm == ra.grad_norm);
  }
  CHECK(same_bits(plain.params, scaled.params));
}

TEST_CASE("clipping: the global norm covers matrices and aux tensors; a clipped step is the step on clipped grads") {
  mpopt::muon::args hp;
  hp.lr = 0.02;
  hp.nesterov = false;
  matrices<mpopt::fp32_policy> clipped({{8, 12}, {12, 8}}, hp), manual = clipped;
  manual.group.params = manual.params.data();
  manual.group.grads = manual.grads.data();
  aux_tensors<mpopt::fp32_policy> x({5}, mpopt::adamw::args{}, 4), x_manual = x;
  x_manual.group.params = x_manual.params.data();
  x_manual.group.grads = x_manual.grads.data();
  mpopt::step_options o;
  o.max_grad_norm = 0.5;
  mpopt::muon_optimizer<mpopt::fp32_policy> a({clipped.group}, {x.group}, {}, o);
  mpopt::muon_optimizer<mpopt::fp32_policy> b({manual.group}, {x_manual.group});
  for (int step = 0; step < 3; ++step) {
    clipped.set_grads(step);
    x.set_grads(step, 4);
    double sq = 0;
    for (float g : clipped.grads) sq += double(g) * double(g);
    for (float g : x.grads) sq += double(g) * double(g);
    const mpopt::step_result r = a.step();
    REQUIRE(r.applied);
    CHECK(r.grad_norm == doctest::Approx(std::sqrt(sq)).epsilon(1e-12));
    CHECK(r.clip_coef == doctest::Approx(0.5 / (std::sqrt(sq) + 1e-6)).epsilon(1e-6));
    REQUIRE(r.clip_coef < 1.0);
    // Without a loss scale, the factor the grads are multiplied by is the clip coefficient itself (one float).
    const float coef = float(r.clip_coef);
    for (std::size_t i = 0; i < manual.grads.size(); ++i) manual.grads[i] = clipped.grads[i] * coef;
    for (std::size_t i = 0; i < x_manual.grads.size(); ++i) x_manual.grads[i] = x.grads[i] * coef;
    REQUIRE(b.step().applied);
  }
  CHECK(same_bits(clipped.params, manual.params));
  CHECK(same_bits(x.params, x_manual.params));
}

TEST_CASE("bad hyper-parameters, shapes and buffers are rejected with messages naming them; nothing changes") {
  using opt_t = mpopt::muon_optimizer<mpopt::fp32_policy>;
  matrices<mpopt::fp32_policy> m({{4, 6}}, mpopt::muon::args{});
  auto with = [&](auto change) {
    mpopt::muon_group<mpopt::fp32_policy> g = m.group;
    change(g.hparams);
    return g;
  };
  CHECK_THROWS_WITH_AS(opt_t({with([](mpopt::muon::args& a) { a.lr = -1; })}),
                       "matrix group 0: muon.lr must be finite and >= 0, got -1", mpopt::error);
  CHECK_THROWS_WITH_AS(opt_t({m.group, with([](mpopt::muon::args& a) { a.momentum = 1; })}),
                       "matrix group 1: muon.momentum must be in [0, 1), got 1", mpopt::error);
  CHECK_THROWS_WITH_AS(opt_t({with([](mpopt::muon::args& a) { a.weight_decay = -0.5; })}),
                       "matrix group 0: muon.weight_decay must be finite and >= 0, got -0.5", mpopt::error);
  CHECK_THROWS_WITH_AS(opt_t({with([](mpopt::muon::args& a) { a.eps = 0; })}),
                       "matrix group 0: muon.eps must be finite and > 0, got 0", mpopt::error);
  CHECK_THROWS_WITH_AS(opt_t({with([](mpopt::muon::args& a) { a.ns_steps = 100; })}),
                       "matrix group 0: muon.ns_steps must be in [0, 100), got 100", mpopt::error);
  CHECK_THROWS_WITH_AS(
      opt_t({with([](mpopt::muon::args& a) { a.ns_coefficients.b = std::numeric_limits<double>::infinity(); })}),
      "matrix group 0: muon.ns_coefficients.b must be finite, got inf", mpopt::error);
  CHECK_THROWS_WITH_AS(opt_t({with([](mpopt::muon::args& a) { a.adjust_lr = mpopt::muon_adjust_lr(7); })}),
                       "matrix group 0: muon.adjust_lr must be original or match_rms_adamw, got 7", mpopt::error);

  auto bad = m.group;
  bad.shapes = {{4, 3}, {0, 4}};
  CHECK_THROWS_WITH_AS(opt_t({bad}), "matrix group 0: matrix 1 has shape 0 x 4; Muon needs rows and cols >= 1",
                       mpopt::error);
  bad = m.group;
  bad.grads = nullptr;
  CHECK_THROWS_WITH_AS(opt_t({bad}), "matrix group 0: grads is null but the matrices hold 24 elements", mpopt::error);
  bad = m.group;
  bad.params = nullptr;
  CHECK_THROWS_WITH_AS(opt_t({bad}), "matrix group 0: params is null but the matrices hold 24 elements", mpopt::error);

  aux_tensors<mpopt::fp32_policy> x({3, 4}, mpopt::adamw::args{}, 1);
  auto aux_bad = x.group;
  aux_bad.hparams.beta1 = 1.0;
  CHECK_THROWS_WITH_AS(opt_t({m.group}, {x.group, aux_bad}), "aux group 1: adam.beta1 must be in [0, 1), got 1",
                       mpopt::error);
  aux_bad = x.group;
  aux_bad.tensor_sizes = {3, 5};
  CHECK_THROWS_WITH_AS(opt_t({m.group}, {aux_bad}), "aux group 0: tensor_sizes add up to 8 but size is 7",
                       mpopt::error);

  // Stage 3 is refused by name, on any communicator.
  mpopt::comm::single_rank one;
  mpopt::zero_options z;
  z.stage = 3;
  CHECK_THROWS_WITH_AS(opt_t({m.group}, {}, one, z),
                       "muon_optimizer: ZeRO stage 3 is not supported (Newton-Schulz needs whole matrices and stage 3 "
                       "shards params); use zero_options.stage 0, 1 or 2",
                       mpopt::error);

  // Setters validate first.
  opt_t opt({m.group}, {x.group});
  mpopt::muon::args hp = opt.matrix_hparams(0);
  hp.ns_steps = -1;
  CHECK_THROWS_WITH_AS(opt.set_matrix_hparams(0, hp), "matrix group 0: muon.ns_steps must be in [0, 100), got -1",
                       mpopt::error);
  CHECK(opt.matrix_hparams(0).ns_steps == 5);
  hp.ns_steps = 3;
  opt.set_matrix_hparams(0, hp);
  CHECK(opt.matrix_hparams(0).ns_steps == 3);
  mpopt::adamw::args ah = opt.aux_hparams(0);
  ah.amsgrad = true;
  CHECK_THROWS_AS(opt.set_aux_hparams(0, ah), mpopt::error);
  CHECK_THROWS_WITH_AS(opt.set_matrix_hparams(1, hp), "matrix group index 1 out of range (1 groups)", mpopt::error);
  std::vector<float> out(7);
  CHECK_THROWS_WITH_AS(opt.gather_state(muon_part::aux, 0, 2, out.data()),
                       "gather_state: state index 2 out of range for aux group 0 (2 states)", mpopt::error);
  CHECK_THROWS_WITH_AS(opt.reduce_grads(muon_part::matrices, 0, 0, 1, m.grads.data()),
                       "reduce_grads: ZeRO stage 0 reduces the groups' grads in step(); reduce_grads is for stage 2",
                       mpopt::error);
}

TEST_CASE("defaults are torch.optim.Muon's, and the adjusted lr is torch's") {
  const mpopt::muon::args a;
  CHECK(a.lr == 1e-3);
  CHECK(a.momentum == 0.95);
  CHECK(a.nesterov);
  CHECK(a.weight_decay == 0.1);
  CHECK(a.ns_coefficients.a == 3.4445);
  CHECK(a.ns_coefficients.b == -4.7750);
  CHECK(a.ns_coefficients.c == 2.0315);
  CHECK(a.ns_steps == 5);
  CHECK(a.eps == 1e-7);
  CHECK(a.adjust_lr == mpopt::muon_adjust_lr::original);
  CHECK(mpopt::muon::adjusted_lr(a, 4096, 1024) == 1e-3 * 2.0);
  CHECK(mpopt::muon::adjusted_lr(a, 1024, 4096) == 1e-3);
  mpopt::muon::args m = a;
  m.adjust_lr = mpopt::muon_adjust_lr::match_rms_adamw;
  CHECK(mpopt::muon::adjusted_lr(m, 1024, 4096) == 1e-3 * (0.2 * 64.0));
  // torch's lerp: exact at both ends.
  CHECK(mpopt::muon::lerp(3.0f, 5.0f, 0.0f) == 3.0f);
  CHECK(mpopt::muon::lerp(3.0f, 5.0f, 1.0f) == 5.0f);
}
