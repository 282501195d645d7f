// The 1-bit compressed allreduce's kernels (mpopt/cuda/compressed_allreduce.cuh) against the host functions they
// share their math with (mpopt/onebit/compressed_allreduce.hpp), bit for bit: the worker pass of one rank's buffer
// (packed signs, scale, new worker error), the server pass given the received blocks, the decompression, and whole
// calls of W ranks simulated on one GPU (blocks moved with cudaMemcpy) against the same simulation on the host. At
// world size 1 the primitive is an identity, so a one-GPU NCCL run would test nothing; hence these pieces. Also the
// device class's argument checks and its world-of-one identity, over a stand-in device communicator.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gpu_test.cuh"
#include "mpopt/comm/communicator.hpp"
#include "mpopt/cuda/compressed_allreduce.cuh"
#include "mpopt/onebit/compressed_allreduce.hpp"

namespace {

using mpopt::onebit::compressed_layout;
using mpopt::onebit::word_t;
namespace ob = mpopt::onebit;
namespace cob = mpopt::cuda::onebit;

template <class T>
struct device_vector {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_vector(std::size_t count) : n(count) {
    if (n > 0) MPOPT_CUDA_REQUIRE(cudaMalloc(&ptr, n * sizeof(T)));
    if (n > 0) MPOPT_CUDA_REQUIRE(cudaMemset(ptr, 0, n * sizeof(T)));
  }
  explicit device_vector(const std::vector<T>& host) : device_vector(host.size()) {
    if (n > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;
  ~device_vector() { cudaFree(ptr); }
  std::vector<T> read() const {
    std::vector<T> out(n);
    MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
    if (n > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Bitwise equality of two float arrays; the count of differing elements.
std::size_t differing(const std::vector<float>& a, const float* b, std::size_t n) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) bad += bits_of(a[i]) != bits_of(b[i]);
  return bad;
}

// Test data: [-scale, scale) from a hash, with exact zeros, -0.0 and subnormals sprinkled in (the sign of zero and
// the additions of subnormals must agree too).
std::vector<float> data(std::size_t n, std::uint64_t seed, float scale) {
  std::vector<float> v(n);
  std::uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    v[i] = scale * (float(z >> 40) * 0x1p-23f - 1.0f);
    if (z % 97 == 0) v[i] = 0.0f;
    if (z % 101 == 0) v[i] = -0.0f;
    if (z % 103 == 0) v[i] = (z & 1 ? 1.0f : -1.0f) * 1e-40f;
  }
  return v;
}

const int kWorlds[] = {1, 2, 3, 4, 8};
const std::size_t kSizes[] = {1, 31, 1000, 33 * 1024 + 17, 300001};

// A device-memory communicator of one rank whose collectives do nothing (the primitive returns before them at one
// rank): enough for the device class's checks.
struct device_world_of_one final : mpopt::comm::communicator {
  int rank() const override { return 0; }
  int size() const override { return 1; }
  mpopt::comm::memory_space memory() const override { return mpopt::comm::memory_space::device; }
  std::string name() const override { return "device-one"; }
  void all_reduce(void*, std::size_t, mpopt::dtype, mpopt::comm::reduce_op) override {}
  void reduce_scatter(const void*, void*, const std::size_t*, mpopt::dtype, mpopt::comm::reduce_op) override {}
  void all_gather(void*, const std::size_t*, mpopt::dtype) override {}
  void broadcast(void*, std::size_t, mpopt::dtype, int) override {}
  void barrier() override {}
  void all_to_all_bytes(const void*, void*, std::size_t) override {}
  void all_gather_bytes(void*, std::size_t) override {}
};

__global__ void lanes_to_word_kernel(const word_t* in, word_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = ob::lanes_to_word(in[i]);
}

}  // namespace

TEST_CASE("cuda onebit: lanes_to_word (__brev + __byte_perm) equals the host's bit reversal of each byte") {
  std::vector<word_t> masks;
  for (unsigned e = 0; e < 32; ++e) masks.push_back(word_t(1) << e);
  std::uint64_t s = 5;
  for (int t = 0; t < 4000; ++t)
    masks.push_back(word_t((s = s * 6364136223846793005ull + 1442695040888963407ull) >> 32));
  device_vector<word_t> in(masks), out(masks.size());
  lanes_to_word_kernel<<<int((masks.size() + 255) / 256), 256>>>(in.ptr, out.ptr, int(masks.size()));
  MPOPT_CUDA_REQUIRE(cudaGetLastError());
  const std::vector<word_t> got = out.read();
  std::size_t bad = 0;
  for (std::size_t i = 0; i < masks.size(); ++i) bad += got[i] != ob::lanes_to_word(masks[i]);
  CHECK(bad == 0);
}

TEST_CASE("cuda onebit: the worker pass equals the host's bit for bit") {
  for (int W : kWorlds) {
    for (std::size_t n : kSizes) {
      CAPTURE(W);
      CAPTURE(n);
      const compressed_layout l = compressed_layout::make(n, W);
      const std::vector<float> buf = data(n, n + std::uint64_t(W), 2.0f);
      const std::vector<float> err0 = data(l.padded, 7 * n + 1, 0.5f);

      std::vector<float> host_err = err0;
      std::vector<word_t> host_message(l.message_words());
      std::vector<double> host_partials(l.segments());
      const float host_scale =
          ob::compress_worker(buf.data(), l, host_err.data(), host_message.data(), host_partials.data());

      device_vector<float> d_buf(buf), d_err(err0), d_scale(1);
      device_vector<word_t> d_message(l.message_words());
      device_vector<double> d_partials(l.segments());
      MPOPT_CUDA_REQUIRE(
          cob::compress_worker(d_buf.ptr, l, d_err.ptr, d_message.ptr, d_partials.ptr, d_scale.ptr, nullptr));
      CHECK(bits_of(d_scale.read()[0]) == bits_of(host_scale));
      CHECK(d_partials.read() == host_partials);  // the same per-segment sums: the same order
      CHECK(d_message.read() == host_message);    // signs and the W scale words
      CHECK(differing(host_err, d_err.read().data(), l.padded) == 0);
      CHECK(differing(buf, d_buf.read().data(), n) == 0);  // buf is input only
    }
  }
}

TEST_CASE("cuda onebit: the server pass and the decompression equal the host's bit for bit") {
  for (int W : kWorlds) {
    for (std::size_t n : kSizes) {
      CAPTURE(W);
      CAPTURE(n);
      const compressed_layout l = compressed_layout::make(n, W);
      const std::size_t bw = l.block_words();
      // Every worker's message, made on the host.
      std::vector<std::vector<word_t>> messages(static_cast<std::size_t>(W));
      std::vector<double> partials(l.segments());
      for (int q = 0; q < W; ++q) {
        const std::vector<float> buf = data(n, 31 * std::uint64_t(q) + n, 1.0f + 0.37f * float(q));
        std::vector<float> err = data(l.padded, 11 * std::uint64_t(q) + 3, 0.25f);
        messages[std::size_t(q)].assign(l.message_words(), 0);
        ob::compress_worker(buf.data(), l, err.data(), messages[std::size_t(q)].data(), partials.data());
      }
      std::vector<word_t> host_gathered(l.message_words()), device_gathered(l.message_words());
      for (int j = 0; j < W; ++j) {
        CAPTURE(j);
        std::vector<word_t> received(l.message_words());
        for (int q = 0; q < W; ++q) {
          std::memcpy(&received[std::size_t(q) * bw], &messages[std::size_t(q)][std::size_t(j) * bw],
                      bw * sizeof(word_t));
        }
        const std::vector<float> server0 = data(l.chunk, 13 * std::uint64_t(j) + 5, 0.1f);
        std::vector<float> host_server = server0;
        const float host_scale = ob::compress_server(received.data(), l, host_server.data(),
                                                     &host_gathered[std::size_t(j) * bw], partials.data());

        device_vector<word_t> d_received(received), d_block(bw);
        device_vector<float> d_server(server0), d_scale(1);
        device_vector<double> d_partials(l.segments());
        MPOPT_CUDA_REQUIRE(
            cob::compress_server(d_received.ptr, l, d_server.ptr, d_block.ptr, d_partials.ptr, d_scale.ptr, nullptr));
        CHECK(bits_of(d_scale.read()[0]) == bits_of(host_scale));
        const std::vector<word_t> block = d_block.read();
        CHECK(std::memcmp(block.data(), &host_gathered[std::size_t(j) * bw], bw * sizeof(word_t)) == 0);
        std::memcpy(&device_gathered[std::size_t(j) * bw], block.data(), bw * sizeof(word_t));
        CHECK(differing(host_server, d_server.read().data(), l.chunk) == 0);
      }
      // The decompression of the gathered blocks.
      std::vector<float> host_out(n + 1, 123.0f);
      ob::decompress(host_gathered.data(), l, host_out.data());
      device_vector<word_t> d_gathered(device_gathered);
      device_vector<float> d_out(std::vector<float>(n + 1, 123.0f));
      MPOPT_CUDA_REQUIRE(cob::decompress(d_gathered.ptr, l, d_out.ptr, nullptr));
      const std::vector<float> out = d_out.read();
      CHECK(differing(host_out, out.data(), n) == 0);
      CHECK(out[n] == 123.0f);  // nothing written past n
    }
  }
}

TEST_CASE("cuda onebit: whole calls of W simulated device ranks equal the host simulation, with error feedback") {
  for (int W : {2, 3, 4}) {
    const std::size_t n = 40000 + std::size_t(W);
    CAPTURE(W);
    const compressed_layout l = compressed_layout::make(n, W);
    const std::size_t bw = l.block_words(), w = std::size_t(W);
    cudaStream_t stream = nullptr;
    MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream));
    std::vector<ob::error_feedback> host_err;
    std::vector<cob::error_feedback> dev_err;
    for (std::size_t q = 0; q < w; ++q) {
      host_err.emplace_back(l);
      dev_err.emplace_back(l, stream);
    }
    std::vector<std::vector<word_t>> host_msg(w, std::vector<word_t>(l.message_words()));
    std::vector<std::vector<word_t>> host_rcv = host_msg;
    std::vector<word_t> host_gathered(l.message_words());
    std::vector<double> partials(l.segments());
    device_vector<word_t> d_msg(w * l.message_words()), d_rcv(w * l.message_words()), d_gathered(l.message_words());
    device_vector<double> d_partials(l.segments());
    device_vector<float> d_scales(2);
    for (int call = 0; call < 3; ++call) {
      CAPTURE(call);
      std::vector<std::vector<float>> host_buf(w);
      std::vector<std::unique_ptr<device_vector<float>>> dev_buf;
      for (std::size_t q = 0; q < w; ++q) {
        host_buf[q] = data(n, 1000 * std::uint64_t(call) + q, 1.0f + 0.5f * float(q));
        dev_buf.push_back(std::make_unique<device_vector<float>>(host_buf[q]));
      }
      // Host.
      for (std::size_t q = 0; q < w; ++q)
        ob::compress_worker(host_buf[q].data(), l, host_err[q].worker.data(), host_msg[q].data(), partials.data());
      for (std::size_t j = 0; j < w; ++j) {
        for (std::size_t q = 0; q < w; ++q) std::memcpy(&host_rcv[j][q * bw], &host_msg[q][j * bw], bw * 4);
      }
      for (std::size_t j = 0; j < w; ++j)
        ob::compress_server(host_rcv[j].data(), l, host_err[j].server.data(), &host_gathered[j * bw], partials.data());
      ob::decompress(host_gathered.data(), l, host_buf[0].data());
      // Device: the same steps, the all-to-all and the all-gather as device copies.
      for (std::size_t q = 0; q < w; ++q) {
        MPOPT_CUDA_REQUIRE(cob::compress_worker(dev_buf[q]->ptr, l, dev_err[q].worker.get(),
                                                d_msg.ptr + q * l.message_words(), d_partials.ptr, d_scales.ptr,
                                                stream));
      }
      for (std::size_t j = 0; j < w; ++j) {
        for (std::size_t q = 0; q < w; ++q) {
          MPOPT_CUDA_REQUIRE(cudaMemcpyAsync(d_rcv.ptr + j * l.message_words() + q * bw,
                                             d_msg.ptr + q * l.message_words() + j * bw, bw * 4,
                                             cudaMemcpyDeviceToDevice, stream));
        }
      }
      for (std::size_t j = 0; j < w; ++j) {
        MPOPT_CUDA_REQUIRE(cob::compress_server(d_rcv.ptr + j * l.message_words(), l, dev_err[j].server.get(),
                                                d_gathered.ptr + j * bw, d_partials.ptr, d_scales.ptr + 1, stream));
      }
      for (std::size_t q = 0; q < w; ++q)
        MPOPT_CUDA_REQUIRE(cob::decompress(d_gathered.ptr, l, dev_buf[q]->ptr, stream));
      MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(stream));
      for (std::size_t q = 0; q < w; ++q) {
        CHECK(differing(host_buf[0], dev_buf[q]->read().data(), n) == 0);  // every device rank: the host's bits
        std::vector<float> worker(l.padded), server(l.chunk);
        MPOPT_CUDA_REQUIRE(cudaMemcpy(worker.data(), dev_err[q].worker.get(), l.padded * 4, cudaMemcpyDeviceToHost));
        MPOPT_CUDA_REQUIRE(cudaMemcpy(server.data(), dev_err[q].server.get(), l.chunk * 4, cudaMemcpyDeviceToHost));
        CHECK(differing(worker, host_err[q].worker.data(), l.padded) == 0);
        CHECK(differing(server, host_err[q].server.data(), l.chunk) == 0);
      }
    }
    dev_err.clear();
    cudaStreamDestroy(stream);
  }
}

