// Host Muon: the step of mpopt::muon_optimizer, the Newton–Schulz orthogonalisation alone, and one host::gemm, with
// the GEMM work reported as GFLOP/s (counter gemm_gflops: 2 · multiply-adds of the NS GEMMs / time). Shapes are small
// enough to run in seconds on the 2-core CI machine; bench/muon_step.cu has the transformer-sized GPU figures.
//
//   step/<gemm>/<rows>x<cols>x<count>   whole step (momentum, NS, update) of `count` equal matrices, fp32 policy
//   ns/<gemm>/<rows>x<cols>             host::newton_schulz alone (5 iterations, three GEMMs each)
//   gemm/<gemm>/<m>x<n>x<k>             one host::gemm, the kernel's ceiling
#include <benchmark/benchmark.h>

#include <string>
#include <type_traits>
#include <vector>

#include "mpopt/host/gemm.hpp"
#include "mpopt/host/newton_schulz.hpp"
#include "mpopt/muon.hpp"

namespace {

template <class T>
const char* gemm_name() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}

template <class T>
void bm_step(benchmark::State& state, std::size_t rows, std::size_t cols, std::size_t count) {
  using prec = mpopt::fp32_policy;
  mpopt::muon_group<prec> g;
  g.shapes.assign(count, mpopt::matrix_shape{rows, cols});
  const std::size_t n = g.size();
  std::vector<float> params(n), grads(n);
  for (std::size_t i = 0; i < n; ++i) {
    params[i] = 0.01f * float(int(i % 97) - 48);
    grads[i] = 1e-3f * float(int(i % 13) - 6) + 1e-4f * float(i % 1021);
  }
  g.params = params.data();
  g.grads = grads.data();
  mpopt::muon_optimizer<prec, mpopt::no_scaler, mpopt::muon_gemm<T>> opt({g});
  opt.step();  // warms the thread pool
  for (auto _ : state) benchmark::DoNotOptimize(opt.step().applied);
  state.counters["gemm_gflops"] =
      benchmark::Counter(2.0 * opt.ns_multiply_adds_per_step() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void bm_ns(benchmark::State& state, std::size_t rows, std::size_t cols) {
  std::vector<float> u(rows * cols);
  for (std::size_t i = 0; i < u.size(); ++i) u[i] = 1e-3f * float(int(i % 13) - 6) + 1e-4f * float(i % 1021);
  const std::vector<mpopt::matrix_shape> shape = {{rows, cols}};
  auto ws = mpopt::host::newton_schulz_workspace<T>::for_shapes(shape.begin(), shape.end());
  const mpopt::muon::args hp;
  for (auto _ : state) {
    const auto r = mpopt::host::newton_schulz<T>(u.data(), rows, cols, hp.ns_coefficients, hp.ns_steps, hp.eps, ws);
    benchmark::DoNotOptimize(r.x);
  }
  state.counters["gemm_gflops"] =
      benchmark::Counter(2.0 * hp.ns_steps * mpopt::host::ns_multiply_adds(rows, cols) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void bm_gemm(benchmark::State& state, std::size_t m, std::size_t n, std::size_t k) {
  std::vector<T> a(m * k), b(k * n), c(m * n);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = T(0.01f * float(int(i % 97) - 48));
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = T(0.01f * float(int(i % 89) - 44));
  for (auto _ : state) {
    mpopt::host::gemm<T>(m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, nullptr, 0, c.data(), n);
    benchmark::ClobberMemory();
  }
  state.counters["gemm_gflops"] =
      benchmark::Counter(2.0 * double(m) * double(n) * double(k) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void register_all() {
  const std::string g = gemm_name<T>();
  struct shape {
    std::size_t rows, cols, count;
  };
  for (const shape s : {shape{512, 512, 4}, shape{1024, 4096, 1}, shape{4096, 1024, 1}}) {
    const std::string dims = std::to_string(s.rows) + "x" + std::to_string(s.cols);
    benchmark::RegisterBenchmark(("step/" + g + "/" + dims + "x" + std::to_string(s.count)).c_str(),
                                 [s](benchmark::State& st) { bm_step<T>(st, s.rows, s.cols, s.count); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(("ns/" + g + "/" + dims).c_str(),
                                 [s](benchmark::State& st) { bm_ns<T>(st, s.rows, s.cols); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark(("gemm/" + g + "/1024x1024x1024").c_str(),
                               [](benchmark::State& st) { bm_gemm<T>(st, 1024, 1024, 1024); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_all<float>();
  register_all<mpopt::bf16_t>();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
