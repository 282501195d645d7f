// The error-compensated 1-bit compressed allreduce on device memory: mpopt/onebit/compressed_allreduce.hpp's
// algorithm and format, with kernels that call its per-element functions and reduce in its fixed order, so a device
// and a host rank give the same bits. Everything is ordered on one stream and the scales stay on the device: no
// host synchronisation (a call can be captured in a CUDA graph when the communicator's collectives can).
//
// One call: worker_signs (x = buf + e, its signs into the message, per-segment sums of squares) -> scale (s_w into
// every block) -> worker_error (e = x - s_w·sgn) -> all-to-all -> server_signs (z = mean of the W decompressed
// chunks + server error, its signs, sums of squares) -> scale (s_s) -> server_error -> all-gather -> decompress.
// The results are bitwise those of the host as long as the code is not built with --use_fast_math (its
// flush-to-zero would change additions of subnormals).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "../comm/communicator.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../onebit/compressed_allreduce.hpp"
#include "error.cuh"
#include "launch.cuh"
#include "memory.cuh"

namespace mpopt::cuda::onebit {

using mpopt::onebit::compressed_layout;
using mpopt::onebit::word_t;

static_assert(mpopt::onebit::word_bits == 32, "a packed word is one warp ballot: keep onebit::word_bits at 32");
static_assert(mpopt::onebit::final_lanes == std::size_t(block_threads),
              "the scale kernel's block is onebit::final_lanes threads: keep it equal to cuda::block_threads");

namespace detail {

inline constexpr unsigned full_mask = 0xffffffffu;
inline constexpr std::uint64_t warps_per_block = std::uint64_t(block_threads) / 32;
// Grids are fixed by the sizes alone (never by the device); each segment is one warp's whatever the grid, so the grid
// changes the speed only.
inline constexpr std::uint64_t max_grid = 4096;

inline std::uint32_t segment_grid(std::uint64_t words) {
  const std::uint64_t segments = (words + mpopt::onebit::segment_words - 1) / mpopt::onebit::segment_words;
  return std::uint32_t(std::min(max_grid, (segments + warps_per_block - 1) / warps_per_block));
}
inline std::uint32_t element_grid(std::uint64_t count) {
  return std::uint32_t(std::min(max_grid, (count + block_threads - 1) / block_threads));
}

// The kernels are templates only so that every translation unit may define them (a __global__ cannot be inline).
// Each takes `enabled`: null, or a device flag (a step's step_core::applied) that turns the call into nothing when 0,
// so a step that turns out skipped leaves the error buffers and the buffer as they were without a host round trip.

MPOPT_DEVICE MPOPT_FORCEINLINE bool is_enabled(const std::int32_t* enabled) {
  return enabled == nullptr || *enabled != 0;
}

// Lane 0 ends with the sum onebit::combine_lanes makes on the host.
MPOPT_DEVICE MPOPT_FORCEINLINE double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(full_mask, v, offset);
  return v;
}

// Warp per segment of the padded length: lane e takes element e of each word, in word order.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    worker_signs_kernel(const float* buf, std::uint64_t n, const float* worker_error, std::uint64_t words,
                        std::uint64_t chunk_words, std::uint64_t block_words, word_t* message, double* partials,
                        const std::int32_t* enabled) {
  using namespace mpopt::onebit;
  if (!is_enabled(enabled)) return;
  const unsigned lane = threadIdx.x % 32u;
  const std::uint64_t warps = std::uint64_t(gridDim.x) * warps_per_block;
  const std::uint64_t segments = (words + segment_words - 1) / segment_words;
  for (std::uint64_t s = std::uint64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32u; s < segments; s += warps) {
    const std::uint64_t begin = s * segment_words, end = begin + segment_words < words ? begin + segment_words : words;
    std::uint64_t block = begin / chunk_words, offset = begin % chunk_words;
    double sum = 0.0;
    for (std::uint64_t k = begin; k < end; ++k) {
      const std::uint64_t i = k * word_bits + lane;
      const float x = (i < n ? buf[i] : 0.0f) + worker_error[i];
      sum += double(x) * double(x);
      const word_t lanes = __ballot_sync(full_mask, sign_bit(x) != 0u);
      if (lane == 0) message[block * block_words + offset] = lanes_to_word(lanes);
      if (++offset == chunk_words) {
        offset = 0;
        ++block;
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) partials[s] = sum;
  }
}

// Warp per segment of the chunk: z = sum over workers in rank order + server error (kept in server_error until its
// scale is known), its signs into block[0, chunk_words).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    server_signs_kernel(const word_t* received, int world, std::uint64_t chunk_words, std::uint64_t block_words,
                        float* server_error, word_t* block, double* partials, const std::int32_t* enabled) {
  using namespace mpopt::onebit;
  if (!is_enabled(enabled)) return;
  const unsigned lane = threadIdx.x % 32u;
  const std::uint64_t warps = std::uint64_t(gridDim.x) * warps_per_block;
  const std::uint64_t segments = (chunk_words + segment_words - 1) / segment_words;
  for (std::uint64_t s = std::uint64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32u; s < segments; s += warps) {
    const std::uint64_t begin = s * segment_words,
                        end = begin + segment_words < chunk_words ? begin + segment_words : chunk_words;
    double sum = 0.0;
    for (std::uint64_t k = begin; k < end; ++k) {
      float y = 0.0f;
      for (int q = 0; q < world; ++q) {
        const word_t* from = received + std::uint64_t(q) * block_words;
        y = add_signed(y, unpack_bit(from[k], lane), server_weight(float_of_word(from[chunk_words]), world));
      }
      const std::uint64_t i = k * word_bits + lane;
      const float z = y + server_error[i];
      server_error[i] = z;
      sum += double(z) * double(z);
      const word_t lanes = __ballot_sync(full_mask, sign_bit(z) != 0u);
      if (lane == 0) block[k] = lanes_to_word(lanes);
    }
    sum = warp_sum(sum);
    if (lane == 0) partials[s] = sum;
  }
}

