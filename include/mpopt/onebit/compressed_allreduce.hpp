// The error-compensated 1-bit compressed allreduce (DeepSpeed's compressed_allreduce; reference D.2) on host memory,
// and the per-element math its CUDA twin (cuda/compressed_allreduce.cuh) calls, so both give the same bits.
//
// Every rank compresses x = buf + worker_error to s_w·sgn(x) (one bit per element and one fp32 scale, the RMS of x)
// and keeps what that lost in worker_error. Chunk j of its bits goes to rank j (an all-to-all). Rank j averages the
// W decompressed chunks, compresses that mean the same way with its server_error, and every rank gathers every
// server chunk (an all-gather). Per rank that moves 2·(W-1)/W·(Nc/8 + 4W) bytes, against 2·(W-1)/W·4Nc for an fp32
// allreduce: about 1/32.
//
// The format (what travels; the same over MPI and NCCL):
// - Sign: x >= 0 is bit 1 (+1), else bit 0 (-1). Zero is +1 as in DeepSpeed's NCCL backend, and so is -0.0 (it
//   compares equal to 0; DeepSpeed's `compressed` backend packs !signbit and gives -1). NaN is bit 0.
// - Packing: 32 elements per 32-bit word, stored as 4 bytes of 8 elements each, most significant bit first: element e
//   of a word is bit (e ^ 7) of its little-endian value, so the bytes are numpy.packbits(bits) (DeepSpeed's
//   cupy.packbits order).
// - Padding: Nc is n rounded up to a multiple of 32·W, so each rank's chunk (Nc/W) holds whole words: one warp ballot
//   makes a word, and message blocks stay 4-byte aligned. (DeepSpeed pads to a multiple of W·lcm(W, 8). The padded
//   zeros count in the RMS, so where the padded lengths differ the scales differ by the root of their ratio; the
//   signs do not.)
// - Messages: block j is chunk j's Nc/(32W) words followed by one word holding the fp32 scale, so each phase is one
//   collective (DeepSpeed sends the scales with a second).
//
// Determinism: sums of squares are taken in double in one fixed order that depends on the lengths only (see
// sum_of_squares_segment and finish_sum_of_squares), which a warp of the CUDA kernels reproduces exactly; everything
// else is per element, with additions and subtractions only (no product a compiler could fuse into an FMA). So every
// rank, run, OpenMP thread count and backend gives the same bits, and every rank ends with the same output.
// Non-finite input makes the scales NaN: the output is then NaN on every rank and the error buffers are poisoned
// (reset() them).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "../comm/communicator.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../host/aligned_buffer.hpp"
#include "../host/executor.hpp"

namespace mpopt::onebit {

using word_t = std::uint32_t;
inline constexpr std::size_t word_bits = 32;

// The fixed reduction order: a segment is `segment_words` consecutive words; lane e (0..31) sums the squares of
// element e of each word of the segment in order, and the 32 lane sums meet in the tree a warp's shuffle-down makes.
// The segment sums are then added by `final_lanes` strided lanes and a halving tree (one CUDA block). 1024 elements a
// segment give a GPU a thousand warps at 1M elements.
inline constexpr std::size_t segment_words = 32;
inline constexpr std::size_t segment_elements = segment_words * word_bits;
inline constexpr std::size_t final_lanes = 256;

// ---------------------------------------------------------------------------------------------------------------------
// Per-element math, shared with the CUDA kernels.

MPOPT_HOST_DEVICE MPOPT_FORCEINLINE word_t sign_bit(float x) {
  return x >= 0.0f ? 1u : 0u;
}

// Where element e (0..31) of a word sits: byte e/8, most significant bit first.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE unsigned bit_position(unsigned e) {
  return e ^ 7u;
}

MPOPT_HOST_DEVICE MPOPT_FORCEINLINE word_t unpack_bit(word_t word, unsigned e) {
  return (word >> bit_position(e)) & 1u;
}

// A word from a lane mask (element e at bit e, as a warp ballot returns it): the bits of each byte reversed.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE word_t lanes_to_word(word_t lanes) {
#if MPOPT_IS_DEVICE_CODE
  return __byte_perm(__brev(lanes), 0u, 0x0123u);  // reverse all 32 bits, then the byte order back
