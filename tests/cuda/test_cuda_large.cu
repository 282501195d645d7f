// 64-bit indexing: one flat group of 2^31 + 1 elements (fp32 params, bf16 grads, SGD with momentum: 10 bytes per
// element, about 21.5 GB). The values are chosen so that every operation is exact, so the whole buffer is checked
// bit for bit on the device, and the gradient norm equals a closed form. Skipped when the device lacks the memory.
#include <cmath>
#include <cstdint>
#include <vector>

#include "test_cuda_support.cuh"

using namespace mpopt_test;

namespace {

using prec = mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<bf16_t>, mpopt::state<float>>;

// Period-8 gradients: powers of two, so squares and sums are exact.
__device__ __host__ inline float grad_value(std::uint64_t i) {
  const float period[8] = {0.5f, -0.25f, 0.125f, 1.f, -0.5f, 0.25f, 2.f, -1.f};
  return period[i % 8];
}
__device__ __host__ inline float param_value(std::uint64_t i) {
  return float(i % 1000) * 0.5f;
}

__global__ void fill(float* p, bf16_t* g, std::uint64_t n) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    p[i] = param_value(i);
    g[i] = bf16_t(grad_value(i));
  }
}

// First SGD step with momentum, no decay: buf = g, w = w - lr * g; exact for these values.
__global__ void count_mismatches(const float* p, const float* buf, std::uint64_t n, float lr, unsigned long long* bad) {
  unsigned long long local = 0;
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    const float g = grad_value(i);
    local += (p[i] != param_value(i) - lr * g) + (buf[i] != g);
  }
  if (local != 0) atomicAdd(bad, local);
}

}  // namespace

TEST_CASE("a group of 2^31 + 1 elements: every element updated once, the norm exact") {
  const std::uint64_t n = (std::uint64_t(1) << 31) + 1;
  const std::size_t need = std::size_t(n) * (sizeof(float) + sizeof(bf16_t) + sizeof(float));
  std::size_t free_bytes = 0, total_bytes = 0;
  MPOPT_CUDA_REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < need + (std::size_t(1) << 30)) {
    MESSAGE("skipped: needs ", need >> 20, " MiB plus 1 GiB of headroom, the device has ", free_bytes >> 20,
            " MiB free");
    return;
  }
  device_buffer<float> params(n, "params");
  device_buffer<bf16_t> grads(n, "grads");
  fill<<<4096, 256>>>(params.get(), grads.get(), n);
  MPOPT_CUDA_REQUIRE(cudaGetLastError());

  mpopt::param_group<mpopt::sgd, prec> g;
  g.params = params.get();
  g.grads = grads.get();
  g.size = n;
  g.hparams.lr = 0.0625;
  g.hparams.momentum = 0.9;
  mpopt::cuda::optimizer<mpopt::sgd, prec> opt({g});
  opt.step(nullptr);
  REQUIRE(opt.last_error().ok());
  const mpopt::step_result r = opt.result(nullptr);
  REQUIRE(r.error.ok());
  CHECK(r.applied);

  // 2^28 whole periods plus element 2^31 (period index 0).
  const double period_sum = 0.25 + 0.0625 + 0.015625 + 1 + 0.25 + 0.0625 + 4 + 1;
  const double sum = double(std::uint64_t(1) << 28) * period_sum + 0.25;
  CHECK(r.grad_norm == std::sqrt(sum));

  device_buffer<unsigned long long> bad(1, "mismatch counter");
  MPOPT_CUDA_REQUIRE(cudaMemset(bad.get(), 0, sizeof(unsigned long long)));
  count_mismatches<<<4096, 256>>>(params.get(), opt.state(0, 0), n, 0.0625f, bad.get());
  MPOPT_CUDA_REQUIRE(cudaGetLastError());
  CHECK(to_host(bad.get(), 1)[0] == 0);

  // The elements around 2^31 and the last one, read back.
  const std::uint64_t first = (std::uint64_t(1) << 31) - 4;
  const std::vector<float> tail = to_host(params.get() + first, std::size_t(n - first));
  for (std::uint64_t i = first; i < n; ++i) {
    INFO("element ", i);
    CHECK(tail[std::size_t(i - first)] == param_value(i) - 0.0625f * grad_value(i));
  }
}