// <<<1, final_lanes>>>: the segment sums in onebit::finish_sum_of_squares's order; the scale goes to *scale and to
// the scale word of `blocks` blocks.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    scale_kernel(const double* partials, std::uint64_t count, std::uint64_t length, float* scale, word_t* blocks,
                 std::uint64_t block_words, std::uint64_t chunk_words, int num_blocks, const std::int32_t* enabled) {
  using namespace mpopt::onebit;
  if (!is_enabled(enabled)) return;
  __shared__ double lane[final_lanes];
  const unsigned t = threadIdx.x;
  double sum = 0.0;
  for (std::uint64_t k = t; k < count; k += final_lanes) sum += partials[k];
  lane[t] = sum;
  __syncthreads();
  for (unsigned half = final_lanes / 2; half > 0; half /= 2) {
    if (t < half) lane[t] += lane[t + half];
    __syncthreads();
  }
  const float s = scale_of(lane[0], length);
  if (t == 0) *scale = s;
  for (int b = int(t); b < num_blocks; b += int(final_lanes))
    blocks[std::uint64_t(b) * block_words + chunk_words] = word_of_float(s);
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    worker_error_kernel(const float* buf, std::uint64_t n, float* worker_error, std::uint64_t padded,
                        const float* scale, const std::int32_t* enabled) {
  using namespace mpopt::onebit;
  if (!is_enabled(enabled)) return;
  const float s = *scale;
  const std::uint64_t stride = std::uint64_t(gridDim.x) * block_threads;
  for (std::uint64_t i = std::uint64_t(blockIdx.x) * block_threads + threadIdx.x; i < padded; i += stride) {
    const float x = (i < n ? buf[i] : 0.0f) + worker_error[i];
    worker_error[i] = compression_error(x, sign_bit(x), s);
  }
}

// server_error holds z on entry.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    server_error_kernel(float* server_error, std::uint64_t chunk, const float* scale, const std::int32_t* enabled) {
  using namespace mpopt::onebit;
  if (!is_enabled(enabled)) return;
  const float s = *scale;
  const std::uint64_t stride = std::uint64_t(gridDim.x) * block_threads;
  for (std::uint64_t i = std::uint64_t(blockIdx.x) * block_threads + threadIdx.x; i < chunk; i += stride) {
    const float z = server_error[i];
    server_error[i] = compression_error(z, sign_bit(z), s);
  }
}

