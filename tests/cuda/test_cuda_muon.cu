// mpopt::cuda::muon_optimizer (cuBLAS Newton–Schulz, batched over equal shapes) against the host muon_optimizer.
//
// Bounds, relative to how far the weights moved (max |w_host - w0| over the group):
//   fp32 GEMMs:          max |w_gpu - w_host| <= 2e-5    both are within 1e-5 of fp64 (tests/host/test_muon.cpp);
//                                                        cuBLAS sums in another order (and fuses multiply-adds)
//   bf16 GEMM operands:  max |w_gpu - w_host| <= 0.05    each side rounds every GEMM result to bf16, and a different
//                                                        fp32 sum flips roundings: the bf16-vs-fp64 bound
//   aux AdamW:           max |w_gpu - w_host| <= 1e-5 of |w| + 1e-6 (fused multiply-adds on the device)
// A skipped step is compared device against device, bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gpu_test.cuh"
#include "mpopt/cuda/muon.cuh"
#include "mpopt/muon.hpp"

namespace {

using mpopt::matrix_shape;
using mpopt::muon_part;

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
struct device_vec {
  mpopt::cuda::device_buffer<T> buf;
  explicit device_vec(const std::vector<T>& v) : buf(v.size(), "test buffer") { upload(v); }
  void upload(const std::vector<T>& v) {
    if (!v.empty()) MPOPT_CUDA_REQUIRE(cudaMemcpy(buf.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> v(buf.size());
    if (!v.empty()) MPOPT_CUDA_REQUIRE(cudaMemcpy(v.data(), buf.get(), v.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

template <class T>
std::vector<T> download(const T* p, std::size_t n) {
  std::vector<T> v(n);
  if (n > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Equal shapes batch together: three wide 48 x 80, two tall 80 x 48 (the transposed path), a square one with other NS
// steps (an even count: the result lands in the other iterate buffer), and an odd-sized one (unaligned offsets).
const std::vector<matrix_shape> group0 = {{48, 80}, {80, 48}, {48, 80}, {33, 7}, {80, 48}, {48, 80}};
const std::vector<matrix_shape> group1 = {{64, 64}};

template <class Prec, class Gemm>
void against_host(double bound, const char* what) {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  CAPTURE(what);
  mpopt::muon::args a;
  a.lr = 0.02;
  mpopt::muon::args b = a;
  b.ns_steps = 4;
  b.nesterov = false;
  b.adjust_lr = mpopt::muon_adjust_lr::match_rms_adamw;
  mpopt::adamw::args x;
  x.lr = 1e-2;

  mpopt::muon_group<Prec> g0, g1;
  g0.shapes = group0;
  g0.hparams = a;
  g1.shapes = group1;
  g1.hparams = b;
  const std::size_t n0 = g0.size(), n1 = g1.size(), nx = 1000;
  std::vector<param_t> p0(n0), p1(n1), px(nx);
  std::vector<grad_t> q0(n0), q1(n1), qx(nx);
  for (std::size_t i = 0; i < n0; ++i) p0[i] = mpopt::convert<param_t>(0.1 * noise(0, i, 1));
  for (std::size_t i = 0; i < n1; ++i) p1[i] = mpopt::convert<param_t>(0.1 * noise(1, i, 1));
  for (std::size_t i = 0; i < nx; ++i) px[i] = mpopt::convert<param_t>(noise(2, i, 1));
  const std::vector<param_t> w0 = p0, w1 = p1, wx = px;
  device_vec<param_t> dp0(p0), dp1(p1), dpx(px);
  device_vec<grad_t> dq0(q0), dq1(q1), dqx(qx);

  mpopt::param_group<mpopt::adamw, Prec> aux;
  aux.size = nx;
  aux.tensor_sizes = {7, 993};
  aux.hparams = x;
  // Host optimizer on host buffers.
  g0.params = p0.data();
  g0.grads = q0.data();
  g1.params = p1.data();
  g1.grads = q1.data();
  aux.params = px.data();
  aux.grads = qx.data();
  mpopt::muon_optimizer<Prec, mpopt::no_scaler, Gemm> host({g0, g1}, {aux});
  // Device optimizer on device buffers.
  g0.params = dp0.buf.get();
  g0.grads = dq0.buf.get();
  g1.params = dp1.buf.get();
  g1.grads = dq1.buf.get();
  aux.params = dpx.buf.get();
  aux.grads = dqx.buf.get();
  mpopt::cuda::muon_optimizer<Prec, mpopt::no_scaler, Gemm> device({g0, g1}, {aux});
  CHECK(device.ns_multiply_adds_per_step() == doctest::Approx(host.ns_multiply_adds_per_step()));

  for (int step = 0; step < 3; ++step) {
    for (std::size_t i = 0; i < n0; ++i) q0[i] = mpopt::convert<grad_t>(noise(10 + step, i, 0) + 0.3 * double(i % 7));
    for (std::size_t i = 0; i < n1; ++i) q1[i] = mpopt::convert<grad_t>(noise(20 + step, i, 0));
    for (std::size_t i = 0; i < nx; ++i) qx[i] = mpopt::convert<grad_t>(0.1 * noise(30 + step, i, 0));
    dq0.upload(q0);
    dq1.upload(q1);
    dqx.upload(qx);
    const mpopt::step_result want = host.step();
    device.step(nullptr);
    const mpopt::step_result got = device.result(nullptr);
    REQUIRE(got.error.ok());
    REQUIRE(got.applied == want.applied);
    CHECK(got.grad_norm == doctest::Approx(want.grad_norm).epsilon(1e-9));
  }
  // The masters (fp32 in every policy here): a 16-bit param copy would add its own rounding flips.
  using master_t = typename Prec::master_t;
  auto worst = [&](std::size_t g, const std::vector<param_t>& start) {
    std::vector<master_t> want(start.size());
    host.gather_master(muon_part::matrices, g, want.data());
    const std::vector<master_t> got = download(device.master(muon_part::matrices, g), start.size());
    double moved = 0, err = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      const double w = double(want[i]);
      moved = std::max(moved, std::fabs(w - double(mpopt::convert<float>(start[i]))));
      err = std::max(err, std::fabs(double(got[i]) - w));
    }
    return err / moved;
  };
  const double e0 = worst(0, w0), e1 = worst(1, w1);
  INFO("group 0: ", e0, ", group 1: ", e1);
  CHECK(e0 <= bound);
  CHECK(e1 <= bound);
  const std::vector<param_t> gx = dpx.download();
  for (std::size_t i = 0; i < nx; ++i) {
    const double w = double(mpopt::convert<float>(px[i]));
    REQUIRE(std::fabs(double(mpopt::convert<float>(gx[i])) - w) <=
            1e-5 * std::fabs(w) + 1e-6 + (mpopt::is_16bit_v<param_t> ? std::ldexp(std::fabs(w), -7) : 0.0));
  }
}

}  // namespace

TEST_CASE("cuda muon, fp32 GEMMs: the host trajectory within 2e-5 of the distance moved") {
  against_host<mpopt::fp32_policy, mpopt::muon_gemm<float>>(2e-5, "fp32");
  against_host<mpopt::bf16_mixed_policy, mpopt::muon_gemm<float>>(2e-5, "bf16 params, fp32 master");
}

TEST_CASE("cuda muon, bf16 GEMM operands (tensor cores): the host's bf16 trajectory within 0.05 of the distance") {
  against_host<mpopt::fp32_policy, mpopt::muon_gemm<mpopt::bf16_t>>(0.05, "bf16 GEMMs");
}

TEST_CASE("cuda muon: an overflow skips the step on the device and changes nothing") {
  using prec = mpopt::fp16_mixed_policy;
  mpopt::muon_group<prec> g;
  g.shapes = {{32, 48}, {32, 48}, {48, 32}};
  const std::size_t n = g.size();
  std::vector<mpopt::half_t> p(n), q(n);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = mpopt::half_t(float(0.1 * noise(5, i, 0)));
    q[i] = mpopt::half_t(float(256 * noise(6, i, 0)));
  }
  device_vec<mpopt::half_t> dp(p), dq(q);
  g.params = dp.buf.get();
  g.grads = dq.buf.get();
  mpopt::dynamic_scale_args s;
  s.init_scale = 256;
  mpopt::cuda::muon_optimizer<prec, mpopt::dynamic_scaler, mpopt::muon_gemm<mpopt::bf16_t>> opt({g}, {}, s);
  opt.step(nullptr);
  REQUIRE(opt.result(nullptr).applied);
  const auto params = dp.download();
  const auto master = download(opt.master(muon_part::matrices, 0), n);
  const auto buf = download(opt.state(muon_part::matrices, 0, 0), n);
  q[77] = mpopt::half_t(std::numeric_limits<float>::infinity());
  dq.upload(q);
  opt.step(nullptr);
  const mpopt::step_result r = opt.result(nullptr);
  REQUIRE(r.error.ok());
  CHECK_FALSE(r.applied);
  CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
  CHECK(r.step == 1);
  CHECK(same_bits(params, dp.download()));
  CHECK(same_bits(master, download(opt.master(muon_part::matrices, 0), n)));
  CHECK(same_bits(buf, download(opt.state(muon_part::matrices, 0, 0), n)));
}

TEST_CASE("cuda muon: bad input is rejected with the host's messages") {
  using opt_t = mpopt::cuda::muon_optimizer<mpopt::fp32_policy>;
  mpopt::muon_group<mpopt::fp32_policy> g;
  g.shapes = {{4, 0}};
  CHECK_THROWS_WITH_AS(opt_t({g}), "matrix group 0: matrix 0 has shape 4 x 0; Muon needs rows and cols >= 1",
                       mpopt::error);
  device_vec<float> d(std::vector<float>(16, 0.0f));
  g.shapes = {{4, 4}};
  g.params = d.buf.get();
  g.grads = d.buf.get();
  opt_t opt({g});
  mpopt::muon::args a = opt.matrix_hparams(0);
  a.ns_steps = 3;
  CHECK_THROWS_AS(opt.set_matrix_hparams(0, a, nullptr), mpopt::error);
  a = opt.matrix_hparams(0);
  a.lr = 0.5;
  opt.set_matrix_hparams(0, a, nullptr);
  CHECK(opt.matrix_hparams(0).lr == 0.5);
}