#else
  word_t v = lanes;
  v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
  v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
  return ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
#endif
}

// The scale travels as the bits of an fp32 in a word.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE word_t word_of_float(float f) {
#if MPOPT_IS_DEVICE_CODE
  return __float_as_uint(f);
#else
  word_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
#endif
}
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float float_of_word(word_t w) {
#if MPOPT_IS_DEVICE_CODE
  return __uint_as_float(w);
#else
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
#endif
}

// s·sgn: the compressed value of an element.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float decompressed(word_t bit, float scale) {
  return bit ? scale : -scale;
}

// x - s·sgn(x): what the compression lost, fed back next call. A select, not a product: no FMA can change it.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float compression_error(float x, word_t bit, float scale) {
  return bit ? x - scale : x + scale;
}

// The RMS over `count` elements from the double sum of squares, rounded once to fp32 (0 for no elements).
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float scale_of(double sum_sq, std::uint64_t count) {
  return count == 0 ? 0.0f : float(std::sqrt(sum_sq / double(count)));
}

// Worker q's weight in the server's mean: s_w[q] / W.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float server_weight(float worker_scale, int world) {
  return worker_scale / float(world);
}

// y + weight·sgn, summed over workers in rank order.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE float add_signed(float y, word_t bit, float weight) {
  return bit ? y + weight : y - weight;
}

// ---------------------------------------------------------------------------------------------------------------------
// Layout and state.

// Layout of one compressed tensor at a world size.
struct compressed_layout {
  std::size_t n = 0;       // elements compressed
  std::size_t padded = 0;  // Nc: n rounded up to a multiple of 32·world (whole words in every chunk; see the top)
  std::size_t chunk = 0;   // padded / world: the server chunk each rank owns
  int world = 1;

  static compressed_layout make(std::size_t n, int world) {
    if (world < 1) throw error(status::invalid("compressed_layout::make: world " + std::to_string(world) + " < 1"));
    const std::size_t multiple = word_bits * std::size_t(world);
    if (n > SIZE_MAX - (multiple - 1))
      throw error(status::invalid("compressed_layout::make: n " + std::to_string(n) + " overflows when padded to a " +
                                  "multiple of " + std::to_string(multiple)));
    compressed_layout l;
    l.n = n;
    l.padded = (n + multiple - 1) / multiple * multiple;
    l.chunk = l.padded / std::size_t(world);
    l.world = world;
    return l;
  }

  std::size_t chunk_words() const noexcept { return chunk / word_bits; }
  std::size_t block_words() const noexcept { return chunk_words() + 1; }  // the chunk's words, then its scale
  std::size_t message_words() const noexcept { return block_words() * std::size_t(world); }
  // Partial sums the worker pass writes (the server pass needs fewer).
  std::size_t segments() const noexcept { return (padded + segment_elements - 1) / segment_elements; }

  friend bool operator==(const compressed_layout& a, const compressed_layout& b) noexcept {
    return a.n == b.n && a.padded == b.padded && a.chunk == b.chunk && a.world == b.world;
  }
  friend bool operator!=(const compressed_layout& a, const compressed_layout& b) noexcept { return !(a == b); }
};

// The error-feedback buffers of one compressed tensor on one rank (fp32): part of an optimizer's saved state. They are
// only meaningful at the world size they were made for.
struct error_feedback {
  host::aligned_buffer<float> worker;  // layout.padded elements
  host::aligned_buffer<float> server;  // layout.chunk elements

  error_feedback() = default;
  explicit error_feedback(const compressed_layout& l) : worker(l.padded), server(l.chunk) {}  // zero-filled
  void reset() {
    if (worker.size() > 0) std::memset(worker.data(), 0, worker.size() * sizeof(float));
    if (server.size() > 0) std::memset(server.data(), 0, server.size() * sizeof(float));
  }
};

// ---------------------------------------------------------------------------------------------------------------------
// The three local steps (the host reference the CUDA kernels are tested against). Lengths are multiples of 32.