// blockIdx.y walks the chunks, so no element needs a 64-bit division to find its chunk.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    decompress_kernel(const word_t* gathered, std::uint64_t n, std::uint64_t chunk, std::uint64_t chunk_words,
                      std::uint64_t block_words, int world, float* out, const std::int32_t* enabled) {
  using namespace mpopt::onebit;
  if (!is_enabled(enabled)) return;
  const std::uint64_t stride = std::uint64_t(gridDim.x) * block_threads;
  for (std::uint64_t j = blockIdx.y; j < std::uint64_t(world) && j * chunk < n; j += gridDim.y) {
    const std::uint64_t begin = j * chunk, count = n - begin < chunk ? n - begin : chunk;
    const word_t* from = gathered + j * block_words;
    const float s = float_of_word(from[chunk_words]);
    for (std::uint64_t t = std::uint64_t(blockIdx.x) * block_threads + threadIdx.x; t < count; t += stride)
      out[begin + t] = decompressed(unpack_bit(from[t / word_bits], unsigned(t % word_bits)), s);
  }
}

}  // namespace detail

// The three local steps, as mpopt::onebit's host functions of the same names, on device pointers, enqueued on
// `stream`; the scale is written to the device float *scale instead of returned. partials: layout.segments() doubles
// of device workspace; enabled: see detail::is_enabled. They return the launch status (cudaGetLastError).
inline cudaError_t compress_worker(const float* buf, const compressed_layout& l, float* worker_error, word_t* message,
                                   double* partials, float* scale, cudaStream_t stream,
                                   const std::int32_t* enabled = nullptr) {
  if (l.padded == 0) return cudaSuccess;
  const std::uint64_t words = l.padded / mpopt::onebit::word_bits;
  detail::worker_signs_kernel<><<<detail::segment_grid(words), block_threads, 0, stream>>>(
      buf, l.n, worker_error, words, l.chunk_words(), l.block_words(), message, partials, enabled);
  detail::scale_kernel<><<<1, block_threads, 0, stream>>>(partials, l.segments(), l.padded, scale, message,
                                                          l.block_words(), l.chunk_words(), l.world, enabled);
  detail::worker_error_kernel<>
      <<<detail::element_grid(l.padded), block_threads, 0, stream>>>(buf, l.n, worker_error, l.padded, scale, enabled);
  return cudaGetLastError();
}

inline cudaError_t compress_server(const word_t* received, const compressed_layout& l, float* server_error,
                                   word_t* block, double* partials, float* scale, cudaStream_t stream,
                                   const std::int32_t* enabled = nullptr) {
  if (l.chunk == 0) return cudaSuccess;
  const std::uint64_t chunk_words = l.chunk_words();
  const std::uint64_t segments = (chunk_words + mpopt::onebit::segment_words - 1) / mpopt::onebit::segment_words;
  detail::server_signs_kernel<><<<detail::segment_grid(chunk_words), block_threads, 0, stream>>>(
      received, l.world, chunk_words, l.block_words(), server_error, block, partials, enabled);
  detail::scale_kernel<><<<1, block_threads, 0, stream>>>(partials, segments, l.chunk, scale, block, l.block_words(),
                                                          chunk_words, 1, enabled);
  detail::server_error_kernel<>
      <<<detail::element_grid(l.chunk), block_threads, 0, stream>>>(server_error, l.chunk, scale, enabled);
  return cudaGetLastError();
}

inline cudaError_t decompress(const word_t* gathered, const compressed_layout& l, float* out, cudaStream_t stream,
                              const std::int32_t* enabled = nullptr) {
  if (l.n == 0) return cudaSuccess;
  const std::uint32_t chunks = std::uint32_t(std::min<std::uint64_t>(std::uint64_t(l.world), 65535));
  const std::uint32_t per_chunk = std::max<std::uint32_t>(
      1, std::min<std::uint32_t>(detail::element_grid(l.chunk), std::uint32_t(detail::max_grid) / chunks));
  detail::decompress_kernel<><<<dim3(per_chunk, chunks), block_threads, 0, stream>>>(
      gathered, l.n, l.chunk, l.chunk_words(), l.block_words(), l.world, out, enabled);
  return cudaGetLastError();
}

// The error-feedback buffers of one compressed tensor on one rank, in device memory (fp32).
struct error_feedback {
  device_buffer<float> worker;  // layout.padded elements
  device_buffer<float> server;  // layout.chunk elements

