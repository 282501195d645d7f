// CUDA Muon step (mpopt::cuda::muon_optimizer) on transformer-shaped matrices, timed with CUDA events (manual time).
// The counter tflops is the Newton–Schulz GEMM work (2 · multiply-adds of ns_steps x three GEMMs per matrix) over the
// whole step's time: a lower bound of the GEMMs' own rate, since the step also runs the momentum, norm, normalise and
// update kernels. gemm/ rows are one cublasGemmStridedBatchedEx of the largest NS GEMM shape, the ceiling.
//
//   step/<gemm>/<rows>x<cols>x<count>   bf16 params and grads, fp32 master and momentum; gemm: fp32 or bf16 operands
//   gemm/<gemm>/<m>x<n>x<k>x<count>     C = A·B, CUBLAS_COMPUTE_32F
//
// bench/compare_torch_muon.py runs torch.optim.Muon on the same shapes and prints the ratios.
#include <benchmark/benchmark.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_bench.cuh"
#include "mpopt/cuda/muon.cuh"
#include "mpopt/muon.hpp"

namespace {

using mpopt_bench::check;
using mpopt_bench::init_buffers;
using mpopt_bench::time_loop;

template <class T>
void bm_step(benchmark::State& state, std::size_t rows, std::size_t cols, std::size_t count) {
  using prec = mpopt::bf16_mixed_policy;
  mpopt::muon_group<prec> g;
  g.shapes.assign(count, mpopt::matrix_shape{rows, cols});
  const std::size_t n = g.size();
  try {
    mpopt::cuda::device_buffer<mpopt::bf16_t> params(n, "params"), grads(n, "grads");
    init_buffers<<<1024, 256>>>(params.get(), grads.get(), n, 1e-4f);
    if (!check(state, cudaDeviceSynchronize(), "init")) return;
    g.params = params.get();
    g.grads = grads.get();
    cudaStream_t stream;
    if (!check(state, cudaStreamCreate(&stream), "cudaStreamCreate")) return;
    {
      mpopt::cuda::muon_optimizer<prec, mpopt::no_scaler, mpopt::muon_gemm<T>> opt({g}, {}, {}, {}, stream);
      time_loop(state, stream, [&] { opt.step(stream); });
      const mpopt::step_result r = opt.result(stream);
      if (!r.error.ok()) state.SkipWithError(r.error.message.c_str());
      state.counters["tflops"] = benchmark::Counter(2.0 * opt.ns_multiply_adds_per_step() * 1e-12,
                                                    benchmark::Counter::kIsIterationInvariantRate);
      state.counters["workspace_GiB"] = double(opt.workspace_bytes()) / double(1ull << 30);
    }
    cudaStreamDestroy(stream);
  } catch (const mpopt::error& e) {
    state.SkipWithError(e.what());
  }
}

template <class T>
void bm_gemm(benchmark::State& state, std::size_t m, std::size_t n, std::size_t k, std::size_t count) {
  try {
    mpopt::cuda::device_buffer<T> a(count * m * k, "A"), b(count * k * n, "B"), c(count * m * n, "C");
    // Nonzero operands (the second store, the grads' formula, wins): tensor cores run faster on zeros.
    init_buffers<<<1024, 256>>>(a.get(), a.get(), a.size(), 1e-4f);
    init_buffers<<<1024, 256>>>(b.get(), b.get(), b.size(), 1e-4f);
    if (!check(state, cudaDeviceSynchronize(), "init_buffers")) return;
    const mpopt::cuda::cublas_handle blas = mpopt::cuda::make_cublas_handle();
    const float one = 1.0f, zero = 0.0f;
    constexpr cudaDataType_t type = mpopt::cuda::cublas_type_v<T>;
    cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
    time_loop(state, nullptr, [&] {
      status = cublasGemmStridedBatchedEx(blas.get(), CUBLAS_OP_N, CUBLAS_OP_N, int(m), int(n), int(k), &one, a.get(),
                                          type, int(m), (long long)(m * k), b.get(), type, int(k), (long long)(k * n),
                                          &zero, c.get(), type, int(m), (long long)(m * n), int(count),
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    });
    if (status != CUBLAS_STATUS_SUCCESS) state.SkipWithError(cublasGetStatusString(status));
    state.counters["tflops"] = benchmark::Counter(2.0 * double(m) * double(n) * double(k) * double(count) * 1e-12,
                                                  benchmark::Counter::kIsIterationInvariantRate);
  } catch (const mpopt::error& e) {
    state.SkipWithError(e.what());
  }
}

template <class T>
void register_gemm(const char* name) {
  struct shape {
    std::size_t rows, cols, count;
  };
  for (const shape s : {shape{4096, 4096, 4}, shape{4096, 11008, 1}, shape{11008, 4096, 1}, shape{4096, 11008, 4}}) {
    const std::string dims = std::to_string(s.rows) + "x" + std::to_string(s.cols) + "x" + std::to_string(s.count);
    benchmark::RegisterBenchmark((std::string("step/") + name + "/" + dims).c_str(),
                                 [s](benchmark::State& st) { bm_step<T>(st, s.rows, s.cols, s.count); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  // The X·Xᵀ and B·X GEMMs of 4096 x 11008: n x n x m.
  benchmark::RegisterBenchmark((std::string("gemm/") + name + "/4096x4096x11008x1").c_str(),
                               [](benchmark::State& st) { bm_gemm<T>(st, 4096, 4096, 11008, 1); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  register_gemm<mpopt::bf16_t>("bf16");
  register_gemm<float>("fp32");
  return mpopt_bench::run_registered(argc, argv);
}