TEST_CASE("cuda onebit: the device class at world one is an identity, and checks its arguments") {
  device_world_of_one one;
  cudaStream_t stream = nullptr;
  MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream));
  {
    cob::compressed_allreduce allreduce(one, 1000, stream);
    CHECK(&allreduce.communicator() == &one);
    CHECK(allreduce.stream() == stream);
    const compressed_layout l = compressed_layout::make(777, 1);
    cob::error_feedback err(l, stream);
    std::vector<float> host = data(777, 1, 3.0f);
    host[0] = std::numeric_limits<float>::quiet_NaN();
    device_vector<float> buf(host);
    allreduce(buf.ptr, l, err);
    CHECK(differing(host, buf.read().data(), 777) == 0);
    std::vector<float> worker(l.padded, 1.0f);
    MPOPT_CUDA_REQUIRE(cudaMemcpy(worker.data(), err.worker.get(), l.padded * 4, cudaMemcpyDeviceToHost));
    for (float x : worker) CHECK(x == 0.0f);

    CHECK_THROWS_WITH_AS(allreduce(buf.ptr, compressed_layout::make(777, 2), err), doctest::Contains("layout.world 2"),
                         mpopt::error);
    CHECK_THROWS_WITH_AS(allreduce(buf.ptr, compressed_layout::make(1001, 1), err),
                         doctest::Contains("layout.n 1001 exceeds max_elements 1000"), mpopt::error);
    cob::error_feedback small(compressed_layout::make(100, 1), stream);
    CHECK_THROWS_WITH_AS(allreduce(buf.ptr, l, small), doctest::Contains("err.worker has 128 elements"), mpopt::error);
    CHECK_THROWS_WITH_AS(allreduce(nullptr, l, err), doctest::Contains("buf is null"), mpopt::error);
    MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(stream));
  }
  mpopt::comm::single_rank host_comm;
  CHECK_THROWS_WITH_AS(cob::compressed_allreduce(host_comm, 10, stream), doctest::Contains("works on host memory"),
                       mpopt::error);
  cudaStreamDestroy(stream);
}