// The 32 lane sums of one segment combined as a warp's __shfl_down_sync tree leaves them in lane 0.
inline double combine_lanes(double (&lane)[word_bits]) {
  for (std::size_t offset = word_bits / 2; offset > 0; offset /= 2) {
    for (std::size_t e = 0; e < offset; ++e) lane[e] += lane[e + offset];
  }
  return lane[0];
}

// The segment sums added in the fixed order: lane t of `final_lanes` sums segments t, t + final_lanes, ... in order,
// then a halving tree (lane t adds lane t + 128, then lane t + 64, ..., down to lane 0 adding lane 1).
inline double finish_sum_of_squares(const double* partials, std::size_t count) {
  double lane[final_lanes];
  for (std::size_t t = 0; t < final_lanes; ++t) {
    double s = 0.0;
    for (std::size_t k = t; k < count; k += final_lanes) s += partials[k];
    lane[t] = s;
  }
  for (std::size_t half = final_lanes / 2; half > 0; half /= 2) {
    for (std::size_t t = 0; t < half; ++t) lane[t] += lane[t + half];
  }
  return lane[0];
}

namespace detail {

// Runs body(segment) for every segment of `words` words; segments are independent, so any thread count gives the
// same partials.
template <class Body>
void for_each_segment(std::size_t words, Body&& body) {
  const std::ptrdiff_t segments = std::ptrdiff_t((words + segment_words - 1) / segment_words);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(words * word_bits) > host::parallel_threshold)
#endif
  for (std::ptrdiff_t s = 0; s < segments; ++s) body(std::size_t(s));
}

template <class Body>
void for_each_element(std::size_t count, Body&& body) {
  const std::ptrdiff_t blocks = std::ptrdiff_t((count + host::reduce_block - 1) / host::reduce_block);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(count) > host::parallel_threshold)
#endif
  for (std::ptrdiff_t b = 0; b < blocks; ++b) {
    const std::size_t begin = std::size_t(b) * host::reduce_block;
    const std::size_t end = begin + host::reduce_block < count ? begin + host::reduce_block : count;
    for (std::size_t i = begin; i < end; ++i) body(i);
  }
}

// x = buf + worker_error for the 32 elements of word k, buf read as 0 in the padding (only the words at the end of
// buf take the branch).
inline void worker_x(const float* buf, std::size_t n, const float* worker_error, std::size_t k, float (&x)[word_bits]) {
  const std::size_t base = k * word_bits;
  if (base + word_bits <= n) {
    for (unsigned e = 0; e < word_bits; ++e) x[e] = buf[base + e] + worker_error[base + e];
  } else {
    for (unsigned e = 0; e < word_bits; ++e) x[e] = (base + e < n ? buf[base + e] : 0.0f) + worker_error[base + e];
  }
}

}  // namespace detail

// Worker side. Writes the signs of x = buf + worker_error into message (block j: chunk j's words, then the scale
// word, for all `world` blocks) and returns the scale s_w = RMS(x) over the padded length; worker_error <- x -
// s_w·sgn(x). partials: layout.segments() doubles of workspace.
inline float compress_worker(const float* buf, const compressed_layout& l, float* worker_error, word_t* message,
                             double* partials) {
  const std::size_t chunk_words = l.chunk_words(), block_words = l.block_words();
  const std::size_t words = l.padded / word_bits;
  detail::for_each_segment(words, [&](std::size_t s) {
    double lane[word_bits] = {};
    const std::size_t end = (s + 1) * segment_words < words ? (s + 1) * segment_words : words;
    for (std::size_t k = s * segment_words; k < end; ++k) {
      float x[word_bits];
      detail::worker_x(buf, l.n, worker_error, k, x);
      word_t lanes = 0;
      for (unsigned e = 0; e < word_bits; ++e) {
        lane[e] += double(x[e]) * double(x[e]);
        lanes |= sign_bit(x[e]) << e;
      }
      message[k / chunk_words * block_words + k % chunk_words] = lanes_to_word(lanes);
    }
    partials[s] = combine_lanes(lane);
  });
  const float scale = scale_of(finish_sum_of_squares(partials, (words + segment_words - 1) / segment_words), l.padded);
  for (int j = 0; j < l.world; ++j) message[std::size_t(j) * block_words + chunk_words] = word_of_float(scale);
  detail::for_each_segment(words, [&](std::size_t s) {
    const std::size_t end = (s + 1) * segment_words < words ? (s + 1) * segment_words : words;
    for (std::size_t k = s * segment_words; k < end; ++k) {
      float x[word_bits];
      detail::worker_x(buf, l.n, worker_error, k, x);
      float* err = worker_error + k * word_bits;
      for (unsigned e = 0; e < word_bits; ++e) err[e] = compression_error(x[e], sign_bit(x[e]), scale);
    }
  });
  return scale;
}