  error_feedback() = default;
  // Zero-filled on `stream`.
  error_feedback(const compressed_layout& l, cudaStream_t stream)
      : worker(l.padded, "onebit worker error"), server(l.chunk, "onebit server error") {
    reset(stream);
  }
  void reset(cudaStream_t stream) {
    throw_if_cuda_error(cudaMemsetAsync(worker.get(), 0, worker.bytes(), stream), "cudaMemsetAsync(worker error)");
    throw_if_cuda_error(cudaMemsetAsync(server.get(), 0, server.bytes(), stream), "cudaMemsetAsync(server error)");
  }
};

// Workspace for compressed allreduces over one device-memory communicator (mpopt::comm::nccl), sized once for tensors
// of at most max_elements. `stream` must be the one the communicator enqueues on (nccl::stream()): the kernels and
// the collectives are ordered on it and nothing else orders them.
class compressed_allreduce {
 public:
  compressed_allreduce(comm::communicator& comm, std::size_t max_elements, cudaStream_t stream)
      : comm_(&comm), capacity_(compressed_layout::make(max_elements, comm.size())), stream_(stream) {
    if (comm.memory() != comm::memory_space::device)
      throw error(status::invalid("cuda::onebit::compressed_allreduce: communicator '" + comm.name() +
                                  "' works on host memory; use mpopt::onebit::compressed_allreduce"));
    scales_ = device_buffer<float>(2, "onebit scales");
    if (capacity_.world > 1) {
      send_ = device_buffer<word_t>(capacity_.message_words(), "onebit send/gather message");
      recv_ = device_buffer<word_t>(capacity_.message_words(), "onebit received message");
      partials_ = device_buffer<double>(capacity_.segments(), "onebit partial sums");
    }
    throw_if_cuda_error(cudaMemsetAsync(scales_.get(), 0, scales_.bytes(), stream_), "cudaMemsetAsync(onebit scales)");
  }

  // As mpopt::onebit::compressed_allreduce::operator(), on device pointers, enqueued on stream() (returns at once).
  // The argument checks run on the host before anything is enqueued. enabled: null, or a device flag that makes the
  // kernels do nothing when 0 (the collectives still run, on every rank alike, and carry stale words).
  void operator()(float* buf, const compressed_layout& layout, error_feedback& err,
                  const std::int32_t* enabled = nullptr) {
    throw_if_error(mpopt::onebit::check_call(buf, layout, err.worker.size(), err.server.size(), capacity_));
    if (layout.world == 1 || layout.n == 0) return;
    const std::size_t block_words = layout.block_words();
    float* worker_scale = scales_.get();
    float* server_scale = scales_.get() + 1;
    // A failed launch is thrown only after both collectives: a rank leaving before them would hang the others.
    status failed;
    auto keep = [&](cudaError_t e, const char* what) { cuda::detail::keep_first_error(failed, e, what); };
    keep(compress_worker(buf, layout, err.worker.get(), send_.get(), partials_.get(), worker_scale, stream_, enabled),
         "onebit compress_worker kernels");
    comm_->all_to_all_bytes(send_.get(), recv_.get(), block_words * sizeof(word_t));
    word_t* mine = send_.get() + std::size_t(comm_->rank()) * block_words;
    keep(compress_server(recv_.get(), layout, err.server.get(), mine, partials_.get(), server_scale, stream_, enabled),
         "onebit compress_server kernels");
    comm_->all_gather_bytes(send_.get(), block_words * sizeof(word_t));
    keep(decompress(send_.get(), layout, buf, stream_, enabled), "onebit decompress kernel");
    throw_if_error(failed);
  }

  comm::communicator& communicator() const noexcept { return *comm_; }
  const compressed_layout& capacity() const noexcept { return capacity_; }
  cudaStream_t stream() const noexcept { return stream_; }
  // Changing it orders nothing: the caller synchronises the old and the new stream (and the communicator's).
  void set_stream(cudaStream_t s) noexcept { stream_ = s; }
  // Device floats: this rank's s_w and s_s of the latest compressed call (0 before one).
  const float* device_scales() const noexcept { return scales_.get(); }

 private:
  comm::communicator* comm_;
  compressed_layout capacity_;
  cudaStream_t stream_;
  device_buffer<word_t> send_, recv_;
  device_buffer<double> partials_;
  device_buffer<float> scales_;
};

}  // namespace mpopt::cuda::onebit
