// mpopt::comm::nccl at world size 1 on one GPU: every collective must leave the data as it was (or copy it, for a
// reduce-scatter into another buffer), count its call with zero bus traffic, and reject malformed arguments.
// The multi-rank behaviour needs several GPUs and is not exercised here.
#include <nccl.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "gpu_test.cuh"
#include "mpopt/comm/nccl.cuh"
#include "mpopt/numeric/convert.hpp"
#include "nccl_support.cuh"

namespace {

using mpopt::comm::reduce_op;

template <class T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_buffer(const std::vector<T>& host) : n(host.size()) {
    MPOPT_CUDA_REQUIRE(cudaMalloc(&ptr, n * sizeof(T)));
    MPOPT_CUDA_REQUIRE(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~device_buffer() { cudaFree(ptr); }
  std::vector<T> read(cudaStream_t s) const {
    std::vector<T> out(n);
    MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(s));
    MPOPT_CUDA_REQUIRE(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

std::vector<float> ramp(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = 0.25f * float(i) - 3.0f;
  return v;
}

std::vector<mpopt::bf16_t> to_bf16(const std::vector<float>& v) {
  std::vector<mpopt::bf16_t> out;
  for (float x : v) out.push_back(mpopt::convert<mpopt::bf16_t>(x));
  return out;
}

std::vector<unsigned> bits(const std::vector<mpopt::bf16_t>& v) {
  std::vector<unsigned> out;
  for (auto x : v) out.push_back(x.bits);
  return out;
}

}  // namespace

TEST_CASE("nccl at one rank: collectives keep the data, count calls, move nothing") {
  mpopt_test::nccl_world_of_one w;
  mpopt::comm::nccl& c = *w.comm;
  CHECK(c.rank() == 0);
  CHECK(c.size() == 1);
  CHECK(c.device() == 0);
  CHECK(c.memory() == mpopt::comm::memory_space::device);
  CHECK(c.stream() == w.stream);
  CHECK(c.name() == "nccl");

  constexpr std::size_t n = 1000;
  const std::vector<float> f = ramp(n);
  const std::vector<mpopt::bf16_t> b = to_bf16(f);
  device_buffer<float> df(f);
  device_buffer<mpopt::bf16_t> db(b);

  c.all_reduce(df.ptr, n, reduce_op::sum);
  c.all_reduce(df.ptr, n, reduce_op::max);
  c.all_reduce(db.ptr, n, reduce_op::sum);
  c.all_reduce(db.ptr, n, reduce_op::max);
  CHECK(df.read(w.stream) == f);
  CHECK(bits(db.read(w.stream)) == bits(b));

  // Into a different buffer: the reduction of one rank is a copy.
  device_buffer<float> recv(std::vector<float>(n, -1.0f));
  c.reduce_scatter(df.ptr, recv.ptr, {n}, reduce_op::sum);
  CHECK(recv.read(w.stream) == f);

  c.all_gather(db.ptr, {n});
  CHECK(bits(db.read(w.stream)) == bits(b));
  c.broadcast(df.ptr, n, 0);
  CHECK(df.read(w.stream) == f);
  c.barrier();

  const mpopt::comm::traffic& t = c.traffic_so_far();
  CHECK(t.calls == 7);  // the barrier is not traffic
  CHECK(t.elements == 0.0);
  CHECK(t.bytes == 0.0);
  c.reset_traffic();
  CHECK(c.traffic_so_far().calls == 0);
}

TEST_CASE("nccl wraps a caller's communicator without owning it, and rejects malformed arguments") {
  MPOPT_CUDA_REQUIRE(cudaSetDevice(0));
  ncclComm_t raw = nullptr;
  const int dev = 0;
  REQUIRE(ncclCommInitAll(&raw, 1, &dev) == ncclSuccess);
  {
    mpopt::comm::nccl c(raw, nullptr);
    CHECK(c.native() == raw);
    cudaStream_t s = nullptr;
    MPOPT_CUDA_REQUIRE(cudaStreamCreate(&s));
    c.set_stream(s);
    CHECK(c.stream() == s);

    device_buffer<float> d(ramp(8));
    const std::vector<std::size_t> two = {4, 4};
    CHECK_THROWS_AS(c.reduce_scatter(d.ptr, d.ptr, two, reduce_op::sum), mpopt::error);
    CHECK_THROWS_AS(c.all_gather(d.ptr, two), mpopt::error);
    CHECK_THROWS_AS(c.broadcast(d.ptr, 8, 1), mpopt::error);
    CHECK(c.traffic_so_far().calls == 0);  // nothing was enqueued
    c.barrier();
    MPOPT_CUDA_REQUIRE(cudaStreamDestroy(s));
  }
  // Still usable after the wrapper is gone: it did not destroy the communicator.
  int count = 0;
  CHECK(ncclCommCount(raw, &count) == ncclSuccess);
  CHECK(count == 1);
  CHECK(ncclCommDestroy(raw) == ncclSuccess);
}