// Server side of chunk `rank`. received: `world` blocks, block q from worker q. z = sum over q in rank order of
// server_weight(s_w[q])·sgn_q, plus server_error; writes one block (the signs of z, then the scale s_s = RMS(z) over
// the chunk) and returns s_s; server_error <- z - s_s·sgn(z). partials: layout.segments() doubles of workspace.
inline float compress_server(const word_t* received, const compressed_layout& l, float* server_error, word_t* block,
                             double* partials) {
  const std::size_t chunk_words = l.chunk_words(), block_words = l.block_words();
  detail::for_each_segment(chunk_words, [&](std::size_t s) {
    double lane[word_bits] = {};
    const std::size_t end = (s + 1) * segment_words < chunk_words ? (s + 1) * segment_words : chunk_words;
    for (std::size_t k = s * segment_words; k < end; ++k) {
      float y[word_bits] = {};
      for (int q = 0; q < l.world; ++q) {
        const word_t* from = received + std::size_t(q) * block_words;
        const float weight = server_weight(float_of_word(from[chunk_words]), l.world);
        const word_t word = from[k];
        for (unsigned e = 0; e < word_bits; ++e) y[e] = add_signed(y[e], unpack_bit(word, e), weight);
      }
      word_t lanes = 0;
      for (unsigned e = 0; e < word_bits; ++e) {
        float& err = server_error[k * word_bits + e];
        const float z = y[e] + err;
        err = z;  // z waits here for its scale
        lane[e] += double(z) * double(z);
        lanes |= sign_bit(z) << e;
      }
      block[k] = lanes_to_word(lanes);
    }
    partials[s] = combine_lanes(lane);
  });
  const float scale =
      scale_of(finish_sum_of_squares(partials, (chunk_words + segment_words - 1) / segment_words), l.chunk);
  block[chunk_words] = word_of_float(scale);
  detail::for_each_element(l.chunk, [&](std::size_t i) {
    const float z = server_error[i];
    server_error[i] = compression_error(z, sign_bit(z), scale);
  });
  return scale;
}

// out[0, n) <- s_s[j]·sgn for every chunk j of the gathered server blocks (`world` blocks in rank order).
inline void decompress(const word_t* gathered, const compressed_layout& l, float* out) {
  const std::size_t chunk_words = l.chunk_words(), block_words = l.block_words();
  const std::size_t words = (l.n + word_bits - 1) / word_bits;
  detail::for_each_segment(words, [&](std::size_t s) {
    const std::size_t end = (s + 1) * segment_words < words ? (s + 1) * segment_words : words;
    for (std::size_t k = s * segment_words; k < end; ++k) {
      const word_t* from = gathered + k / chunk_words * block_words;
      const float scale = float_of_word(from[chunk_words]);
      const word_t word = from[k % chunk_words];
      const std::size_t count = l.n - k * word_bits < word_bits ? l.n - k * word_bits : word_bits;
      for (unsigned e = 0; e < count; ++e) out[k * word_bits + e] = decompressed(unpack_bit(word, e), scale);
    }
  });
}

// The argument checks of a compressed allreduce call (host and CUDA), before anything is touched: the layout is
// compressed_layout::make's at the workspace's world size and no larger than its capacity, the error buffers have
// its sizes, and buf is there.
inline status check_call(const void* buf, const compressed_layout& l, std::size_t worker_elements,
                         std::size_t server_elements, const compressed_layout& capacity) {
  const std::string at = "compressed_allreduce: ";
  if (l.world != capacity.world)
    return status::invalid(at + "layout.world " + std::to_string(l.world) + " but the communicator has " +
                           std::to_string(capacity.world) + " ranks");
  if (l.n > capacity.n)
    return status::invalid(at + "layout.n " + std::to_string(l.n) + " exceeds max_elements " +
                           std::to_string(capacity.n));
  if (l != compressed_layout::make(l.n, l.world))
    return status::invalid(at + "layout (padded " + std::to_string(l.padded) + ", chunk " + std::to_string(l.chunk) +
                           ") is not compressed_layout::make(" + std::to_string(l.n) + ", " + std::to_string(l.world) +
                           ")");
  if (worker_elements != l.padded)
    return status::invalid(at + "err.worker has " + std::to_string(worker_elements) + " elements; layout.padded is " +
                           std::to_string(l.padded));
  if (server_elements != l.chunk)
    return status::invalid(at + "err.server has " + std::to_string(server_elements) + " elements; layout.chunk is " +
                           std::to_string(l.chunk));
  if (buf == nullptr && l.n > 0) return status::invalid(at + "buf is null for layout.n " + std::to_string(l.n));
  return status::success();
}

// ---------------------------------------------------------------------------------------------------------------------

// Workspace for compressed allreduces over one host-memory communicator, sized once for tensors of at most
// max_elements (no allocation per call).
class compressed_allreduce {
 public:
  compressed_allreduce(comm::communicator& comm, std::size_t max_elements)
      : comm_(&comm), capacity_(compressed_layout::make(max_elements, comm.size())) {
    if (comm.memory() != comm::memory_space::host)
      throw error(status::invalid("compressed_allreduce: communicator '" + comm.name() +
                                  "' works on device memory; use mpopt::cuda::onebit::compressed_allreduce"));
    if (capacity_.world > 1) {
      send_ = host::aligned_buffer<word_t>(capacity_.message_words());
      recv_ = host::aligned_buffer<word_t>(capacity_.message_words());
      partials_ = host::aligned_buffer<double>(capacity_.segments());
    }
  }

  // In place: buf[0, layout.n) <- the error-compensated 1-bit approximation of the mean over ranks of buf, the same
  // bits on every rank; updates err. Collective. World size 1: buf unchanged (exact), err untouched (DeepSpeed skips
  // compression at size 1). Throws mpopt::error naming the argument for a layout of another world size (or not made
  // by compressed_layout::make), n larger than max_elements, err of the wrong size, or a null buf; nothing has
  // changed then.
  void operator()(float* buf, const compressed_layout& layout, error_feedback& err) {
    throw_if_error(check_call(buf, layout, err.worker.size(), err.server.size(), capacity_));
    if (layout.world == 1 || layout.n == 0) return;
    const std::size_t block_words = layout.block_words();
    worker_scale_ = compress_worker(buf, layout, err.worker.data(), send_.data(), partials_.data());
    comm_->all_to_all_bytes(send_.data(), recv_.data(), block_words * sizeof(word_t));
    // The server block goes straight to this rank's slot of the gather (send is free again).
    word_t* mine = send_.data() + std::size_t(comm_->rank()) * block_words;
    server_scale_ = compress_server(recv_.data(), layout, err.server.data(), mine, partials_.data());
    comm_->all_gather_bytes(send_.data(), block_words * sizeof(word_t));
    decompress(send_.data(), layout, buf);
  }

  comm::communicator& communicator() const noexcept { return *comm_; }
  // The layout of max_elements at this world size: the largest the workspace holds.
  const compressed_layout& capacity() const noexcept { return capacity_; }
  // This rank's scales in the latest compressed call (s_w, and s_s of its chunk); 0 before one.
  float worker_scale() const noexcept { return worker_scale_; }
  float server_scale() const noexcept { return server_scale_; }

 private:
  comm::communicator* comm_;
  compressed_layout capacity_;
  host::aligned_buffer<word_t> send_, recv_;  // message_words each: the all-to-all's send (then the gather) and recv
  host::aligned_buffer<double> partials_;
  float worker_scale_ = 0.0f, server_scale_ = 0.0f;
};

}  // namespace mpopt::onebit
